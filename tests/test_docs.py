"""Every code block of README.md and docs/ runs, so that a snippet that breaks fails `make test` (a timm line that
could not load the demo's export stood in the README for weeks).

Python blocks are executed in a workspace that holds a small export made with the demo's own config at
``runs/fmnist_cpu/export``. Shell blocks run each command with its paths pointed into the workspace and its budget
cut to a step: a pretraining for one step at a small image size, an eval on a few images, the .beton writer on a
small image folder, a submission as a dry run (`--dry-run`: it needs a cluster), `make` targets as `make -n`
(they run for minutes, and `make test` is this suite). The commands' own keys and values are kept, so a renamed key
or a removed flag fails here. Output samples (blocks without a language) are not commands.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, in_process

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console")


def code_blocks() -> list[tuple[str, str, str]]:
    """(id: file and line, language, code) of every fenced block with a language, in order."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M):
            line = text[: m.start()].count("\n") + 1
            blocks.append((f"{doc.relative_to(REPO)}:{line}", m.group(1), m.group(2)))
    return blocks


def commands(code: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped, each split as the shell would."""
    joined = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory laid out as the docs assume: the repo's configs and entry scripts, an image folder standing in
    for every dataset path, and the demo's export (its config, one step) at runs/fmnist_cpu/export."""
    from test_data import make_imagefolder

    ws = tmp_path_factory.mktemp("docs")
    for name in ("configs", "pretrain", "eval", "launch", "benchmarks", "baselines"):
        (ws / name).symlink_to(REPO / name)
    make_imagefolder(ws / "images", good_per_class=12, corrupt=0)
    (ws / "images" / "val").symlink_to(ws / "images" / "train")
    for config, run_dir, more in (("fmnist_cpu", "runs/fmnist_cpu", ["data.limit=256"]),
                                  ("imagenet_resnet50", "runs/imagenet", [f"data.root={ws / 'images'}", *SMALL_VIEWS])):
        proc = run([sys.executable, "pretrain/main.py", "--config", f"configs/{config}.yaml", f"run.dir={run_dir}",
                    *SMALL_RUN, *more], ws)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


# A pretraining cut to one step of a few images (the commands' own keys come first; these win).
SMALL_RUN = ["run.max_steps=1", "optim.batch_size_per_process=4", "data.num_workers=0", "monitor.knn_every=0",
             "monitor.expect_eval=''", "optim.warmup_epochs=0"]
RUN_DIRS = itertools.count()
SMALL_VIEWS = [f"data.views.{v}.size=32" for v in range(2)]  # the ImageNet recipes' 224 px views, at 32
SMALL_EVAL = ["limit_train=16", "limit_test=16", "num_workers=0", "baselines.alexnet_supervised=false",
              "baselines.supervised_encoder=false", "random_init=false", "raw_pixels=false", "sgd.epochs=1",
              "sgd.milestones=[]", "batch_size_per_process=8", "sgd.global_batch_size=8"]


def in_workspace(arg: str, ws: Path) -> str:
    """A path of the docs pointed into the workspace: dataset roots at the image folder, another run's export at
    the workspace's RGB one (ImageNet's config, one step on the image folder)."""
    arg = re.sub(r"(/datasets/imagenet|/data/my_images)(?![\w_.])", str(ws / "images"), arg)
    arg = re.sub(r"/(datasets|fast)/(\w+\.beton)", lambda m: str(ws / m.group(2)), arg)
    return re.sub(r"runs/(?!fmnist_cpu)[\w]+/export", "runs/imagenet/export", arg)


def runnable(cmd: list[str], ws: Path, previous: dict[str, list[str]]) -> list[str] | None:
    """The command as the test runs it (see the module's docstring), or None for one it cannot mean to run."""
    cmd = [in_workspace(a, ws) for a in cmd]
    if cmd[0] == "make":
        return ["make", "-n", "-C", str(REPO), *cmd[1:]]
    if cmd[0] == "accelerate":  # the launcher's own flags go: one process here (its multi-GPU configs need GPUs)
        cmd = [sys.executable, *cmd[next(i for i, a in enumerate(cmd) if a.endswith(".py")):]]
    if cmd[0] in (".venv/bin/python", "python"):
        cmd = [sys.executable, *cmd[1:]]
    script = cmd[1] if len(cmd) > 1 else ""
    if "..." in cmd:  # "the same as above": the previous command of this script, with what follows the ellipsis
        cmd = previous[script] + cmd[cmd.index("...") + 1:]
    previous[script] = cmd
    if script == "pretrain/main.py":
        config = cmd[cmd.index("--config") + 1]
        views = SMALL_VIEWS if "imagenet" in config or "r50" in config else []
        return [*cmd, *SMALL_RUN, *views, f"run.dir={ws / 'runs' / f'docs{next(RUN_DIRS)}'}"]  # a fresh one each
    if script == "eval/main.py":
        if any("probe_fmnist" in a for a in cmd):  # Fashion-MNIST's exports are grey: the demo's
            cmd = [a.replace("runs/imagenet/export", "runs/fmnist_cpu/export") for a in cmd]
        return [*cmd, *SMALL_EVAL, f"out={ws / 'reports' / str(next(RUN_DIRS))}"]
    if script == "launch/submit.py":
        return cmd if "--dry-run" in cmd else [*cmd, "--dry-run"]
    if cmd[1:3] == ["-m", "infomax.data.beton"]:
        pytest.importorskip("ffcv", reason="FFCV is not installed (make setup installs it as root)")
        if "--workers" in cmd:  # a machine's worth of writer processes, on 2 cores, for a few images
            del cmd[cmd.index("--workers"): cmd.index("--workers") + 2]
        return [*cmd, "--workers", "1"]
    if cmd[1:3] == ["-m", "infomax.eval.yardstick"]:
        return [*cmd, "--k", "64", "--train-pairs", "512", "--draws", "1", "--steps", "20"]
    if script == "benchmarks/mi_gaussian.py":
        return [*cmd, "--steps", "2", "--levels", "2", "--estimators", "infonce", "--out", str(ws / "mi")]
    return cmd


ENV = {"OMP_NUM_THREADS": "1", "INFOMAX_PROGRESS_SECONDS": "0"}  # threads: for the commands run as processes
# The entry points run in this process (conftest.in_process), as the modules their scripts call: what is under test
# is each command's arguments and what it does, not a Python starting (seconds each, for about 30 commands);
# test_packaging.py runs every entry point as a script, a module and a console script.
IN_PROCESS = {"pretrain/main.py": "infomax.launch.pretrain", "eval/main.py": "infomax.eval.main",
              "launch/submit.py": "infomax.launch.submit", "infomax.data.beton": "infomax.data.beton",
              "infomax.eval.yardstick": "infomax.eval.yardstick"}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=420, env={**os.environ, **ENV})


