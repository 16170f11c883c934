"""Faults a user can cause, each reproduced: what infomax does must be one clear line and no lost work.

docs/faults.md, "Faults and what happens", lists these tests."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch

from conftest import REPO, TINY, main_in_process, run_main
from infomax.config.pretrain import ConfigError
from infomax.runtime import checkpoint as ckpt
from infomax.runtime.run_dir import RunDirError, RunDirLock
from infomax.runtime.stop import SecondCtrlC

FAST = ["monitor.knn_every=0", "run.checkpoint_every=4"]
Pretrain = Callable[..., subprocess.CompletedProcess]  # the conftest fixture `pretrain`: main in this process


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` with its bytes; tb/ (event files are named per process) and the
    lock file (it names the current holder) aside."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "tb" not in p.relative_to(run_dir).parts and p.name != ".lock"}


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_run_dir_with_another_config_is_refused_before_anything_is_written(run_dir: Path, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    before = snapshot(run_dir)
    proc = pretrain(f"run.dir={run_dir}", "optim.lr=0.5", "objective.bound=nwj", "optim.epochs=3", *FAST, check=False)
    line = one_line_error(proc, 2)
    assert "belongs to a different config (objective.bound, optim.lr differ)" in line
    assert snapshot(run_dir) == before  # config.yaml still records the first experiment
    # Another head shape used to crash with a size-mismatch traceback after overwriting config.yaml.
    proc = pretrain(f"run.dir={run_dir}", "model.head_dims=[64,16]", *FAST, check=False)
    assert "model.head_dims" in one_line_error(proc, 2) and snapshot(run_dir) == before
    # Budgets may change: a larger one continues the run; so may settings that leave the trajectory alone (a
    # collective timeout raised after a slow save used to need a new run dir)
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=6", "run.dist_timeout_min=30", "data.batches_ahead=5", *FAST)
    assert "resumed from" in proc.stdout and "step 6/6" in proc.stdout


@pytest.mark.parametrize("damage", ["emptied", "cut_in_half", "cut_at_a_line_end", "deleted"])
def test_damaged_run_dir_config_says_so_and_is_restored_from_the_checkpoint(run_dir: Path, damage: str, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    saved = run_dir / "config.yaml"
    text = saved.read_text()
    cut = text.index("\n", len(text) // 2) - 2  # mid-line: what a partial copy or a full disk leaves
    # at a line end it still parses: it read as "a different config (... and 39 more differ)"
    cut += 3 if damage == "cut_at_a_line_end" else 0
    if damage == "deleted":  # its checkpoints resumed under any config, which config.yaml then recorded
        saved.unlink()
    else:
        saved.write_text("" if damage == "emptied" else text[:cut])
    before = snapshot(run_dir)
    line = one_line_error(pretrain(f"run.dir={run_dir}", "run.max_steps=6", *FAST, check=False), 2)
    assert {"emptied": f"{saved} is empty", "deleted": f"'{run_dir}' holds checkpoints but no config.yaml"}.get(
        damage, f"{saved} is cut short") in line
    assert f"python -m infomax.runtime.run_dir --restore-config {run_dir}" in line and "different config" not in line
    assert snapshot(run_dir) == before
    if damage == "deleted":  # a fresh start is still there to ask for (every checkpoint may be damaged too)
        assert "or start afresh with run.resume=never" in line
    restore = subprocess.run([sys.executable, "-m", "infomax.runtime.run_dir", "--restore-config", str(run_dir)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert restore.returncode == 0, restore.stderr
    assert saved.read_text().partition("\n")[2] == text.partition("\n")[2]
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=6", *FAST)
    assert "resumed from" in proc.stdout and "step 6/6" in proc.stdout


def test_a_quoted_home_path_is_expanded_and_printed_commands_quote_their_paths(tmp_path: Path, monkeypatch) -> None:
    """`run.dir='~/x'` (quoted, so the shell leaves the ~) made a literal ./~ while the summary printed ~/x."""
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(str(TINY), ["run.dir=~/runs/x", "monitor.expect_eval=~/eval.yaml"], check=lambda c: None)
    assert (cfg.run.dir, cfg.monitor.expect_eval) == (str(tmp_path / "runs/x"), str(tmp_path / "eval.yaml"))
    cfg = load_config(None, ["weights=[~/a/export]", "out=~/report"], schema=EvalConfig, check=validate_eval)
    assert (cfg.weights, cfg.out) == ([str(tmp_path / "a/export")], str(tmp_path / "report"))
    damaged = tmp_path / "my runs" / "x"
    damaged.mkdir(parents=True)
    (damaged / "config.yaml").write_text("")
    with pytest.raises(RunDirError, match=r"--restore-config '.*/my runs/x'"):
        from infomax.runtime.run_dir import check_saved_config
        check_saved_config(damaged / "config.yaml")


def test_a_run_resumes_on_its_data_moved_elsewhere_and_refuses_other_data(tmp_path: Path, pretrain: Pretrain) -> None:
    """On clusters a node-local copy of the data (or of the .beton) is routine. A new data.root used to be refused
    as "a different config", its fix pointing back at the old path. The data's identity decides now."""
    from test_data import make_imagefolder

    first, moved, other, run_dir = tmp_path / "a", tmp_path / "scratch copy", tmp_path / "c", tmp_path / "run"
    make_imagefolder(first, good_per_class=12, corrupt=0)
    shutil.copytree(first, moved)
    make_imagefolder(other, good_per_class=10, corrupt=0)
    common = ["data.dataset=imagefolder", "data.augment=loader", "optim.batch_size_per_process=8", *FAST]
    pretrain(f"run.dir={run_dir}", f"data.root={first}", "run.max_steps=4", *common)
    proc = pretrain(f"run.dir={run_dir}", f"data.root={moved}", "run.max_steps=6", *common)
    assert f"the data moved (data.root {first} -> '{moved}'); it is the same data (dataset imagefolder" in proc.stdout
    assert "resumed from" in proc.stdout and "step 6/6" in proc.stdout
    line = one_line_error(pretrain(f"run.dir={run_dir}", f"data.root={other}", "run.max_steps=8", *common,
                                   check=False), 2)
    assert f"data.root={other} holds other data than run.dir '{run_dir}' trained on (images 20, not 24); give " \
           f"data.root='{moved}' (or a copy of it)" in line, line


