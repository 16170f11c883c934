"""The eval's supervised fits (the same encoder trained with labels, AlexNet): crops drawn per image in
loader workers against per batch on the device (``BatchViews``), side by side.

    .venv/bin/python benchmarks/studies/supervised_fit.py --rounds 3 --steps 60

On Fashion-MNIST with configs/fmnist_cpu.yaml's encoder and a linear head trained end to end, batch 128,
channels_last, ``run.precision=auto``, as configs/probe_fmnist.yaml's supervised-encoder row trains. The
loader side is the eval's path before same-size images went to the device: torchvision per image in
``num_workers`` (the eval default 2) worker processes. Rounds are interleaved; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from infomax.config.eval import EvalConfig
from infomax.config.pretrain import load_config
from infomax.data.datasets import Subset, open_dataset
from infomax.eval.classifier import SGDSchedule, fit_classifier
from infomax.eval.rows import Rows
from infomax.method.models import encoder_from_config
from infomax.runtime.distributed import make_accelerator
from infomax.runtime.hardware import describe_machine


class PerImage(Subset):
    """The whole dataset, reported as of mixed sizes: the eval then augments it per image in the loader."""

    def __init__(self, base) -> None:
        super().__init__(base, list(range(len(base))))
        self.same_size = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per fit (after 5 untimed)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the per-image side")
    parser.add_argument("--config", default="configs/fmnist_cpu.yaml", help="pretraining config whose model.* to build")
    args = parser.parse_args()
    accelerator, precision = make_accelerator(0, "auto")
    model_cfg = load_config(args.config).model
    train = open_dataset("fashion_mnist", "train")
    cfg = EvalConfig(num_workers=args.workers)
    rows = Rows(cfg, accelerator, train, train, 28, Path(tempfile.mkdtemp()), "bench")

    def fit(images, steps: int) -> float:
        """Seconds per step of ``steps`` supervised steps (the first 5 untimed: warm-up, workers starting)."""
        encoder = encoder_from_config(model_cfg, train.channels)
        model = rows.memory_format(torch.nn.Sequential(encoder, torch.nn.Linear(encoder.num_features, 10)))
        data, augment, workers = rows.train_input(images, 28, 0.6)
        seconds = []
        for n in (5, 5 + steps):
            outcome = fit_classifier(accelerator, model, model, data, SGDSchedule(lr=0.05, epochs=1, max_steps=n,
                                     global_batch_size=128),
                                     Path(tempfile.mkdtemp()), desc="fit", num_workers=workers, augment=augment)
            seconds.append(outcome.wall_s)
        return (seconds[1] - seconds[0]) / steps

    sides = {"per image, loader workers": PerImage(train), "per batch, on the device": train}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, images in sides.items():
            times[name].append(fit(images, args.steps))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{describe_machine()}; precision {precision.mode}")
    print("| crops | s/step (median) | speed-up |\n|---|---|---|")
    base = statistics.median(times["per image, loader workers"])
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | **{base / statistics.median(t):.2f}x** |")


if __name__ == "__main__":
    main()
