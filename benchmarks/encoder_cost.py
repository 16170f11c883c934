"""Cost of one training step (forward + backward of 2 views, projection head, InfoNCE) per encoder recipe.

    .venv/bin/python benchmarks/encoder_cost.py --size 28 --batch 256 --rounds 5

Synthetic 1-channel batches, no loader, this process's threads only: the compute side of the
recipe study in benchmarks/README.md ("Fashion-MNIST recipe study"). Rounds are interleaved so
that the machine's drift hits every recipe alike; the median per recipe is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from pretrain.config import ModelConfig
from pretrain.models import MultiViewModel
from pretrain.objectives import ContrastiveObjective

# name -> ModelConfig overrides
RECIPES: dict[str, dict] = {
    "resnet18 w0.5 timm stem": dict(arch="resnet18", small_input=False, width=0.5),
    "resnet10t w0.5 deep s2 stem": dict(arch="resnet10t", small_input=True, stem_stride=2, width=0.5),
    "resnet18 timm stem": dict(arch="resnet18", small_input=False),
    "resnet18 3x3 s2 stem": dict(arch="resnet18", small_input=True, stem_stride=2),
    "resnet18 3x3 s1 stem": dict(arch="resnet18", small_input=True, stem_stride=1),
    "resnet10t deep s2 stem": dict(arch="resnet10t", small_input=True, stem_stride=2),
    "resnet14t deep s2 stem": dict(arch="resnet14t", small_input=True, stem_stride=2),
    "resnet10t deep s1 stem": dict(arch="resnet10t", small_input=True, stem_stride=1),
    "resnet14t w0.5 deep s2 stem": dict(arch="resnet14t", small_input=True, stem_stride=2, width=0.5),
}


@dataclass
class Setup:
    """One timed recipe: the model (compiled or not), its objective and optimizer, and the autocast switch."""
    model: torch.nn.Module
    objective: torch.nn.Module
    opt: torch.optim.Optimizer
    bf16: bool


def step_seconds(model: torch.nn.Module, objective: torch.nn.Module, opt: torch.optim.Optimizer,
                 views: list[torch.Tensor], steps: int, bf16: bool = False) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # what run.precision=bf16 does on a CPU
            loss, _ = objective(model(views))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor, CPU C++ codegen)")
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--bf16", action="store_true", help="also time each recipe under bf16 autocast, interleaved")
    args = parser.parse_args()
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    views = [torch.randn(args.batch, 1, args.size, args.size).to(memory_format=fmt) for _ in range(2)]
    setups = {}
    for name, over, bf16 in [(n, o, b) for n, o in RECIPES.items() for b in (False, True)[:1 + args.bf16]]:
        if args.only and name not in args.only:
            continue
        name += " bf16" if bf16 else ""
        model = MultiViewModel(ModelConfig(**over), 1, 2).to(memory_format=fmt)
        objective = ContrastiveObjective(0.2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = torch.compile(model) if args.compile else model
        t0 = time.perf_counter()
        step_seconds(run, objective, opt, views, 2, bf16)  # warm-up (and compilation)
        print(f"{name}: warm-up {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        setups[name] = Setup(run, objective, opt, bf16)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, s in setups.items():
            times[name].append(step_seconds(s.model, s.objective, s.opt, views, args.steps, s.bf16))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print("| recipe | ms/step (median) | images/s | s per 60k epoch | params (M, encoder + head) "
          "|\n|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        params = sum(p.numel() for p in setups[name].opt.param_groups[0]["params"]) / 1e6
        print(f"| {name} | {1000 * med:.0f} | {args.batch / med:.0f} | {60000 / args.batch * med:.0f} | {params:.1f} |")


if __name__ == "__main__":
    main()