def fake_beton(tmp_path: Path) -> Path:
    """A file with the sidecar the writer leaves beside a Fashion-MNIST .beton (its contents are not read)."""
    beton = tmp_path / "fm.beton"
    beton.write_bytes(b"\0" * 64)
    (tmp_path / "fm.beton.json").write_text(json.dumps({"dataset": "fashion_mnist", "count": 60000, "channels": 1,
                                                        "num_classes": 10, "mean": [0.286], "std": [0.353], "bytes": 64}))
    return beton


def test_a_beton_of_another_dataset_than_the_config_names_is_refused_before_anything_is_written(
        tmp_path: Path, capsys) -> None:
    """`data.format=ffcv data.path=fm.beton` with data.dataset left at synthetic trained on Fashion-MNIST, and its
    export and model card said "synthetic". The .beton's sidecar names its dataset: a mismatch is refused."""
    pytest.importorskip("ffcv", reason="FFCV is not installed (make setup installs it as root)")
    beton, run_dir = fake_beton(tmp_path), tmp_path / "run"
    code, _, err = main_in_process(capsys, f"run.dir={run_dir}", "data.format=ffcv", f"data.path={beton}")
    line = err.strip().splitlines()[-1]
    assert code == 2 and line == ("error: bad value for config key 'data.path': it was written from fashion_mnist "
                                  "(its .json says), but data.dataset is synthetic; set data.dataset=fashion_mnist, or "
                                  "give the .beton of synthetic"), err
    assert not run_dir.exists()


def test_the_eval_refuses_a_beton_of_another_dataset(tmp_path: Path) -> None:
    from infomax.config.eval import EvalConfig
    from infomax.eval.main import open_splits

    with pytest.raises(ConfigError, match="'train_beton': it was written from fashion_mnist .* dataset is synthetic"):
        open_splits(EvalConfig(dataset="synthetic", train_beton=str(fake_beton(tmp_path)), weights=["x"]))


def test_a_cut_fashion_mnist_test_file_is_an_error_naming_it_not_a_missing_split(tmp_path: Path, capsys) -> None:
    """With a truncated t10k file the kNN monitor and the online probe quietly scored 64 training images instead,
    as if Fashion-MNIST had no test split. A split that is there but unreadable is an error naming the file."""
    from infomax.data.datasets import FMNIST_DEFAULT_ROOT

    root = tmp_path / "fmnist"
    root.mkdir()
    for f in Path(FMNIST_DEFAULT_ROOT).iterdir():
        (root / f.name).symlink_to(f)
    cut = root / "t10k-images-idx3-ubyte.gz"
    data = cut.read_bytes()
    cut.unlink()
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = main_in_process(capsys, f"run.dir={tmp_path / 'run'}", "data.dataset=fashion_mnist",
                                   f"data.root={root}", "data.limit=256")
    assert code == 2 and f"'{cut}' is a damaged gzip file" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("warmup", [0.0, 0.2, 1.0, 2.0])
def test_the_lr_reaches_its_peak_where_the_warmup_ends_then_follows_a_cosine_over_the_rest(warmup: float) -> None:
    """timm's default ran the cosine under the warmup: with 1 of 2 epochs of warmup the lr climbed to 0.0875 and
    dropped at once to 0.05, never reaching optim.lr = 0.1. As SimCLR, MoCo v3 and DINO: a linear warmup to the peak,
    then a cosine to optim.min_lr over the steps after it, the whole run optim.epochs long."""
    from infomax.config.pretrain import OptimConfig
    from infomax.train.loop import lr_schedule, schedule_steps

    steps_per_epoch, lr = 10, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_schedule(optimizer, OptimConfig(lr=lr, epochs=2, warmup_epochs=warmup, min_lr=0.0), steps_per_epoch)
    lrs = []
    for step in range(2 * steps_per_epoch):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    end = round(min(warmup, 2) * steps_per_epoch)
    assert lrs[:end] == pytest.approx([lr * s / end for s in range(end)])  # from 0, linearly
    if warmup >= 2:
        assert max(lrs) < lr  # the warning's case: the peak is never reached
        return
    cosine = [lr * (1 + math.cos(math.pi * s / (2 * steps_per_epoch - end))) / 2
              for s in range(2 * steps_per_epoch - end)]
    assert lrs[end:] == pytest.approx(cosine)  # the peak where the warmup ends, then down to min_lr
    assert schedule_steps(scheduler.state_dict()) == 2 * steps_per_epoch