def execute(cmd: list[str], cwd: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cmd`` run in ``cwd``: an entry point of :data:`IN_PROCESS` in this process,
    anything else as a process."""
    module = len(cmd) > 2 and cmd[1] == "-m"
    if cmd[0] == sys.executable and len(cmd) > 1 and (name := IN_PROCESS.get(cmd[2 if module else 1])):
        return in_process(capsys, importlib.import_module(name).main, cmd[3 if module else 2:], cwd=cwd, env=ENV)
    proc = run(cmd, cwd)
    return proc.returncode, proc.stdout, proc.stderr


BLOCKS = [b for b in code_blocks() if b[1] in (*SHELLS, "python")]


@pytest.mark.slow
@pytest.mark.xdist_group("docs")  # one worker builds the workspace
@pytest.mark.parametrize("where, lang, code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_every_code_block_of_the_docs_runs(where: str, lang: str, code: str, workspace: Path, capsys) -> None:
    if lang == "python":
        proc = run([sys.executable, "-c", code], workspace)
        assert proc.returncode == 0, f"{where}\n{code}\n{proc.stderr[-3000:]}"
        return
    previous: dict[str, list[str]] = {}
    for cmd in commands(code):
        test_cmd = runnable(cmd, workspace, previous)
        returncode, out, err = execute(test_cmd, workspace, capsys)
        assert returncode == 0, f"{where}: {shlex.join(cmd)}\nran as {shlex.join(test_cmd)}\n{out[-2000:]}\n{err[-3000:]}"


def test_the_docs_have_code_blocks_to_run() -> None:
    """The extraction itself: the README's commands and the export's Python are among the blocks."""
    langs = {lang for _, lang, _ in BLOCKS}
    assert {"bash", "python"} <= langs and len(BLOCKS) >= 12
    assert any("load_encoder" in code for _, _, code in BLOCKS)
    assert commands("a b \\\n  c  # note\n# only a comment\nd 'e f'\n") == [["a", "b", "c"], ["d", "e f"]]


def test_every_module_the_docs_name_as_a_command_runs_as_one() -> None:
    """`python -m infomax.x.y` named in the prose (not only in code blocks) is a module with a ``__main__`` guard: one
    without it exits 0 having done nothing."""
    named = {m for doc in DOCS for m in re.findall(r"python -m (infomax(?:\.\w+)+)", doc.read_text())}
    assert len(named) >= 5, named
    silent = [m for m in sorted(named)
              if 'if __name__ == "__main__":' not in (REPO / (m.replace(".", "/") + ".py")).read_text()]
    assert silent == [], f"named as commands in the docs but run nothing: {silent}"


def test_every_test_the_docs_cite_exists() -> None:
    """A test renamed or removed leaves its citation behind (docs/faults.md names one for each fault)."""
    cited = {m for doc in [*DOCS, REPO / "benchmarks" / "README.md"]
             for m in re.findall(r"(test_\w+\.py)::(test_\w+)", doc.read_text())}
    assert len(cited) >= 20, cited
    missing = [f"{file}::{name}" for file, name in sorted(cited)
               if not re.search(rf"^def {name}\(", (REPO / "tests" / file).read_text(), flags=re.M)]
    assert missing == [], f"cited in the docs, not in tests/: {missing}"
