"""Which optimizer gets the demo's budgeted AlexNet off its first plateau? Held-out top-1 after 40 and 80 steps.

    .venv/bin/python benchmarks/studies/alexnet_budget.py        # ~25 min on 2 cores (5 settings x 80 steps)

The eval stage's AlexNet for 28 px inputs (infomax.eval.baselines.supervised_alexnet), Fashion-MNIST, batch 128
with flips, cosine over 80 steps (after the warmup, if any); scored on the last 1000 train images, which
the steps never draw.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from infomax.data.datasets import FashionMNIST
from infomax.eval.baselines import supervised_alexnet

SETTINGS = [("sgd", 0.03, 0), ("sgd", 0.01, 0), ("sgd", 0.01, 10), ("sgd", 0.003, 0), ("adamw", 1e-3, 10)]


def run(images: torch.Tensor, labels: torch.Tensor, optimizer: str, lr: float, warmup: int,
        steps: int = 80, batch: int = 128) -> list[tuple[int, float]]:
    """Train from seed 0 for ``steps``; (step, held-out top-1) at every 40 steps."""
    torch.manual_seed(0)
    model = supervised_alexnet(1, 28, 10)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05) if optimizer == "adamw" else
           torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4))
    held_x, held_y = images[-1000:, None], labels[-1000:]
    g = torch.Generator().manual_seed(0)
    curve = []
    for step in range(steps):
        factor = (min(1.0, (step + 1) / warmup) if warmup else 1.0) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        idx = torch.randint(0, len(images) - 1000, (batch,), generator=g)
        x = images[idx, None]
        x = torch.where((torch.rand(batch, generator=g) < 0.5)[:, None, None, None], x.flip(-1), x)
        model.train()
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 40 == 0:
            model.eval()
            with torch.no_grad():
                curve.append((step + 1, (model(held_x).argmax(1) == held_y).float().mean().item()))
    return curve


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says what it runs
    ds = FashionMNIST("")
    images = (ds.images.float() / 255 - ds.mean[0]) / ds.std[0]
    print("| optimizer | lr | warmup steps | held-out top-1 at 40 / 80 steps | seconds |\n|---|---|---|---|---|")
    for optimizer, lr, warmup in SETTINGS:
        t0 = time.perf_counter()
        curve = run(images, ds.labels, optimizer, lr, warmup)
        print(f"| {optimizer} | {lr:g} | {warmup} | {' / '.join(f'{a:.1%}' for _, a in curve)} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