def test_small_silent_faults_are_said_a_queue_past_the_dataset_and_a_knn_k_past_the_bank() -> None:
    """A warmup as long as the run never reaches optim.lr, unsaid; a queue as large as the dataset held every image's
    own stale key, unsaid; a kNN k larger than the bank was labelled with the k asked for, not the k used."""
    from infomax.eval.rows import knn_top1
    from infomax.train.loop import queue_warning, warmup_warning

    assert warmup_warning(0.2, 2) == "" and warmup_warning(1, 2) == "" and warmup_warning(0, 1) == ""
    assert "is the whole run (optim.epochs=2): the lr never reaches optim.lr" in warmup_warning(2, 2)
    assert queue_warning(0, 256) == "" and queue_warning(128, 256) == ""
    assert queue_warning(256, 256).startswith("warning: objective.queue_size=256 holds as many keys as the 256 ")
    bank = (torch.randn(30, 4), torch.arange(30) % 3)
    assert set(knn_top1(bank, (torch.randn(8, 4), torch.arange(8) % 3), [5, 200], 0.1, 3)) == {"5", "30"}


def test_a_precision_that_auto_changes_on_resume_is_said_and_recorded_per_stretch_of_steps() -> None:
    """run.precision=auto resumed on a CPU without native bf16 trained on in fp32 and recorded "precision no" for the
    whole run. The change is said in one line, survives the checkpoint, and the record lists each stretch."""
    import dataclasses

    from infomax.runtime.checkpoint import Progress

    p = Progress()
    assert p.enter_precision("bf16") == "" and p.precision_line() == "bf16"
    p.global_step = 16
    assert p.enter_precision("bf16") == ""
    p = Progress(**dataclasses.asdict(p))  # as a checkpoint saves and restores it
    line = p.enter_precision("no")
    assert line == ("precision changes from bf16 to no at step 17 (run.precision=auto on this machine): steps 1-16 "
                    "ran in bf16; the summary and the model card list each stretch")
    p.global_step = 24
    assert p.precision_line() == "bf16 for steps 1-16, no for 17-24"


