"""docs/DESIGN.md, invariant 3: killing a run at any step and resuming gives the same final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, free_port, pretrain_in_process, run_main
from infomax.runtime.checkpoint import checkpoint_dirs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]  # one worker builds the module's run

# 256 images / batch 32 = 8 steps per epoch, 4 epochs = 32 steps; checkpoints every 3 steps.
SETTINGS = ["run.deterministic=true", "optim.epochs=4", "run.checkpoint_every=3", "run.keep_checkpoints=2",
            "monitor.knn_every=2"]
TOTAL = 32


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = checkpoint_dirs(run_dir / "checkpoints")[0]
    assert newest.name == f"step_{TOTAL:08d}"
    return torch.load(newest / "state.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_main(f"run.dir={run_dir}", *SETTINGS)
    return final_model(run_dir)


def start(run_dir: Path, settings: list[str] = SETTINGS) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}", *settings]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        dirs = checkpoint_dirs(run_dir / "checkpoints")
        if dirs and int(dirs[0].name.split("_")[1]) >= min_step:
            return int(dirs[0].name.split("_")[1])
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(uninterrupted, run_dir: Path) -> None:
    proc = start(run_dir)
    step = wait_for_checkpoint(run_dir, proc, min_step=6)
    proc.kill()
    proc.wait()
    assert step < TOTAL and step % 8 != 0, "the kill must land mid-run and mid-epoch for this test to mean anything"
    assert not (run_dir / "export").exists()
    out = run_main(f"run.dir={run_dir}", *SETTINGS).stdout
    assert "resumed from" in out
    assert_same(final_model(run_dir), uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C saves too
def test_stop_signal_saves_exits_zero_and_resumes(uninterrupted, run_dir: Path, sig: signal.Signals) -> None:
    proc = start(run_dir)
    wait_for_checkpoint(run_dir, proc, min_step=3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped ({sig.name})" in out and "KeyboardInterrupt" not in err
    stopped_at = int(checkpoint_dirs(run_dir / "checkpoints")[0].name.split("_")[1])
    assert 3 <= stopped_at < TOTAL
    assert not (run_dir / "export").exists()
    out = run_main(f"run.dir={run_dir}", *SETTINGS).stdout
    assert f"step {stopped_at})" in out  # resumed exactly where it stopped
    assert_same(final_model(run_dir), uninterrupted)


def test_damaged_newest_checkpoint_falls_back_to_previous(run_dir: Path, capsys) -> None:
    pretrain_in_process(capsys, f"run.dir={run_dir}", "run.max_steps=8", "run.checkpoint_every=4", "monitor.knn_every=0")
    newest = run_dir / "checkpoints" / "step_00000008" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as after a crash mid-copy
    proc = pretrain_in_process(capsys, f"run.dir={run_dir}", "run.max_steps=10", "run.checkpoint_every=4",
                               "monitor.knn_every=0")
    assert "step_00000008 is damaged" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert "step 10/10" in proc.stdout


# The momentum queue (48 keys = 1.5 global batches, so it wraps), the momentum weights and the batched
# on-device views (data.augment=batch: crop, flip, brightness, contrast) resume exactly too.
QUEUE_SETTINGS = [*SETTINGS, "objective.queue_size=48", "model.momentum=0.9", "data.augment=batch",
                  *(f"data.views.{v}.{k}=0" for v in (0, 1) for k in ("saturation", "hue", "grayscale_p"))]


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    newest = checkpoint_dirs(run_dir / "checkpoints")[0]
    assert newest.name == f"step_{TOTAL:08d}"
    state = torch.load(newest / "state.pt", weights_only=True)
    return {part: state[part] for part in ("model", "momentum_model", "objective")}


def test_sigkill_with_queue_and_batch_views_resumes_queue_and_momentum_weights_exactly(tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    run_main(f"run.dir={reference}", *QUEUE_SETTINGS)
    expected = final_state(reference)
    assert int(expected["objective"]["candidates.queue.filled"]) == 48

    killed = tmp_path / "killed"
    proc = start(killed, QUEUE_SETTINGS)
    step = wait_for_checkpoint(killed, proc, min_step=6)
    proc.kill()
    proc.wait()
    assert step < TOTAL and step % 8 != 0
    assert "resumed from" in run_main(f"run.dir={killed}", *QUEUE_SETTINGS).stdout
    resumed = final_state(killed)
    for part in expected:
        assert_same(resumed[part], expected[part])


def test_a_raised_epoch_budget_resumes_on_a_schedule_that_spans_it(run_dir: Path, capsys) -> None:
    """Rerunning a finished 2-epoch run with optim.epochs=3 trains 8 more steps on a cosine
    that spans 24 steps (the checkpoint's scheduler state, 16 steps long, used to leave them at lr 0),
    says so in one line, and moves the weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [f"run.dir={run_dir}", "monitor.knn_every=0", "monitor.online_probe=false", "run.log_every=1"]
    pretrain_in_process(capsys, *base, "optim.epochs=2")
    done = torch.load(run_dir / "checkpoints" / "step_00000016" / "state.pt", weights_only=True)["model"]
    proc = pretrain_in_process(capsys, *base, "optim.epochs=3")
    assert "the lr schedule (warmup, then cosine) now spans 24 steps instead of 16, and resumes at step 16" in proc.stdout
    lrs = {e.step: e.value for e in EventAccumulator(str(run_dir / "tb")).Reload().Scalars("train/lr")}
    assert sorted(s for s in lrs if s > 16) == list(range(17, 25))
    assert all(lrs[s] > 0 for s in range(17, 24)) and lrs[17] > lrs[23]  # the new cosine's tail, not zero
    extended = torch.load(run_dir / "checkpoints" / "step_00000024" / "state.pt", weights_only=True)["model"]
    assert any(not torch.equal(done[k], extended[k]) for k in done if done[k].is_floating_point())


def _resume_worker(rank: int, tmp: str, port: int, case: str) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    from infomax.runtime.checkpoint import RanksDisagree
    from infomax.train.resumable import Resumable

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    accelerator = Accelerator(cpu=True)
    # Each rank's view of run.dir: rank 1's lags behind rank 0's (its newest is missing, or stale) unless in sync.
    view = Path(tmp) / (f"rank{rank}" if case != "in_sync" else "rank0")
    try:
        loaded = Resumable(accelerator, view, keep=3).resume("start afresh")
        result = {"step": loaded[0]["progress"]["global_step"], "path": loaded[1].name}
    except RanksDisagree as e:
        result = {"error": str(e)}
    torch.save(result, f"{tmp}/result{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["in_sync", "missing_on_rank1", "stale_on_rank1"])
def test_rank_0_chooses_the_checkpoint_and_every_rank_resumes_it_or_all_stop(tmp_path: Path, case: str) -> None:
    """Each rank used to resume its own newest checkpoint, so on a lagging filesystem two ranks
    could start at steps 4 and 2, then hang or diverge. Rank 0 now chooses; a rank that cannot read its
    choice, or reads another step there, stops every rank with one message (none waits in a collective)."""
    from conftest import spawn_ranks
    from infomax.runtime import checkpoint as ckpt

    def state(step: int) -> dict:
        return {"progress": {"global_step": step, "epoch": 0, "step_in_epoch": step}, "rng": [ckpt.rng_state()] * 2}

    for step in (2, 4):
        ckpt.save(tmp_path / "rank0", state(step), step, keep=3)
    ckpt.save(tmp_path / "rank1", state(2), 2, keep=3)
    if case == "stale_on_rank1":  # the newest's name is visible there, its contents are still the old step's
        ckpt.save(tmp_path / "rank1", state(2), 4, keep=3)
    port = free_port()
    spawn_ranks(_resume_worker, tmp_path, port, case)
    results = [torch.load(tmp_path / f"result{r}.pt") for r in range(2)]
    if case == "in_sync":
        assert results == [{"step": 4, "path": "step_00000004"}] * 2
        return
    assert results[0] == results[1] and "rank 0 resumes from" in results[0]["error"]
    needle = "cannot read it: rank 1 (FileNotFoundError" if case == "missing_on_rank1" else \
        "read different steps from it: rank 0 step 4, rank 1 step 2"
    assert needle in results[0]["error"] and "filesystem all nodes share" in results[0]["error"], results[0]["error"]
