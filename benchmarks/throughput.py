"""Pretraining step throughput on synthetic in-memory batches (no loader): images/s of our train_step.

    python benchmarks/throughput.py --arch resnet50 --size 224 --batch 128 --precision bf16 --channels-last --seconds 100

Prints the median images/s over 10-step windows after warm-up; with --json PATH also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2

from pretrain.config import ModelConfig
from pretrain.engine import train_step
from pretrain.models import MultiViewModel
from pretrain.objectives import ContrastiveObjective


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="images per view per step")
    p.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seconds", type=float, default=100.0, help="timed duration after warm-up")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()

    accelerator = Accelerator(mixed_precision=args.precision)
    cfg = ModelConfig(arch=args.arch, small_input=False, head_dims=[2048, 128], channels_last=args.channels_last)
    model = MultiViewModel(cfg, 3, 2)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="lars", lr=0.1, momentum=0.9, weight_decay=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = ContrastiveObjective(0.1)
    views = [torch.randn(args.batch, 3, args.size, args.size, device=accelerator.device) for _ in range(2)]

    def window(steps: int) -> float:
        start = time.perf_counter()
        for i in range(steps):
            train_step(accelerator, model, objective, optimizer, views, grad_clip=0.0, skip_nonfinite=False,
                       stop_requested=False, step=i, channels_last=args.channels_last)
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


if __name__ == "__main__":
    main()