def test_run_dir_that_never_checkpointed_may_start_over_with_another_config(run_dir: Path, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    shutil.rmtree(run_dir / "checkpoints")  # as a run that failed at its first step leaves it
    shutil.rmtree(run_dir / "export")
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=4", "optim.lr=0.5", *FAST)
    assert "step 4/4" in proc.stdout and "optim:\n" in (run_dir / "config.yaml").read_text()
    assert "lr: 0.5" in (run_dir / "config.yaml").read_text()


def test_resuming_under_another_world_size_is_refused_naming_both(run_dir: Path) -> None:
    """A 1-process checkpoint resumed on 2 ranks used to finish "step 8/8" with twice the global batch, silently."""
    run_main(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    before = snapshot(run_dir)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_main(f"run.dir={run_dir}", "run.max_steps=8", *FAST, launcher=launcher, check=False)
    assert proc.returncode != 0
    # One line per rank, the same on each; the launcher's ChildFailedError report follows (docs/faults.md).
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "step_00000004 was saved by 1 process(es) and is resumed on 2" in errors.pop()
    assert snapshot(run_dir) == before


def test_the_queue_without_synchronised_batchnorm_on_several_ranks_is_refused_unless_shuffled(run_dir: Path) -> None:
    """With per-rank BatchNorm a rank's queries find their keys through its own batch statistics,
    MoCo's failure without shuffled BN; it is refused before any step, and runs with MoCo's shuffling BN."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_main(f"run.dir={run_dir}", "run.max_steps=2", "objective.queue_size=32", "model.sync_bn=false", *FAST,
                    launcher=launcher, check=False)
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "'model.sync_bn': false with objective.queue_size on 2 processes" in errors.pop()
    assert not (run_dir / "checkpoints").exists()
    proc = run_main(f"run.dir={run_dir}", "run.max_steps=2", "objective.queue_size=32", "model.sync_bn=false",
                    "model.shuffle_bn=1", *FAST, launcher=launcher)
    assert "infomax pretraining finished: step 2/" in proc.stdout, proc.stdout[-2000:]


def test_foreign_directory_is_refused_and_left_alone(tmp_path: Path, pretrain: Pretrain) -> None:
    other = tmp_path / "some-other-project"
    other.mkdir()
    (other / "config.yaml").write_text("their: settings\n")
    (other / "export").mkdir()
    (other / "export" / "config.json").write_text("{}")
    before = snapshot(other)
    line = one_line_error(pretrain(f"run.dir={other}", "run.max_steps=2", *FAST, check=False), 2)
    assert "non-empty directory that infomax did not create" in line
    assert snapshot(other) == before


def test_unwritable_checkpoint_dir_is_found_at_start(run_dir: Path, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=2", *FAST)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").write_text("")  # unwritable even for root (chmod would not stop root)
    line = one_line_error(pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST, check=False), 2)
    assert f"'{run_dir / 'checkpoints'}' is not a writable directory" in line


def test_zero_byte_newest_checkpoint_falls_back_to_the_previous_one(run_dir: Path, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=8", *FAST)
    (run_dir / "checkpoints" / "step_00000008" / "state.pt").write_bytes(b"")
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=10", *FAST)
    assert "step_00000008 is damaged" in proc.stderr and "IndexError" not in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout and "step 10/10" in proc.stdout


def test_bit_rot_is_caught_by_the_checksum_and_the_previous_checkpoint_is_used(run_dir: Path, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=8", *FAST)
    state = run_dir / "checkpoints" / "step_00000008" / "state.pt"
    data = bytearray(state.read_bytes())
    middle = len(data) // 2  # inside a tensor record: torch.load alone would not notice
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    state.write_bytes(bytes(data))
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=10", *FAST)
    assert "step_00000008 is damaged" in proc.stderr and "sha256" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout


def test_every_checkpoint_damaged_stops_with_their_names_unless_a_fresh_start_is_asked_for(run_dir: Path, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=8", *FAST)
    for state in (run_dir / "checkpoints").glob("step_*/state.pt"):
        state.write_bytes(state.read_bytes()[:100])
    (run_dir / "report.md").write_text("the earlier run's eval\n")
    (run_dir / "report.json").write_text("{}\n")
    before = snapshot(run_dir)
    line = one_line_error(pretrain(f"run.dir={run_dir}", "run.max_steps=10", *FAST, check=False), 1)
    assert "every checkpoint" in line and "step_00000004" in line and "step_00000008" in line
    assert "run.resume=never" in line and snapshot(run_dir) == before
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=10", "run.resume=never", *FAST)
    assert "starting afresh" in proc.stdout and "resumed from" not in proc.stdout and "step 10/10" in proc.stdout
    kept = list(run_dir.glob("checkpoints.old-*/step_00000008/state.pt"))
    assert len(kept) == 1 and len(kept[0].read_bytes()) == 100  # moved aside, not deleted
    # ... with the earlier run's TensorBoard events, which used to stay in tb/, mixed with the new run's
    assert list(run_dir.glob("tb.old-*/events.*")) and len(list((run_dir / "tb").glob("events.*"))) == 1
    # ... and its export, which an eval scored as the fresh run's until that run wrote its own
    assert list(run_dir.glob("export.old-*/encoder.safetensors")) and (run_dir / "export" / "encoder.safetensors").is_file()
    # ... and its eval's report, which stayed beside the fresh run as if it were that run's
    assert [p.read_text() for p in run_dir.glob("report.old-*.md")] == ["the earlier run's eval\n"]
    assert len(list(run_dir.glob("report.old-*.json"))) == 1 and not list(run_dir.glob("report.[jm]*"))


def test_two_fresh_starts_in_one_second_keep_both_earlier_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file moved aside took the name of one moved in the same second, and replaced it."""
    import time

    from infomax.runtime.checkpoint import move_aside

    monkeypatch.setattr(time, "strftime", lambda *_: "20261208-120000")
    for text in ("first", "second"):
        (tmp_path / "report.md").write_text(text)
        (tmp_path / "tb").mkdir()
        (tmp_path / "tb" / "events").write_text(text)
        move_aside(tmp_path / "report.md"), move_aside(tmp_path / "tb")
    assert sorted(p.read_text() for p in tmp_path.glob("report.old-*.md")) == ["first", "second"]
    assert sorted((p / "events").read_text() for p in tmp_path.glob("tb.old-*")) == ["first", "second"]
    assert move_aside(tmp_path / "report.md") is None  # nothing there: nothing moved


def test_finished_run_rerun_changes_nothing_and_a_larger_budget_continues_it(run_dir: Path, pretrain: Pretrain) -> None:
    pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    before = snapshot(run_dir)
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    assert "already complete" in proc.stdout and snapshot(run_dir) == before
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=2", *FAST)  # a lower budget trains nothing: no record changes
    assert "already complete" in proc.stdout and snapshot(run_dir) == before
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=6", *FAST)
    assert "resumed from" in proc.stdout and "step 6/6" in proc.stdout
    # Past a lower budget without an export (a run stopped before its end): it wrote an export and a config.yaml
    # of the lower budget, its summary "step 6/2"
    shutil.rmtree(run_dir / "export")
    before = snapshot(run_dir)
    line = one_line_error(pretrain(f"run.dir={run_dir}", "run.max_steps=2", *FAST, check=False), 2)
    assert "has trained 6 steps, more than this budget of 2, and has no usable export" in line
    assert "or with run.max_steps=6 to export it as it is" in line and snapshot(run_dir) == before
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=6", *FAST)
    assert "writing it again from the newest checkpoint" in proc.stdout and (run_dir / "export" / "config.json").is_file()


def test_second_run_on_a_locked_run_dir_stops_at_once_naming_the_holder(run_dir: Path) -> None:
    cmd = [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
           "optim.epochs=400", *FAST]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints").is_dir():  # the first run is past its start, mid-training
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        line = one_line_error(run_main(f"run.dir={run_dir}", "optim.epochs=400", *FAST, check=False), 2)
        assert f"in use by pid {first.pid} on " in line
        # The holder may be mid-save, with its own .tmp_step_*_<pid>; the refused run must have written none.
        strays = [p.name for p in (run_dir / "checkpoints").glob(".tmp_step_*") if not p.name.endswith(f"_{first.pid}")]
        assert not strays
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0  # the first run was undisturbed: it saved and stopped on the signal


def test_a_filesystem_without_locks_warns_in_one_line_and_the_run_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    """flock on Lustre mounted without -o flock raises ENOSYS; it used to end the run with a traceback."""
    import fcntl

    def no_locks(f, how):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunDirLock(tmp_path / "run") as lock:
        assert lock.path.read_text().startswith(f"pid {os.getpid()} on ")
    warning, = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: the filesystem of") and "does not support file locks" in warning


def test_lock_is_exclusive_and_released_with_its_holder(tmp_path: Path) -> None:
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire().release()  # free again once released


def test_disk_full_at_a_save_removes_the_partial_dir_and_names_the_safe_checkpoint(tmp_path: Path, monkeypatch) -> None:
    state = {"weights": torch.randn(50_000)}
    first = ckpt.save(tmp_path, state, 4, keep=2)
    real_write = ckpt._HashingWriter.write

    def write_until_full(self, data):
        if self.size > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "write", write_until_full)
    with pytest.raises(ckpt.DiskFull) as caught:
        ckpt.save(tmp_path, state, 8, keep=2)
    message = str(caught.value)
    # The need is a checkpoint's size (200 KB of weights), not what was written before the disk filled.
    assert str(tmp_path) in message and re.search(r"needs about 20\d KB", message) and f"{first} is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]  # no .tmp_step_* left behind
    assert torch.equal(ckpt.load_latest(tmp_path, "")[0]["weights"], state["weights"])


def test_file_size_limit_at_a_save_is_named_with_its_way_out(run_dir: Path) -> None:
    """`ulimit -f` (EFBIG) used to surface as torch's "enforce fail at inline_container.cc"."""
    import resource

    def limit_files_to_1_mb() -> None:  # below the tiny model's 3 MB checkpoint, above everything else
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))

    cmd = [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
           "run.max_steps=4", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=limit_files_to_1_mb,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = one_line_error(proc, 1)
    assert "the file-size limit (ulimit -f) was reached" in line and "while writing step_00000004" in line, line
    assert "needs about 3" in line and "MB" in line and "no earlier checkpoint exists" in line, line
    assert "Raise the limit (ulimit -f unlimited) and rerun the same command to resume" in line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == []  # the partial save was removed


def test_a_file_size_limit_while_rewriting_config_yaml_leaves_it_whole_and_a_rerun_resumes(run_dir: Path,
                                                                                           pretrain: Pretrain) -> None:
    """A raised budget rewrites config.yaml; under `ulimit -f` (also a full disk) that write used to leave it cut to
    the limit, and the rerun the error line promised was refused as damaged. Every run-dir record is written
    atomically now: the old file stays whole, and the rerun resumes."""
    import resource

    pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    before = (run_dir / "config.yaml").read_text()
    assert len(before) > 1500

    def limit_files_to_1_kb() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    cmd = [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
           "run.max_steps=6", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=limit_files_to_1_kb,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = one_line_error(proc, 1)
    assert "the file-size limit (ulimit -f) was reached" in line and "it resumes" in line, line
    assert (run_dir / "config.yaml").read_text() == before and not list(run_dir.glob(".config.yaml.tmp*"))
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=6", *FAST)
    assert "resumed from" in proc.stdout and "step 6/6" in proc.stdout


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary() -> None:
    from infomax.runtime.files import write_atomically

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        write_atomically(path, "old: 1\n")
        with mock.patch("os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")):
            with pytest.raises(OSError):
                write_atomically(path, "new: 2\n" * 1000)
        assert path.read_text() == "old: 1\n" and [p.name for p in Path(d).iterdir()] == ["config.yaml"]


def test_second_ctrl_c_during_a_save_removes_the_partial_dir_and_says_so_in_one_line(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    state = {"weights": torch.randn(50_000)}
    first = ckpt.save(tmp_path, state, 4, keep=2)
    real_write = ckpt._HashingWriter.write

    def write_until_ctrl_c(self, data):
        if self.size > 20_000:
            raise SecondCtrlC  # what StopFlag raises on the second SIGINT
        return real_write(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "write", write_until_ctrl_c)
    with pytest.raises(ckpt.SaveInterrupted) as caught:  # not torch's "enforce fail at inline_container.cc"
        ckpt.save(tmp_path, state, 8, keep=2)
    assert "step_00000008 was interrupted by a second Ctrl-C" in str(caught.value)
    assert f"{first} is intact" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


@pytest.mark.parametrize("raised", [SecondCtrlC(), ckpt.SaveInterrupted("the save of step_00000008 was ..."),
                                    KeyboardInterrupt()], ids=["second", "during_a_save", "while_starting"])
def test_second_ctrl_c_ends_pretraining_with_one_line_and_exit_130(raised: BaseException, monkeypatch, capsys) -> None:
    """A plain KeyboardInterrupt is a first Ctrl-C before the stop handler was installed (the data and model still
    being built): it was said to be a second Ctrl-C that kept the checkpoints already written."""
    import infomax.launch.pretrain

    def interrupted(cfg, eval_clock=None):
        raise raised

    monkeypatch.setattr(infomax.launch.pretrain, "train", interrupted)
    assert infomax.launch.pretrain.main(["--config", str(TINY)]) == 130
    line, = capsys.readouterr().err.splitlines()
    expected = {"SecondCtrlC": ckpt.SECOND_CTRL_C, "SaveInterrupted": str(raised),
                "KeyboardInterrupt": "stopped by Ctrl-C while starting, before the first step; rerun the same command "
                                     "to start"}[type(raised).__name__]
    assert line == f"error: {expected}"


def test_partial_saves_of_a_killed_run_are_removed_when_the_loop_resumes(tmp_path: Path, capsys) -> None:
    from types import SimpleNamespace

    from infomax.train.resumable import Resumable

    good = ckpt.save(tmp_path, {"weights": torch.ones(3), "progress": vars(ckpt.Progress(global_step=4)),
                                "rng": [ckpt.rng_state()]}, 4, keep=2)
    stale = tmp_path / ".tmp_step_00000008_4242"  # what SIGKILL mid-save leaves: state.pt cut, no manifest
    stale.mkdir()
    (stale / ckpt.STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    loop = Resumable(SimpleNamespace(is_main_process=True, process_index=0, num_processes=1), tmp_path, keep=2)
    state, path = loop.resume("")
    assert path == good and loop.progress.global_step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
    assert f"removed {stale}" in capsys.readouterr().out


@pytest.mark.slow
def test_ranks_whose_launcher_died_stop_at_the_next_step_with_a_checkpoint(run_dir: Path) -> None:
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(REPO / "pretrain" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}", "optim.epochs=400",
                "run.checkpoint_every=1000", "monitor.knn_every=0"]
    proc = subprocess.Popen(launcher, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run_dir / "tb").is_dir():  # both ranks are training
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(3)
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.time() + 120
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in ranks):
            assert time.time() < deadline, "the orphaned ranks ran on"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        proc.communicate()
    saved = ckpt.checkpoint_dirs(run_dir / "checkpoints")
    assert saved, "the ranks stopped without saving"
    assert ckpt.load_latest(run_dir / "checkpoints", "")[0]["progress"]["global_step"] > 0


def test_identical_weights_export_to_an_identical_file_in_every_process(tmp_path: Path) -> None:
    # safetensors writes its metadata map in a per-process order: with two keys about 1 export in 6
    # got another sha256. One process per export, as separate runs would be.
    script = ("import sys, torch; from infomax.export.encoder import export_encoder; from infomax.method.models import "
              "create_encoder; from pathlib import Path;"
              "torch.manual_seed(0); e = create_encoder('test_resnet', 1, small_input=True);"
              "export_encoder(e, Path(sys.argv[1]), arch='test_resnet', in_chans=1, input_size=16, mean=(0.5,), "
              "std=(0.25,),"
              " small_input=True, summary={})")
    hashes = set()
    for i in range(3):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True, cwd=REPO, timeout=120)
        header = (tmp_path / str(i) / "encoder.safetensors").read_bytes()[8:200]
        assert b'"__metadata__":{"format":"pt"}' in header
        hashes.add(json.loads((tmp_path / str(i) / "config.json").read_text())["sha256"])
    assert len(hashes) == 1


