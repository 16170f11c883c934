"""Pretraining throughput: our train_step on synthetic batches, each encoder recipe's compute step, the CPU split.

    python benchmarks/throughput.py train-step --arch resnet50 --size 224 --batch 128 --precision bf16 --channels-last --seconds 100
    .venv/bin/python benchmarks/throughput.py encoders --size 28 --batch 256 --rounds 5 [--channels-last --bf16 | --bf16-only] [--compile] [--only NAME ...]
    .venv/bin/python benchmarks/throughput.py cpu-split --steps 20 --rounds 3 [overrides of configs/fmnist_cpu.yaml]

``train-step`` (the default when no subcommand is named; gpu_check.sh runs it): images/s of
infomax.train.engine.train_step on synthetic in-memory batches (no loader), the median over 10-step windows
after warm-up; with --json PATH it also writes the figures.

``encoders`` (encoder_cost.py before the benchmarks were merged): the cost of one training step (forward + backward of 2
views, projection head, InfoNCE) per encoder recipe, on synthetic 1-channel batches, no loader, this
process's threads only: the compute side of the recipe study in benchmarks/results/recipe_study.md.
Rounds are interleaved so that the machine's drift hits every recipe alike; the median per recipe
is printed.

``cpu-split`` (cpu_split.py before the benchmarks were merged): the demo's whole pretraining (configs/fmnist_cpu.yaml) on
this CPU under each way of splitting the cores between compute and loading, and channels_last: ``--steps``
optimizer steps per variant, monitors off, rounds interleaved so that drift hits every variant alike; prints
the median images/s of the training loop (from the run's own summary line, which excludes start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2

from infomax.config.pretrain import ModelConfig, ObjectiveConfig
from infomax.method.models import MultiViewModel
from infomax.method.objectives import build_objective
from infomax.train.engine import train_step

REPO = Path(__file__).resolve().parents[1]


# ---- train-step: images/s of our train_step on synthetic batches -----------------------------------------------

def run_train_step(args: argparse.Namespace) -> None:
    accelerator = Accelerator(mixed_precision=args.precision)
    cfg = ModelConfig(arch=args.arch, small_input=False, head_dims=[2048, 128], channels_last=args.channels_last)
    model = MultiViewModel(cfg, 3, 2)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="lars", lr=0.1, momentum=0.9, weight_decay=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = build_objective(ObjectiveConfig(temperature=0.1), num_views=2, embed_dim=128)
    views = [torch.randn(args.batch, 3, args.size, args.size, device=accelerator.device) for _ in range(2)]

    def window(steps: int) -> float:
        start = time.perf_counter()
        for i in range(steps):
            train_step(accelerator, model, objective, optimizer, views, grad_clip=0.0, skip_nonfinite=False,
                       step=i, channels_last=args.channels_last)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return args.batch * steps / (time.perf_counter() - start)

    window(5)  # warm-up: cudnn autotuning, allocator
    rates, end = [], time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        rates.append(window(10))
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"
    result = {
        "device": device, "arch": args.arch, "size": args.size, "batch_per_view": args.batch,
        "precision": args.precision, "channels_last": args.channels_last, "windows": len(rates),
        "images_per_s_median": statistics.median(rates), "images_per_s_max": max(rates),
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


# ---- encoders: the compute step of each encoder recipe ---------------------------------------------------------

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


def run_encoders(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    views = [torch.randn(args.batch, 1, args.size, args.size).to(memory_format=fmt) for _ in range(2)]
    setups = {}
    precisions = (True,) if args.bf16_only else (False, True)[:1 + args.bf16]
    for name, over, bf16, compiled in [(n, o, b, c) for n, o in RECIPES.items() for b in precisions
                                       for c in (False, True)[:1 + args.compile]]:
        if args.only and name not in args.only:
            continue
        name += (" bf16" if bf16 else "") + (" compiled" if compiled else "")
        model = MultiViewModel(ModelConfig(**over), 1, 2).to(memory_format=fmt)
        objective = build_objective(ObjectiveConfig(temperature=0.2), num_views=2, embed_dim=128)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = torch.compile(model) if compiled else model
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


# ---- cpu-split: the demo's whole pretraining under each split of the cores -------------------------------------

VARIANTS: dict[str, list[str]] = {
    "loader augment, 2 workers": ["data.augment=loader", "data.num_workers=2"],
    "loader augment, 1 worker": ["data.augment=loader", "data.num_workers=1"],
    "batch augment, 0 workers": ["data.augment=batch", "data.num_workers=0"],
    "batch augment, 1 worker": ["data.augment=batch", "data.num_workers=1"],
    "batch augment, 0 workers, channels_last": ["data.augment=batch", "data.num_workers=0", "model.channels_last=true"],
}


def images_per_s(overrides: list[str], steps: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "pretrain/main.py", "--config", "configs/fmnist_cpu.yaml", f"run.dir={tmp}/run",
               f"run.max_steps={steps}", "monitor.knn_every=0", "monitor.online_probe=false", "run.export=false",
               *overrides]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}).stdout
    done, seconds = re.search(r"(\d+) steps in (\d+)s", out).groups()
    return int(done) * batch / float(seconds)


def run_cpu_split(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, over in VARIANTS.items():
            rates[name].append(images_per_s([*args.overrides, *over], args.steps, args.batch))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(rates[next(iter(VARIANTS))])
    print("| variant | images/s (median) | vs first |\n|---|---|---|")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med / base:.2f}x |")


COMMANDS = ("train-step", "encoders", "cpu-split")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train-step", *argv]  # the flat form gpu_check.sh and older notes use: train-step's options
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-step", help="images/s of our train_step on synthetic batches (the default)",
                       description="Pretraining step throughput on synthetic in-memory batches (no loader): "
                                   "images/s of our train_step.")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="images per view per step")
    p.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seconds", type=float, default=100.0, help="timed duration after warm-up")
    p.add_argument("--json", help="write the figures to this file")
    p.set_defaults(run=run_train_step)

    p = sub.add_parser("encoders", help="ms/step of each encoder recipe's compute step (was encoder_cost.py)",
                       description="Cost of one training step (forward + backward of 2 views, projection head, "
                                   "InfoNCE) per encoder recipe, synthetic batches, no loader.")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="also time each recipe torch.compile'd (inductor, CPU C++ codegen), interleaved")
    p.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="also time each recipe under bf16 autocast, interleaved")
    precision.add_argument("--bf16-only", action="store_true", help="time each recipe under bf16 autocast only")
    p.set_defaults(run=run_encoders)

    p = sub.add_parser("cpu-split", help="images/s of the demo's pretraining per split of the CPU cores (was "
                                         "cpu_split.py)",
                       description="Pretraining speed on this CPU: how to split the cores between compute and "
                                   "loading, channels_last.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=256, help="must equal optim.batch_size_per_process of the config")
    p.add_argument("overrides", nargs="*", help="applied to every variant, e.g. model.width=0.5")
    p.set_defaults(run=run_cpu_split)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
