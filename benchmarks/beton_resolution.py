"""The .beton's max side against file size and loading speed, on ImageNet-sized (500 x 375) sources.

    .venv/bin/python benchmarks/beton_resolution.py [--images 300 --resolutions 256 500 --rounds 3]

Draws ``--images`` 500 x 375 RGB JPEGs with fine detail (an image folder), writes one .beton per
``--max-resolution`` with the writer's defaults otherwise (FFCV's ImageNet recipe: proportion mode,
half as JPEG at quality 90), and times the training loader (two 224 px views: RandomResizedCrop +
flip + normalise, batch 64, the machine's cores as FFCV threads) over interleaved epochs after a
JIT warm-up. Prints file size per 1000 images, median images/s and images per CPU-second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from loader import time_epoch  # benchmarks/loader.py, beside this script
from PIL import Image

from pretrain.config import ViewConfig
from pretrain.data.beton import parse_args as beton_args
from pretrain.data.beton import validate, write_beton
from pretrain.data.ffcv_loader import FFCVMultiViewLoader


def make_photos(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        d = root / "train" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(1.5, 6.0, size=3)
        image = np.stack([127 + 100 * np.sin(xx / f[c] + c + i) * np.cos(yy / (f[c] * 1.3) + i) for c in range(3)], -1)
        noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(d / f"{i}.jpg", quality=95)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 500])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="infomax-beton-res-"))
    make_photos(tmp / "folder", args.images)
    views = [ViewConfig(size=224, jitter_p=0.0, grayscale_p=0.0)] * 2
    loaders, sizes = {}, {}
    for res in args.resolutions:
        out = tmp / f"r{res}.beton"
        ns = beton_args(["--dataset", "imagefolder", "--root", str(tmp / "folder"), "--out", str(out),
                         "--max-resolution", str(res), "--workers", str(args.workers)])
        write_beton(ns, validate(ns))
        sizes[res] = out.stat().st_size / 2**20 * 1000 / args.images
        loader = FFCVMultiViewLoader(str(out), views, args.batch, torch.device("cpu"), seed=0, distributed=False,
                                     num_workers=args.workers)
        time_epoch(loader)  # warm-up: the JIT compile
        loaders[res] = loader
    runs: dict[int, list[tuple[float, float]]] = {r: [] for r in loaders}
    for _ in range(args.rounds):
        for res, loader in loaders.items():
            wall, per_cpu, _ = time_epoch(loader)
            runs[res].append((wall, per_cpu))
    print(f"{args.images} JPEGs 500 x 375, proportion mode (compress probability 0.5, quality 90), two 224 px views, "
          f"batch {args.batch}, {args.workers} FFCV threads, median of {args.rounds} interleaved epochs")
    print("| --max-resolution | stored as | MiB per 1000 images | images/s | images per CPU-second "
          "|\n|---|---|---|---|---|")
    for res, r in runs.items():
        stored = "500 x 375 (as is)" if res >= 500 else f"{res} x {round(375 * res / 500)}"
        print(f"| {res} | {stored} | {sizes[res]:.1f} | {statistics.median(w for w, _ in r):.0f} | "
              f"{statistics.median(c for _, c in r):.0f} |")


if __name__ == "__main__":
    main()
