"""The FFCV path's colour steps: per image (torchvision, one image at a time, as before) against batched
(``BatchViews.colour``, what training runs now), on uint8 crops as FFCV hands them over.

    .venv/bin/python benchmarks/studies/colour_steps.py --batch 256 --size 224 --rounds 5

Two views of B images each, SimCLR's colour recipe (jitter 0.8 with brightness, contrast, saturation
0.4 and hue 0.1, grayscale 0.2, blur 0.5), then normalisation. Rounds alternate the two sides so that
the machine's drift hits both; the median seconds per step (both views) are printed with their ratio,
and the ATen operator calls of one step under torch.profiler: every call nested in another included,
so an upper bound on the kernels a GPU would launch for it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torchvision.transforms import v2

from infomax.config.pretrain import ViewConfig
from infomax.data.batch_views import BatchViews
from infomax.data.transforms import normalise_steps, random_colour_steps
from infomax.runtime.hardware import describe_machine

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def per_image(views: list[ViewConfig]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """What the FFCV path ran before: each view's torchvision colour steps image by image, then normalise."""
    steps = [v2.Compose(random_colour_steps(v, 3)) for v in views]
    normalise = v2.Compose(normalise_steps(MEAN, STD))
    return lambda crops: [normalise(torch.stack([s(img) for img in x])) for x, s in zip(crops, steps)]


def aten_calls(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    views = [ViewConfig(size=args.size, blur_p=0.5)] * 2
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
             for _ in views]
    batched = BatchViews(views, MEAN, STD, seed=0)
    sides = {"per image (torchvision)": per_image(views),
             "batched (BatchViews.colour)": lambda c: batched.colour(c, epoch=0, batch=0)}
    for run in sides.values():
        run(crops)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, run in sides.items():
            t0 = time.perf_counter()
            run(crops)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    calls = {name: aten_calls(lambda run=run: run(crops)) for name, run in sides.items()}
    print(f"\n{len(views)} views x {args.batch} images of {args.size} px, {torch.get_num_threads()} threads, "
          f"on {describe_machine()}\n")
    print("| colour steps | s per step (median) | ATen calls per step |\n|---|---|---|")
    for name in sides:
        print(f"| {name} | {statistics.median(times[name]):.3f} | {calls[name]} |")
    per, bat = (statistics.median(times[n]) for n in sides)
    names = list(sides)
    print(f"\nbatched / per image: {per / bat:.1f}x faster, {calls[names[0]] / calls[names[1]]:.0f}x fewer ATen calls")


if __name__ == "__main__":
    main()
