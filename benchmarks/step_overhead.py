"""Our full training step vs a bare PyTorch loop doing the same work, on this machine's CPU.

Both sides: the same MultiViewModel, batch, optimizer and InfoNCE loss. Ours adds what the
pipeline needs every step: Accelerate's autocast/backward, fp32 diagnostics, the cross-rank
flag agreement, gradient-norm clipping and timm's per-step schedule. Loader excluded.

    .venv/bin/python benchmarks/step_overhead.py [--arch resnet18 --size 32 --batch 64 --rounds 7]

Runs are interleaved (ours, bare, ours, bare, ...) and each round times several steps; the figure
is the median of the per-round ratios, so drifting machine load affects both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from infomax.config.pretrain import ModelConfig, ObjectiveConfig
from infomax.method.models import MultiViewModel
from infomax.method.objectives import build_objective
from infomax.train.engine import train_step


def bare_step(model, optimizer, views, temperature: float) -> None:
    z = [F.normalize(v, dim=1) for v in model(views)]
    logits = z[0] @ z[1].T / temperature
    labels = torch.arange(len(logits))
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(arch=args.arch, small_input=args.size <= 64)
    views = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(2)]

    accelerator = Accelerator(cpu=True)
    ours_model = MultiViewModel(cfg, 3, 2)
    ours_opt = create_optimizer_v2(ours_model, opt="sgd", lr=0.01, momentum=0.9, weight_decay=1e-6)
    ours_model, ours_opt = accelerator.prepare(ours_model, ours_opt)
    scheduler, _ = create_scheduler_v2(ours_opt, sched="cosine", num_epochs=10, warmup_epochs=1,
                                       updates_per_epoch=100, step_on_epochs=False)
    objective = build_objective(ObjectiveConfig(temperature=0.1), num_views=2, embed_dim=cfg.head_dims[-1])
    bare_model = MultiViewModel(cfg, 3, 2)
    bare_opt = create_optimizer_v2(bare_model, opt="sgd", lr=0.01, momentum=0.9, weight_decay=1e-6)

    step = 0

    def run_ours() -> float:
        nonlocal step
        t = time.perf_counter()
        for _ in range(args.steps):
            train_step(accelerator, ours_model, objective, ours_opt, views, grad_clip=1.0,
                       skip_nonfinite=False, step=step)
            step += 1
            scheduler.step_update(step)
        return (time.perf_counter() - t) / args.steps

    def run_bare() -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            bare_step(bare_model, bare_opt, views, 0.1)
        return (time.perf_counter() - t) / args.steps

    run_ours(), run_bare()  # warm-up
    ours, bare = [], []
    for _ in range(args.rounds):
        ours.append(run_ours())
        bare.append(run_bare())
    ratios = [o / b for o, b in zip(ours, bare)]
    print(f"{args.arch} {args.size}px batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    print(f"ours  median {statistics.median(ours) * 1e3:.1f} ms/step")
    print(f"bare  median {statistics.median(bare) * 1e3:.1f} ms/step")
    print(f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); target <= "
          "1.10")


if __name__ == "__main__":
    main()
