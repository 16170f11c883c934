"""The torch pins agree across pyproject.toml, requirements.txt and environment.yml."""

import re

from conftest import REPO


def pins(text: str) -> set[str]:
    return set(re.findall(r"(torch(?:vision)?==[0-9.]+)", text))


def test_pins_are_consistent() -> None:
    expected = {"torch==2.14.1", "torchvision==0.29.1"}
    for name in ("pyproject.toml", "requirements.txt", "environment.yml", "Makefile"):
        assert pins((REPO / name).read_text()) == expected, name


ENTRY_POINTS = {  # console script: (module for python -m, script path or None)
    "infomax-pretrain": ("infomax.launch.pretrain", "pretrain/main.py"),
    "infomax-eval": ("infomax.eval.main", "eval/main.py"),
    "infomax-submit": ("infomax.launch.submit", "launch/submit.py"),
    "infomax-beton": ("infomax.data.beton", None),
}


def test_every_entry_point_runs_as_console_script_module_and_script() -> None:
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    for script, (module, path) in ENTRY_POINTS.items():
        forms = [[str(bin_dir / script)], [sys.executable, "-m", module]]
        forms += [[sys.executable, str(REPO / path)]] if path else []
        for cmd in forms:
            proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
            assert proc.returncode == 0 and "usage:" in proc.stdout, (cmd, proc.stderr[-1000:])


def test_nothing_edits_sys_path() -> None:
    """The package is installed (make setup); the entry scripts' folders hold nothing else to shadow a module."""
    offenders = [str(p.relative_to(REPO)) for folder in ("infomax", "pretrain", "eval", "launch", "benchmarks")
                 for p in (REPO / folder).rglob("*.py")
                 if re.search(r"sys\.path(\[.*\])?\s*(=|\.insert|\.append)", p.read_text())]
    assert offenders == [], offenders


def test_the_wheel_installs_only_infomax(tmp_path) -> None:
    """`pip install .` puts one import root into site-packages (and the console scripts), not generic names such as
    pretrain, eval or launch that other projects use too."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools builds in the source tree, and the checkout stays clean
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob("infomax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    roots = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert roots == {"infomax"}, roots
    assert "infomax/launch/pretrain.py" in names and "infomax/method/objectives/contrastive.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "infomax-pretrain = infomax.launch.pretrain:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_make_demos_launcher_chooses_no_default_of_its_own(tmp_path) -> None:
    """`make demo`'s launch line names everything the launcher would otherwise default, so its first screen has no
    warning that mixed precision defaulted to 'no' above our own precision line."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = (REPO / "Makefile").read_text().split("\ndemo: setup\n")[1].split("\n\t$(PY)")[0]
    command = recipe.replace("\\\n", " ").replace("$(ACCEL)", str(Path(sys.executable).with_name("accelerate")))
    command = command.replace("$$(nproc)", "1").replace("--config configs/fmnist_cpu.yaml", "--help")
    proc = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert "pretrain/main.py" in command and "defaults used instead" not in proc.stdout + proc.stderr, proc.stderr
