"""Loading speed on this machine's CPU: torchvision against FFCV, and the .beton's max side. Figures, not tests.

    .venv/bin/python benchmarks/loader.py compare [--images 3000 --sizes 64 96 224 --rounds 3 --workers N --breakdown]
    .venv/bin/python benchmarks/loader.py beton-resolution [--images 300 --resolutions 256 500 --rounds 3]
    .venv/bin/python benchmarks/loader.py decode-once [--images 300 --compress-probabilities 1 0.5 --workers 1]

``compare`` (the default when no subcommand is named): two-view loading, torchvision (PIL decode + v2
transforms in DataLoader workers) against FFCV (.beton, jpg and raw). The data: RGB JPEGs of 96-160 px
(drawn procedurally, saved as an image folder), written once to .beton files with jpg and raw modes. Each
round times one epoch per loader, interleaved (torchvision, ffcv jpg, ffcv raw, ...), after a warm-up epoch
that pays FFCV's JIT compile. Both sides do RandomResizedCrop + flip + normalise for two views, batch 256,
drop_last; FFCV's batches go through pretraining's on-device step (BatchViews.colour) as in training.
``--breakdown`` adds FFCV handing uint8 crops to torch for normalising (the pipeline before FFCV normalised
on the CPU itself). Reported: median images/s (wall) and images per CPU-second (user + system time of the
process and its workers).

``beton-resolution`` (beton_resolution.py before the benchmarks were merged): the .beton's max side against file size and
loading speed, on ImageNet-sized (500 x 375) sources. Draws ``--images`` 500 x 375 RGB JPEGs with fine
detail (an image folder), writes one .beton per ``--max-resolution`` with the writer's defaults otherwise
(FFCV's ImageNet recipe: proportion mode, half as JPEG at quality 90), and times the training loader (two
224 px views: RandomResizedCrop + flip + normalise, batch 64, the machine's cores as FFCV threads) over
interleaved epochs after a JIT warm-up. Prints file size per 1000 images, median images/s and images per
CPU-second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infomax.config.pretrain import ViewConfig
from infomax.data import MultiViewDataset, build_view_transform
from infomax.data.batch_views import BatchViews
from infomax.data.beton import parse_args as beton_args
from infomax.data.beton import validate, write_beton
from infomax.data.datasets import ImageFolder
from infomax.data.ffcv_loader import FFCVMultiViewLoader


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(96, 161, size=2)
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1)
        noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(d / f"{i}.jpg", quality=90)


def time_epoch(batches) -> tuple[float, float, int]:
    c0, t0, n = cpu_seconds(), time.perf_counter(), 0
    for b in batches:
        n += b["views"][0].shape[0]
    return n / (time.perf_counter() - t0), n / max(cpu_seconds() - c0, 1e-9), n


def run_compare(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="infomax-loader-"))
    make_folder(tmp / "folder", args.images)
    folder = ImageFolder(str(tmp / "folder"), "train")
    betons = {}
    for mode in ("jpg", "raw"):
        out = tmp / f"{mode}.beton"
        ns = argparse.Namespace(dataset="imagefolder", root=str(tmp / "folder"), split="train", out=str(out),
                                write_mode=mode, max_resolution=256, jpeg_quality=90, compress_probability=0.5,
                                workers=args.workers, limit=0, synthetic_size=0, synthetic_image_size=0,
                                skip_unreadable=False, stall_timeout=300)
        write_beton(ns, validate(ns))
        betons[mode] = out

    results = {}
    for size in args.sizes:
        views = [ViewConfig(size=size, jitter_p=0.0, grayscale_p=0.0)] * 2
        transforms = [build_view_transform(v, 3, folder.mean, folder.std) for v in views]
        tv = torch.utils.data.DataLoader(MultiViewDataset(folder, transforms, seed=0), batch_size=args.batch,
                                         shuffle=True, drop_last=True, num_workers=args.workers)
        loaders = {"torchvision": lambda tv=tv: iter(tv)}
        colour = BatchViews(views, folder.mean, folder.std, seed=0).colour  # pretraining's on-device step
        for mode, path in betons.items():
            # ours; and, for the breakdown, the same pipeline handing uint8 crops to torch for normalising
            for name, in_ffcv in ((f"ffcv {mode}", True), (f"ffcv {mode}, normalised in torch", False)):
                if in_ffcv or args.breakdown:
                    ff = FFCVMultiViewLoader(str(path), views, args.batch, torch.device("cpu"), seed=0,
                                             distributed=False, num_workers=args.workers, normalise_in_ffcv=in_ffcv)
                    time_epoch(ff)  # warm-up: the JIT compile
                    loaders[name] = lambda ff=ff, colour=colour: ({**b, "views": colour(b["views"], 0, 0)} for b in ff)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in loaders}
        for _ in range(args.rounds):
            for name, make in loaders.items():
                wall, per_cpu, _ = time_epoch(make())
                runs[name].append((wall, per_cpu))
        for name, r in runs.items():
            results[f"{name} @ {size}px"] = {"images_per_s": statistics.median(w for w, _ in r),
                                             "images_per_cpu_s": statistics.median(c for _, c in r)}
        base = results[f"torchvision @ {size}px"]["images_per_cpu_s"]
        for name in runs:
            ratio = results[f"{name} @ {size}px"]["images_per_cpu_s"] / base
            results[f"{name} @ {size}px"]["vs_torchvision_per_cpu_s"] = round(ratio, 2)

    print(f"{args.images} JPEGs 96-160 px, 2 views, batch {args.batch}, {args.workers} workers, "
          f"median of {args.rounds} interleaved epochs")
    print("| loader | images/s | images per CPU-second | vs torchvision (per CPU-s) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['images_per_s']:.0f} | {r['images_per_cpu_s']:.0f} | "
              f"{r['vs_torchvision_per_cpu_s']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


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


def run_beton_resolution(args: argparse.Namespace) -> None:
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


def run_decode_once(args: argparse.Namespace) -> None:
    """Two 224 px views from one decode of each image against a decode per view, one FFCV thread each."""
    tmp = Path(tempfile.mkdtemp(prefix="infomax-decode-once-"))
    make_photos(tmp / "folder", args.images)
    views = [ViewConfig(size=224, jitter_p=0.8), ViewConfig(size=224, jitter_p=0.8, blur_p=0.1)]  # uint8 crops
    loaders = {}
    for probability in args.compress_probabilities:
        out = tmp / f"p{probability}.beton"
        ns = beton_args(["--dataset", "imagefolder", "--root", str(tmp / "folder"), "--out", str(out),
                         "--compress-probability", str(probability), "--workers", str(os.cpu_count() or 1)])
        write_beton(ns, validate(ns))
        for once in (False, True):
            loader = FFCVMultiViewLoader(str(out), views, args.batch, torch.device("cpu"), seed=0, distributed=False,
                                         num_workers=args.workers, decode_once=once)
            assert loader.decode_once == once
            time_epoch(loader)  # warm-up: the JIT compile
            loaders[probability, once] = loader
    runs: dict[tuple[float, bool], list[float]] = {key: [] for key in loaders}
    for _ in range(args.rounds):
        for key, loader in loaders.items():
            runs[key].append(time_epoch(loader)[0])
    print(f"{args.images} JPEGs 500 x 375 (proportion mode, quality 90), two 224 px views as uint8 crops, batch "
          f"{args.batch}, {args.workers} FFCV thread(s), median of {args.rounds} interleaved epochs")
    print("| share stored as JPEG | decodes per image | images/s | speed-up |\n|---|---|---|---|")
    for probability in args.compress_probabilities:
        before, after = (statistics.median(runs[probability, once]) for once in (False, True))
        print(f"| {probability:g} | 2 (a decode per view) | {before:.0f} | |")
        print(f"| {probability:g} | **1** (one decode, two crops) | {after:.0f} | **{after / before:.2f}x** |")


COMMANDS = ("compare", "beton-resolution", "decode-once")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]  # the flat form of older notes: compare's options
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="torchvision against FFCV (jpg, raw), two views (the default)",
                       description="Two-view loading speed: torchvision (PIL decode + v2 transforms in DataLoader "
                                   "workers) vs FFCV (.beton, jpg and raw) on this machine's CPU.")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 224])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", default="", help="also write the figures as JSON here")
    p.add_argument("--breakdown", action="store_true", help="also time FFCV handing uint8 crops to torch to normalise")
    p.set_defaults(run=run_compare)

    p = sub.add_parser("beton-resolution", help="the .beton's max side against file size and loading speed (was "
                                                "beton_resolution.py)",
                       description="The .beton's max side against file size and loading speed, on ImageNet-sized "
                                   "(500 x 375) sources.")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 500])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=64)
    p.set_defaults(run=run_beton_resolution)

    p = sub.add_parser("decode-once", help="two views cut from one decode of each image against a decode per view",
                       description="FFCV's two 224 px views from one decode of each JPEG (MultiCropDecoder) against "
                                   "a decode per view, on ImageNet-sized (500 x 375) sources.")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--compress-probabilities", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.set_defaults(run=run_decode_once)

    args = parser.parse_args(argv)
    args.run(args)

if __name__ == "__main__":
    main()