def test_local_dry_run_writes_nothing_so_the_real_run_may_claim_the_dir(tmp_path: Path, capsys) -> None:
    """submitit's local executor makes its log folder when built; a dry run must leave no RUN/slurm/ behind,
    or the real submission would refuse RUN as a directory infomax did not create."""
    from infomax.launch.submit import main, remove_empty_tree

    (tmp_path / "kept").mkdir()  # an existing empty parent stays
    run_dir = tmp_path / "kept" / "r"
    code = main(["--config", str(TINY), f"run.dir={run_dir}", "--cluster", "local", "--dry-run"])
    assert code == 0 and "# resolved config for" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]

    (run_dir / "slurm" / "1").mkdir(parents=True)
    (run_dir / "user.txt").write_text("mine")
    remove_empty_tree(run_dir)  # only the empty directories go
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == ["user.txt"]


def test_slurm_tasks_get_a_core_for_each_loader_worker_and_the_main_process(tmp_path: Path, capsys) -> None:
    """SLURM gives a task 1 CPU unless told: 10 workers and the main process used to share it."""
    from infomax.launch.submit import main

    args = ["--config", str(TINY), f"run.dir={tmp_path / 'r'}", "data.num_workers=10", "--dry-run"]
    assert main(args) == 0 and "#SBATCH --cpus-per-task=11" in capsys.readouterr().out
    code, err = main([*args, "--cpus-per-task", "4"]), capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "error: --cpus-per-task 4 is too few for the loader: 10 workers and the main process need 11 cores per task; "
        "leave --cpus-per-task out (it then asks for 11) or lower data.num_workers to 3"], err


