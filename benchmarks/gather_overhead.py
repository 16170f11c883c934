"""What gathering negatives across ranks costs: 2 gloo ranks, gathered keys vs each rank's own keys.

    .venv/bin/python benchmarks/gather_overhead.py                       # demo encoder, 28 px, 128 per rank
    .venv/bin/python benchmarks/gather_overhead.py --arch resnet18 --size 32 --batch 64 --rounds 7

Both variants run the same DDP model, batch and optimizer on 2 CPU processes (one thread each); the
only difference is the contrastive objective's keys: ``gather_with_grad`` (W x B keys, gradient to
every rank) against the local B keys (``gather_with_grad`` and ``rank`` replaced by the identity and 0).
Rounds interleave the two variants; each round times ``--steps`` steps of each after a barrier. Prints
the median step time of each and the median of the per-round ratios (gathered / local).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infomax.config.pretrain import ModelConfig, ObjectiveConfig
from infomax.method.models import MultiViewModel
from infomax.method.objectives import build_objective, contrastive

WORLD = 2


def timed_steps(model, objective, optimizer, views, steps: int) -> float:
    """Seconds per step over ``steps`` steps (forward of 2 views, objective, backward, step)."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = objective(model(views))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def worker(rank: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    cfg = ModelConfig(arch=args.arch, small_input=True, stem_stride=args.stem_stride, width=args.width,
                      head_dims=[512, 128])
    model = torch.nn.parallel.DistributedDataParallel(MultiViewModel(cfg, 1, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(args.batch, 1, args.size, args.size, generator=g) for _ in range(2)]
    gathered = build_objective(ObjectiveConfig(temperature=0.2), num_views=2, embed_dim=128)
    real = contrastive.gather_with_grad, contrastive.own_rows
    local = (lambda x: x), (lambda b, device: torch.arange(b, device=device))  # this rank's keys alone
    timed_steps(model, gathered, optimizer, views, 2)  # warm-up
    times: dict[str, list[float]] = {"gathered": [], "local": []}
    for _ in range(args.rounds):
        contrastive.gather_with_grad, contrastive.own_rows = real
        times["gathered"].append(timed_steps(model, gathered, optimizer, views, args.steps))
        contrastive.gather_with_grad, contrastive.own_rows = local
        times["local"].append(timed_steps(model, gathered, optimizer, views, args.steps))
    if rank == 0:
        Path(tmp, "times.json").write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--stem-stride", type=int, default=2)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=128, help="images per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, tmp), nprocs=WORLD, join=True)
        times = json.loads(Path(tmp, "times.json").read_text())
    ratios = [a / b for a, b in zip(times["gathered"], times["local"])]
    print(f"{args.arch} w{args.width:g} s{args.stem_stride}, {args.size} px, {args.batch} images per rank x 2 views, "
          f"{WORLD} gloo ranks, {args.rounds} rounds x {args.steps} steps")
    print(f"gathered keys ({WORLD * args.batch}): {1000 * statistics.median(times['gathered']):.1f} ms/step (median)")
    print(f"local keys ({args.batch}):    {1000 * statistics.median(times['local']):.1f} ms/step (median)")
    print(f"ratio gathered / local: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f})")


if __name__ == "__main__":
    main()
