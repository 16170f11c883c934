"""A rehearsal of the ImageNet path on CPU, end to end, with the config a user copies.

A generated image folder of JPEGs of varied sizes (train/ and val/, 8 classes) -> .beton ->
`configs/imagenet_resnet50.yaml` on 2 gloo processes (overriding only what CPU time needs: resnet18, a
small batch and crop, a few steps, 2 loader workers), with the momentum queue and its colour views ->
SIGTERM to both ranks, as SLURM's preemption signals every task -> resume -> export -> the eval's
imagenet protocol for a few steps -> report.json. Then the GPU check's step script on one CPU process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from infomax.runtime.checkpoint import checkpoint_dirs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
pytest.importorskip("ffcv", reason="the rehearsal writes a .beton: make setup installs FFCV when it can")

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 64, 8
TOTAL = 8  # steps: 512 images / (2 ranks x 8) = 32 per epoch, so the run stops mid-epoch
SETTINGS = [
    "model.arch=resnet18", "optim.batch_size_per_process=8", "data.num_workers=2", f"run.max_steps={TOTAL}",
    "run.checkpoint_every=2", "run.log_every=2", "data.views.0.size=64", "data.views.1.size=64",
    "objective.queue_size=64", "monitor.knn_bank=256", "monitor.knn_queries=64",
]


def write_image_folder(root: Path) -> None:
    """JPEGs of 180-300 px a side, each class its own hue, in <root>/{train,val}/<class>/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(180, 301, size=2)
                base = np.array([255 * c / CLASSES, 128, 255 - 255 * c / CLASSES])
                pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)


def launch(run_dir: Path, data: Path, beton: Path) -> subprocess.Popen:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", str(REPO / "pretrain" / "main.py"),
           "--config", str(REPO / "configs" / "imagenet_resnet50.yaml"), f"run.dir={run_dir}", f"data.root={data}",
           "data.format=ffcv", f"data.path={beton}", *SETTINGS]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def ranks_of(launcher: subprocess.Popen) -> list[int]:
    """The pids of the launcher's descendants that run pretrain/main.py: the ranks torchrun's agent started."""
    found, todo = [], [launcher.pid]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            todo += [int(c) for c in (task / "children").read_text().split()]
        if pid != launcher.pid and b"pretrain/main.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
            found.append(pid)
    return found


def test_the_imagenet_config_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    data, beton, run_dir = tmp_path / "imagenet", tmp_path / "train.beton", tmp_path / "run"
    write_image_folder(data)
    # 1. the .beton, as README.md and docs/slurm.md write it
    proc = subprocess.run([sys.executable, "-m", "infomax.data.beton", "--dataset", "imagefolder", "--root", str(data),
                           "--split", "train", "--out", str(beton), "--workers", "2"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "found in sys.modules" not in proc.stderr, proc.stderr[-3000:]  # runpy's, re-running a preloaded main

    # 2-3. pretraining on 2 gloo processes, stopped by SIGTERM to every rank once a checkpoint exists
    first = launch(run_dir, data, beton)
    deadline = time.time() + 900
    while not (checkpoint_dirs(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-4000:]
        time.sleep(0.2)
    ranks = ranks_of(first)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-4000:]
    assert "stopped (SIGTERM)" in out, out[-4000:]
    stopped_at = int(checkpoint_dirs(run_dir / "checkpoints")[0].name.split("_")[1])
    assert 2 <= stopped_at < TOTAL and not (run_dir / "export").exists()

    # 4-5. resumed where it stopped, to the end and the export
    resumed = launch(run_dir, data, beton)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    assert f"step {stopped_at})" in out and f"infomax pretraining finished: step {TOTAL}/" in out, out[-4000:]
    # the last kNN pass's loader workers start while FFCV's numba pool decodes: forked, TBB printed 4 lines a rank
    assert "Unable to join threads" not in out, out[-4000:]
    meta = json.loads((run_dir / "export" / "config.json").read_text())
    assert meta["architecture"] == "resnet18" and meta["summary"]["steps"] == TOTAL

    # 6-7. the eval's imagenet protocol (SGD on augmented frozen features) for a few steps -> report.json
    out_dir = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "main.py"), "--config",
                           str(REPO / "configs" / "probe_imagenet.yaml"), f"root={data}", f"weights={run_dir / 'export'}",
                           f"out={out_dir}", "sgd.epochs=1", "sgd.milestones=[]", "sgd.global_batch_size=64",
                           "batch_size_per_process=64", "num_workers=2", "baselines.published=false"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out_dir / "report.json").read_text())
    ours = report["rows"][0]
    assert ours["protocol"] == "imagenet" and ours["scored"] == CLASSES * VAL_PER_CLASS
    assert 0.0 <= ours["top1"] <= 1.0 and set(ours["knn"]) == {"20", "200"}


def test_the_gpu_checks_step_script_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_step.py, the real step of the one-shot GPU check, rehearsed on one CPU process (resnet18 at
    64 px there): a GPU lease is too short to find a broken script on it."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--out", str(tmp_path),
                           "--steps", "2", "--batch", "8", "--images", "64", "--workers", "1"],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # the CPU rehearsal, on any machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu_step.json").read_text())
    assert figures["gpus"] == 0 and figures["loader"] == "ffcv" and figures["pretrain_exit"] == 0
    assert figures["images_per_s"] > 0 and figures["steps"] == 2 and "syncs_whole_run" in figures