@pytest.mark.parametrize("flags, message", [
    (["--cluster", "local", "--nodes", "2"], "--nodes 2 needs SLURM: --cluster local runs on this machine alone"),
    (["--mem-gb", "-1"], "--mem-gb must be >= 0, got -1"),
    (["--array-parallelism", "0"], "--array-parallelism must be >= 1, got 0"),
    (["--time", "2", "--signal-delay", "120"], "--signal-delay 120 s is not shorter than --time (2 min)"),
    (["--sweep", "optim.lr=0.1,0.2", "--eval", "configs/probe_fmnist.yaml", "--eval-override", "dataset=synthetic",
      "--eval-override", "out=/tmp/one"],
     "--eval configs/probe_fmnist.yaml: out=/tmp/one is one directory for the 2 runs of the sweep"),
    # what the chained eval job would fail on after the pretraining's days: no root, the wrong channels
    (["--eval", "configs/probe_imagenet.yaml"], "--eval configs/probe_imagenet.yaml: imagefolder split directory "
     "'train' does not exist: set root to a directory holding train/<class>/<image> (e.g. root=/datasets/imagenet); "
     "pass it as --eval-override root=..."),
    (["--eval", "configs/probe_fmnist.yaml"], "--eval configs/probe_fmnist.yaml scores fashion_mnist, 1-channel "
     "images, but this run's encoder reads 3-channel synthetic images"),
    (["--eval", "configs/probe_fmnist.yaml", "--eval-override", "dataset=synthetic", "--eval-override", "holdout=8"],
     "--eval configs/probe_fmnist.yaml has holdout=8, but this run holds out data.holdout=0"),
])
def test_submit_refuses_resources_it_cannot_ask_for_in_one_line(tmp_path: Path, capsys, flags: list[str],
                                                                 message: str) -> None:
    """submitit's LocalExecutor raised a ValueError traceback for several nodes; negative sizes reached sbatch."""
    from infomax.launch.submit import main

    code = main(["--config", str(TINY), f"run.dir={tmp_path / 'r'}", "--cluster", "local", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "r").exists()


def test_submit_time_0_means_no_limit_on_a_local_run_as_on_slurm(tmp_path: Path) -> None:
    """`--time 0 --cluster local` printed "submitted", then submitit's local executor killed the job at once with
    empty logs. 0 means no limit there, as SLURM means it (and SLURM gets --time=0)."""
    from infomax.config.pretrain import load_config
    from infomax.launch.submit import LOCAL_NO_LIMIT_MIN, job_request, parse_args

    runs = [load_config(str(TINY), [f"run.dir={tmp_path / 'r'}"])]
    for cluster, expected in (("local", LOCAL_NO_LIMIT_MIN), ("slurm", 0)):
        args = parse_args(["--config", str(TINY), "--time", "0", "--cluster", cluster])
        assert job_request(args, runs, 1, 1).timeout_min == expected
    assert LOCAL_NO_LIMIT_MIN >= 365 * 24 * 60


def test_a_sweeps_dry_run_says_its_script_goes_as_a_job_array(tmp_path: Path, capsys) -> None:
    """The dry run prints one job's script; for a sweep it says how the array submits it."""
    from infomax.launch.submit import main

    code = main(["--config", str(TINY), f"run.dir={tmp_path / 'r'}", "--sweep", "optim.lr=0.1,0.3", "--dry-run",
                 "--array-parallelism", "4"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("# sbatch script (2 jobs: a job array of this script, --array=0-1%4, "), out
    assert not (tmp_path / "r").exists()


def test_slurm_dry_run_prints_the_script_on_a_machine_without_slurm(tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from infomax.launch.submit import main

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch, srun or sinfo
    args = ["--config", str(TINY), f"run.dir={tmp_path / 'r'}", "--nodes", "2", "--gpus-per-node", "8",
            "--partition", "gpu", "--time", "01:00:00"]
    code, out = main([*args, "--dry-run"]), capsys.readouterr().out
    assert code == 0 and out.startswith("# sbatch script (1 job)\n#!/bin/bash\n"), out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --partition=gpu" in out
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --time=60" in out
    assert "# resolved config for" in out and "submitted" not in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    code, err = main(args), capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "error: sbatch is not on PATH: run this on a SLURM login node, or use --cluster local"], err


def _damaged_fashion_mnist(tmp_path: Path, kind: str) -> str:
    """A copy of the Fashion-MNIST files whose train images are cut short, gzipped or raw."""
    import gzip

    from infomax.data.datasets import FMNIST_DEFAULT_ROOT

    root = tmp_path / f"fm_{kind}"
    shutil.copytree(FMNIST_DEFAULT_ROOT, root)
    images = root / "train-images-idx3-ubyte.gz"
    if kind == "idx":
        raw = gzip.decompress(images.read_bytes())
        images.unlink()
        images = root / "train-images-idx3-ubyte"
        images.write_bytes(raw)
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    return str(root)


def _half_copied_beton(tmp_path: Path) -> str:
    from infomax.data.beton import main as beton_main

    out = tmp_path / "half.beton"
    assert beton_main(["--dataset", "synthetic", "--limit", "64", "--out", str(out)]) == 0
    out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    return str(out)


def _slurm_without_a_controller(tmp_path: Path) -> dict[str, str]:
    """sbatch and sinfo on PATH, answering as they do when slurmctld is down."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "sinfo"):
        (bin_dir / tool).write_text("#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller "
                                    "(connect failure)' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


BAD_INPUTS = {  # name: (what to pass, given tmp_path; a phrase the error must contain)
    "truncated_gz": (lambda t: ["data.dataset=fashion_mnist", f"data.root={_damaged_fashion_mnist(t, 'gz')}"],
                     "is a damaged gzip file"),
    "truncated_idx": (lambda t: ["data.dataset=fashion_mnist", f"data.root={_damaged_fashion_mnist(t, 'idx')}"],
                      "so it was cut short"),
    "half_copied_beton": (lambda t: ["data.format=ffcv", f"data.path={_half_copied_beton(t)}"],
                          "the copy is incomplete"),
    "epochs_inf": (lambda t: ["optim.epochs=inf"], "'optim.epochs': must be a finite number > 0, got inf"),
    "negative_seed": (lambda t: ["run.seed=-1"], "'run.seed': must be in [0, 2147483648) (numpy's generators need it)"),
    "view_out_of_range": (lambda t: ["data.views.5.size=8"], "'data.views' has 2 entries (numbered 0 and 1)"),
    "vit_on_16px_views": (lambda t: ["model.arch=vit_tiny_patch16_224", "model.small_input=false"],
                          "'vit_tiny_patch16_224' cannot take the 16 px views"),
    "arch_typo_at_half_width": (lambda t: ["model.arch=resnet19", "model.width=0.5"],
                                "unknown timm model 'resnet19' for model.arch"),
    "slurm_controller_down": (None, "sinfo failed (slurm_load_partitions: Unable to contact slurm controller"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_one_line_exit_2_and_writes_nothing(tmp_path: Path, case: str, capsys) -> None:
    """Each of these used to end in a traceback (EOFError, negative dimensions, OverflowError, ...), some
    after the run dir was claimed. Each line names the file or key, what was expected and the way out.
    Pretraining's cases run its ``main`` in this process (what a process prints and exits with is
    test_config.py's real-process case); the launcher's runs as a process, with its PATH."""
    run_dir = tmp_path / "run"
    make_args, phrase = BAD_INPUTS[case]
    if make_args is None:  # launch/submit.py, with sbatch on PATH but no controller reachable
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--config", str(TINY),
                               f"run.dir={run_dir}"], capture_output=True, text=True, cwd=REPO, timeout=120,
                              env=_slurm_without_a_controller(tmp_path))
    else:
        code, out, err = main_in_process(capsys, f"run.dir={run_dir}", *make_args(tmp_path), *FAST)
        proc = subprocess.CompletedProcess([], code, out, err)
    assert phrase in one_line_error(proc, 2)
    assert not run_dir.exists()


def _read_scalars(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        steps += [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
    return steps


def test_tensorboard_dir_deleted_mid_run_warns_once_and_logging_goes_on(tmp_path: Path, capsys) -> None:
    """Deleting tb/ used to kill the run with a FileNotFoundError from the writer's thread."""
    from infomax.runtime.tracking import TensorBoard

    tb = TensorBoard(tmp_path / "tb", enabled=True)
    tb.scalars({"train/loss": 1.0}, 0)
    tb.writer.flush()
    shutil.rmtree(tmp_path / "tb")
    for step in range(1, 40):  # the writer thread's failure surfaces at a later call
        tb.scalars({"train/loss": 1.0}, step)
        time.sleep(0.01)
    tb.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "a TensorBoard write failed" in warnings[0], warnings
    assert _read_scalars(tmp_path / "tb", "train/loss")[-1] == 39  # the later steps are in the new event file


def test_tensorboard_that_cannot_be_recreated_stops_logging_not_training(tmp_path: Path, capsys) -> None:
    from infomax.runtime.tracking import TensorBoard

    tb = TensorBoard(tmp_path / "tb", enabled=True)
    tb.writer.flush()
    shutil.rmtree(tmp_path / "tb")
    (tmp_path / "tb").write_text("")  # a file where the log dir was: no new writer can be made there
    for step in range(40):
        tb.scalars({"train/loss": 1.0}, step)
    tb.text("summary", "done")
    tb.close()
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and "TensorBoard logging stopped" in err and tb.writer is None, err


FULL_AT_EXPORT = """
import errno, sys
import infomax.export.encoder as export
real = export.write_atomically
def full(path, data):
    if path.name == export.WEIGHTS:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real(path, data)
export.write_atomically = full
from infomax.launch.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_at_the_export_is_one_line_and_a_rerun_writes_the_export(run_dir: Path) -> None:
    """ENOSPC or a SafetensorError traceback used to end the run here, with its summary lost."""
    args = ["--config", str(TINY), f"run.dir={run_dir}", "run.max_steps=4", *FAST]
    proc = subprocess.run([sys.executable, "-c", FULL_AT_EXPORT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = one_line_error(proc, 1)
    assert f"could not write the export to {run_dir / 'export'} (no space left on the device)" in line, line
    assert f"the checkpoint {run_dir / 'checkpoints' / 'step_00000004'} is intact" in line
    assert not (run_dir / "export" / "config.json").exists()
    proc = run_main(*args[2:])
    assert "writing it again from the newest checkpoint" in proc.stdout
    from infomax.export.encoder import export_problem

    assert export_problem(run_dir / "export") is None


@pytest.mark.parametrize("damage", ["config_cut_short", "stale_beside_new_weights"])
def test_damaged_export_of_a_finished_run_is_written_again(run_dir: Path, damage: str, pretrain: Pretrain) -> None:
    """A cut config.json made every rerun a JSONDecodeError traceback; weights that are not the ones config.json
    names made the run "already complete" forever while the eval's sha256 check failed."""
    pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    export = run_dir / "export"
    good = (export / "encoder.safetensors").read_bytes()
    summary = json.loads((export / "config.json").read_text())["summary"]
    from infomax.export.model_card import add_eval

    add_eval(export, "| ours | 91.00 |", "On synthetic.", run_dir / "report.md")  # as an eval leaves the card
    if damage == "config_cut_short":
        text = (export / "config.json").read_text()
        (export / "config.json").write_text(text[: len(text) // 2])
    else:
        (export / "encoder.safetensors").write_bytes(good[:-4] + b"\0\0\0\0")
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    assert "the run is complete but its export cannot be used" in proc.stdout, proc.stdout[-2000:]
    assert (export / "encoder.safetensors").read_bytes() == good  # the same weights, from the same checkpoint
    # ... reported as the run reported them (they were null), with the eval's rows still on their card
    again = json.loads((export / "config.json").read_text())["summary"]
    assert [again[k] for k in ("final_loss", "mi_estimate_nats", "mi_estimate_nats_mean_logged")] == \
           [summary[k] for k in ("final_loss", "mi_estimate_nats", "mi_estimate_nats_mean_logged")]
    assert again["final_loss"] is not None and "| ours | 91.00 |" in (export / "README.md").read_text()
    proc = pretrain(f"run.dir={run_dir}", "run.max_steps=4", *FAST)
    assert "is already complete" in proc.stdout


@pytest.mark.parametrize("value, seconds", [("abc", 30.0), ("-5", 30.0), ("nan", 30.0), ("2.5", 2.5), ("", 30.0)])
def test_a_bad_progress_interval_is_said_once_and_the_default_kept(monkeypatch, capsys, value: str,
                                                                   seconds: float) -> None:
    """INFOMAX_PROGRESS_SECONDS=abc used to end the run in a ValueError at its first progress bar."""
    from infomax.runtime import tracking

    monkeypatch.setenv("INFOMAX_PROGRESS_SECONDS", value)
    monkeypatch.setattr(tracking, "_SAID_BAD", set())
    assert tracking.progress_seconds() == tracking.progress_seconds() == seconds
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == (seconds != 2.5 and value != ""), warnings
