"""Cost of the eval stage's three inner loops, each against the plain way of writing it, side by side.

    .venv/bin/python benchmarks/studies/eval_cost.py --rounds 5

On Fashion-MNIST with a random-init encoder of configs/fmnist_cpu.yaml's architecture (timings do not
depend on the weights), under bf16 autocast as configs/probe_fmnist.yaml runs:

- feature extraction of the test split: contiguous weights against channels_last (eval ``channels_last``),
  and (both channels_last) the eval transform image by image against once per batch
  (``ImageDataset.load_many``);
- one loss-and-gradient evaluation of the fast probe's L-BFGS on the standardised train features:
  autograd against :func:`infomax.eval.probe.loss_and_grad`;
- kNN k=20 and k=200 over the 60k train features for the 10k test features: one similarity pass per
  k against one pass for both (:func:`infomax.features.knn.knn_predict_many`).

Rounds are interleaved so that the machine's drift hits both sides alike; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from infomax.config.pretrain import load_config
from infomax.data.datasets import Subset, open_dataset
from infomax.eval.probe import loss_and_grad
from infomax.features.extract import ImageListDataset, extract_features
from infomax.features.knn import knn_predict_many
from infomax.method.models import encoder_from_config


def autograd_loss_and_grad(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """The probe's objective written with autograd (how infomax/eval/probe.py computed it before the fused pass)."""
    model.zero_grad()
    loss = F.cross_entropy(model(x), y) + weight_decay * model.weight.pow(2).sum() / 2
    loss.backward()
    return loss.detach()


class OneByOne(Subset):
    """The whole dataset with its batched load hidden: the DataLoader transforms image by image."""

    def __init__(self, base) -> None:
        super().__init__(base, list(range(len(base))))

    def load_many(self, indices: list[int]) -> None:
        return None


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default="configs/fmnist_cpu.yaml", help="pretraining config whose model.* to build")
    args = parser.parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision="bf16", cpu=not torch.cuda.is_available())
    model_cfg = load_config(args.config).model
    train, test = open_dataset("fashion_mnist", "train"), open_dataset("fashion_mnist", "test")
    size = 28
    encoder = encoder_from_config(model_cfg, train.channels).eval()
    channels_last = encoder_from_config(model_cfg, train.channels).eval().to(memory_format=torch.channels_last)
    channels_last.load_state_dict(encoder.state_dict())

    def extract(model: torch.nn.Module, split) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(model, ImageListDataset(split, size), accelerator, 256)

    print("extracting the train features once (probe and kNN inputs)", file=sys.stderr)
    (x, y), (tx, ty) = extract(channels_last, train), extract(channels_last, test)
    xs = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # the probe's standardised features
    probe = torch.nn.Linear(x.shape[1], train.num_classes)
    rows: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (f"extraction, {len(test)} images", lambda: extract(encoder, test), lambda: extract(channels_last, test)),
        (f"extraction transforms, {len(test)} images", lambda: extract(channels_last, OneByOne(test)),
         lambda: extract(channels_last, test)),
        (f"probe loss + gradient, {x.shape[0]} x {x.shape[1]}",
         lambda: autograd_loss_and_grad(probe, xs, y, 1e-4), lambda: loss_and_grad(probe, xs, y, 1e-4)),
        (f"kNN k=20 and 200, {len(ty)} x {len(y)}",
         lambda: [knn_predict_many(x, y, tx, [k], 0.07, 10) for k in (20, 200)],
         lambda: knn_predict_many(x, y, tx, [20, 200], 0.07, 10)),
    ]
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _, _ in rows}
    for r in range(args.rounds):
        for name, plain, ours in rows:
            times[name][0].append(seconds(plain))
            times[name][1].append(seconds(ours))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print("| loop | plain (median) | ours (median) | speed-up |\n|---|---|---|---|")
    for name, (plain, ours) in times.items():
        a, b = statistics.median(plain), statistics.median(ours)
        print(f"| {name} | {1000 * a:.0f} ms | {1000 * b:.0f} ms | **{a / b:.2f}x** |")


if __name__ == "__main__":
    main()
