"""The real pretraining step on this machine's accelerators, for gpu_check.sh: what a user's job runs.

A generated ImageNet-shaped image folder (JPEGs of 300-500 px, train/ and val/) is written to a .beton; then
``pretrain/main.py`` runs ``configs/imagenet_resnet50.yaml`` on it for ``--steps`` steps on every visible GPU
(NCCL, SyncBatchNorm and the gathered negatives with two or more), with the FFCV loader and the batch colour
steps on the device, under ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call is
counted. With two or more GPUs, the eval's imagenet protocol then runs one short probe epoch and its split
kNN on them (the NCCL path that once could not finish). Writes ``gpu_step.json`` to ``--out``.

    python benchmarks/gpu_step.py --out /tmp/gpu [--steps 60 --batch 128 --images 2560]

On a machine without a GPU it runs the same on one CPU process (a rehearsal of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SYNC_WARNING = "called a synchronizing CUDA operation"


def write_image_folder(root: Path, images: int, classes: int = 10, rng_seed: int = 0) -> None:
    """``images`` train JPEGs (and a tenth as many val ones) of 300-500 px a side, each class its own hue."""
    from PIL import Image

    rng = np.random.default_rng(rng_seed)
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            c = i % classes
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(300, 501, size=2)
            base = np.array([255 * c / classes, 128, 255 - 255 * c / classes])
            pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)


def launcher(processes: int) -> list[str]:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    multi = ["--multi_gpu"] if processes > 1 else []
    return [accelerate, "launch", *multi, "--num_processes", str(processes), "--num_machines", "1",
            "--dynamo_backend", "no", "--mixed_precision", "no"]


def counted(entry: str) -> list[str]:
    """A Python command that runs ``entry``'s main with CUDA's sync debug mode on, each warning printed."""
    code = ("import sys, torch, runpy; torch.cuda.is_available() and torch.cuda.set_sync_debug_mode('warn'); "
            f"sys.argv = [{entry!r}] + sys.argv[1:]; runpy.run_path({entry!r}, run_name='__main__')")
    return ["-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128, help="images per GPU per step")
    parser.add_argument("--images", type=int, default=2560)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args()
    import torch

    out = Path(args.out).resolve()
    gpus = torch.cuda.device_count()
    processes = max(gpus, 1)
    data, beton, run_dir = out / "images", out / "train.beton", out / "run"
    try:
        import ffcv  # noqa: F401
        loader = ["data.format=ffcv", f"data.path={beton}"]
    except ImportError:  # a device machine may lack FFCV's build (opencv, libturbojpeg): the per-image path
        loader = []
    t0 = time.perf_counter()
    if not data.is_dir():
        write_image_folder(data, args.images)
    if loader and not beton.is_file():
        subprocess.run([sys.executable, "-m", "infomax.data.beton", "--dataset", "imagefolder", "--root", str(data),
                        "--out", str(beton)], check=True, cwd=REPO)
    print(f"data: {args.images} images, {'a .beton' if loader else 'FFCV missing: torchvision per image'} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "always", "PYTHONUNBUFFERED": "1"}
    train = [*launcher(processes), "--no_python", sys.executable, *counted(str(REPO / "pretrain" / "main.py")),
             "--config", str(REPO / "configs" / "imagenet_resnet50.yaml"), f"run.dir={run_dir}", f"data.root={data}",
             *loader, f"data.num_workers={args.workers}",
             f"optim.batch_size_per_process={args.batch}", f"run.max_steps={args.steps}", "monitor.knn_every=0",
             f"monitor.knn_bank={args.images // 2}", "monitor.knn_queries=256", "run.log_every=10",
             *([] if gpus else ["model.arch=resnet18", "data.views.0.size=64", "data.views.1.size=64"])]
    t0 = time.perf_counter()
    proc = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "pretrain.log").write_text(proc.stdout + proc.stderr)
    figures: dict = {"gpus": gpus, "processes": processes, "steps": args.steps, "batch_per_process": args.batch,
                     "loader": "ffcv" if loader else "torchvision", "loader_workers": args.workers,
                     "pretrain_exit": proc.returncode, "pretrain_wall_s": round(wall, 1)}
    if proc.returncode == 0:
        summary = json.loads((run_dir / "export" / "config.json").read_text())["summary"]
        seconds = summary["seconds_this_run"]
        figures.update(images_per_s=round(summary["steps_this_run"] * args.batch * processes / seconds, 1),
                       images_per_s_note="whole run, first steps' warm-up included", run_seconds=seconds,
                       syncs_whole_run=(proc.stdout + proc.stderr).count(SYNC_WARNING),
                       syncs_note="every rank's, over the whole run (start, loader, logging, final save "
                                  "included): divide by steps x processes for an upper bound per step")
    if gpus >= 2 and proc.returncode == 0:
        evaluate = [*launcher(processes), str(REPO / "eval" / "main.py"), "--config",
                    str(REPO / "configs" / "probe_imagenet.yaml"), f"root={data}", f"weights={run_dir / 'export'}",
                    f"out={out / 'eval'}", "sgd.epochs=1", "sgd.milestones=[]", f"batch_size_per_process={args.batch}",
                    "baselines.published=false"]
        ev = subprocess.run(evaluate, cwd=REPO, env=env, capture_output=True, text=True)
        (out / "eval.log").write_text(ev.stdout + ev.stderr)
        figures["eval_nccl_exit"] = ev.returncode
        if ev.returncode == 0:
            figures["eval_knn"] = json.loads((out / "eval" / "report.json").read_text())["rows"][0]["knn"]
    (out / "gpu_step.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    sys.exit(proc.returncode or figures.get("eval_nccl_exit", 0))


if __name__ == "__main__":
    main()
