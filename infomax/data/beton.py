"""Write a dataset to an FFCV ``.beton`` file (the fast loading path), then read it back to check it.

    python -m infomax.data.beton --dataset imagefolder --root /datasets/imagenet --split train \\
        --out /fast/imagenet_train.beton --write-mode jpg --max-resolution 256 --jpeg-quality 90 --workers 16

Fields: ``image`` (RGB; one-channel datasets are stored as three equal channels and read back as
one) and ``label``. The settings are stored beside the file (``<out>.json``), so a run records how
its data was encoded. ffcv's writer waits forever when one of its workers dies; everything is
validated before writing, unreadable images are caught inside the workers, and the write runs in a
child process that is stopped when it makes no progress for ``--stall-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from infomax.config.pretrain import ConfigError
from infomax.data.beton_file import BetonImages, require_ffcv
from infomax.data.datasets import (
    REGISTRY,
    DataError,
    ImageDataset,
    ImageFolder,
    next_readable,
    open_dataset,
    root_named,
    stratified_subset,
)
from infomax.runtime.files import write_atomically

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
FATAL = "FATAL"
def as_rgb(image: np.ndarray) -> np.ndarray:
    """H x W x C uint8 -> H x W x 3, contiguous: ffcv stores RGB, so one-channel images are repeated."""
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)


class BetonSource:
    """Indexable view for ffcv's writer: i -> (H x W x 3 uint8 array, label).

    It never raises (a worker that raises hangs ffcv's writer): an unreadable image is replaced
    by the next readable one and its path appended to ``failures``; ``done`` counts samples so
    the parent can tell progress from a stall.
    """

    def __init__(self, base: ImageDataset, failures: Path, done: Any) -> None:
        self.base, self.failures, self.done = base, failures, done

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = int(index)  # ffcv hands numpy integers
        try:
            image, label, failures = next_readable(self.base, index)
        except Exception as e:  # none readable, or anything else: tell the parent, which stops the writer at once
            self._record(f"{FATAL} image {index}: {type(e).__name__}: {e}")
            raise
        for failure in failures:
            self._record(str(failure))
        with self.done.get_lock():
            self.done.value += 1
        return as_rgb(np.asarray(image).transpose(1, 2, 0)), int(label)

    def _record(self, line: str) -> None:
        with open(self.failures, "a") as f:
            f.write(line.replace("\n", " ") + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write a dataset to an FFCV .beton file and check it.")
    p.add_argument("--dataset", required=True, choices=tuple(REGISTRY), help="dataset kind")
    p.add_argument("--root", default="", help="dataset directory (imagefolder: holds <split>/<class>/<image>)")
    p.add_argument("--split", default="train", choices=("train", "test", "val"), help="split to write (val = test)")
    p.add_argument("--out", required=True, help="output .beton path")
    # The defaults are FFCV's own ImageNet recipe (max side 500, proportion mode, half JPEG at quality 90):
    # a 500 x 375 ImageNet image is kept as it is, so a 224 crop is downsampled from the source pixels as
    # torchvision's path does, never upsampled from a smaller stored copy (benchmarks/results/loading.md, max side).
    p.add_argument("--write-mode", default="proportion", help=f"one of {', '.join(WRITE_MODES)}")
    p.add_argument("--max-resolution", type=int, default=500, help="longer side is resized down to this (0 = keep)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5, help="proportion mode: share stored as JPEG")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, default=0, help="write only N images, each class in proportion (0 = all)")
    p.add_argument("--synthetic-size", type=int, default=2048, help="synthetic: images")
    p.add_argument("--synthetic-image-size", type=int, default=32, help="synthetic: image side")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="store the next readable image in place of an unreadable one (default: fail)")
    p.add_argument("--stall-timeout", type=float, default=300, help="seconds without progress before giving up")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> ImageDataset:
    """Everything checked before the writer starts; returns the dataset to write."""
    def bad(flag: str, msg: str) -> ConfigError:
        return ConfigError(f"bad value for {flag}: {msg}")

    if args.write_mode not in WRITE_MODES:
        raise bad("--write-mode", f"'{args.write_mode}' is not one of {', '.join(WRITE_MODES)}")
    if not 1 <= args.jpeg_quality <= 100:
        raise bad("--jpeg-quality", f"{args.jpeg_quality} is not in 1..100")
    if not 0 <= args.compress_probability <= 1:
        raise bad("--compress-probability", f"{args.compress_probability} is not in [0, 1]")
    if not args.stall_timeout > 0:
        raise bad("--stall-timeout", f"{args.stall_timeout} is not a number of seconds > 0")
    if args.workers < 1 or args.max_resolution < 0 or args.limit < 0:
        raise bad("--workers/--max-resolution/--limit", "workers must be >= 1, the others >= 0")
    out = Path(args.out)
    if out.suffix != ".beton":
        raise bad("--out", f"'{out}' should end in .beton")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise bad("--out", f"directory '{out.parent}' does not exist or is not writable")
    with root_named("--root"):
        dataset = open_dataset(args.dataset, "train" if args.split == "train" else "test", args.root,
                               synthetic_size=args.synthetic_size, synthetic_image_size=args.synthetic_image_size)
    if args.limit:
        dataset = stratified_subset(dataset, args.limit)  # a prefix of a class-sorted folder: its first classes
    if len(dataset) == 0:
        raise DataError(f"the {args.split} split of {args.dataset} is empty: check --root")
    check = getattr(dataset, "check_readable", None) or getattr(getattr(dataset, "base", None), "check_readable", None)
    if check:
        check()
    return dataset


def _write(out: str, source: BetonSource, fields: dict[str, Any], workers: int) -> None:
    os.setpgrp()  # the parent can stop the writer and all of its workers as one group
    # A spawned process starts its own children the same way, so ffcv's workers would each import torch, ffcv and the
    # dataset's modules again (about 10 s each, before the first image). Forking them is safe here: this process has
    # run no torch or numba thread pool yet.
    mp.set_start_method("fork", force=True)
    from ffcv.writer import DatasetWriter

    DatasetWriter(out, fields, num_workers=workers).from_indexed_dataset(source, chunksize=64)


# What the writer's fork server imports once. Python has one fork server a process: whoever starts it first
# sets its imports, so another user of it (the tests' ranks) asks for these too.
WRITER_PRELOAD = ["torch", "ffcv.writer", "infomax.data", "infomax.data.beton_file", "infomax.runtime.files"]


def writer_context() -> Any:
    """Where the writer process starts. Forking this one, which may already run torch/numba thread pools, can deadlock
    the writer's own forked workers. A fork server has imported the writer's modules and run nothing, so each writer
    forked from it starts at once (a spawned one imported them each time, about 10 s). Not this module itself:
    run as ``python -m infomax.data.beton`` it is the main module, which the writer re-runs by name, and runpy warns
    when that name is already imported."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WRITER_PRELOAD)
    return ctx


def write_beton(args: argparse.Namespace, dataset: ImageDataset) -> dict[str, Any]:
    """Write under a stall guard; returns the settings stored in ``<out>.json``."""
    from ffcv.fields import IntField, RGBImageField

    from infomax.runtime.tracking import progress_bar

    out = Path(args.out)
    failures = out.with_name(out.name + ".unreadable")
    failures.unlink(missing_ok=True)
    ctx = writer_context()
    done = ctx.Value("q", 0)
    fields = {"image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_resolution or None,
                                     jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability),
              "label": IntField()}
    child = ctx.Process(target=_write, args=(str(out), BetonSource(dataset, failures, done), fields,
                                                  args.workers))
    started = time.perf_counter()
    child.start()
    last, last_change = 0, time.monotonic()
    bar = progress_bar(len(dataset), desc=f"write {out.name}", unit="img")
    try:
        while child.is_alive():
            child.join(0.5)
            fatal = [line for line in (failures.read_text().splitlines() if failures.is_file() else [])
                     if line.startswith(FATAL)]
            if fatal:
                os.killpg(child.pid, signal.SIGKILL)
                child.join()
                failures.unlink(missing_ok=True)
                raise RuntimeError(f"the FFCV writer stopped: {fatal[0][len(FATAL) + 1:]}")
            if done.value != last:
                bar.update(done.value - last)
                last, last_change = done.value, time.monotonic()
            elif time.monotonic() - last_change > args.stall_timeout:
                os.killpg(child.pid, signal.SIGKILL)
                child.join()
                raise RuntimeError(f"the FFCV writer made no progress for {args.stall_timeout:.0f}s at "
                                   f"{last}/{len(dataset)} images (a writer worker probably died); nothing usable "
                                   f"was written to {out}")
    finally:
        bar.close()
    if child.exitcode != 0:
        raise RuntimeError(f"the FFCV writer failed (exit code {child.exitcode}); see the messages above")
    unreadable = failures.read_text().splitlines() if failures.is_file() else []
    failures.unlink(missing_ok=True)
    if unreadable and not args.skip_unreadable:
        out.unlink(missing_ok=True)
        raise DataError(f"{len(unreadable)} unreadable images, e.g. {unreadable[0]}; fix or remove them, or pass "
                        "--skip-unreadable to store the next readable image in their place")
    settings = {"dataset": args.dataset, "root": str(Path(args.root).resolve()) if args.root else "",
                "split": args.split, "count": len(dataset), "channels": dataset.channels,
                "num_classes": dataset.num_classes, "class_names": class_names(dataset),
                "mean": list(dataset.mean), "std": list(dataset.std),
                "write_mode": args.write_mode, "max_resolution": args.max_resolution, "jpeg_quality": args.jpeg_quality,
                "compress_probability": args.compress_probability, "unreadable_replaced": unreadable[:20],
                "seconds": round(time.perf_counter() - started, 1), "bytes": out.stat().st_size}
    write_atomically(Path(str(out) + ".json"), json.dumps(settings, indent=2) + "\n")
    return settings


def class_names(dataset: ImageDataset) -> list[str] | None:
    """An image folder's class names in label order (a run's kNN queries read from val/ are numbered by them), or
    None for a dataset whose classes have no names."""
    folder = getattr(dataset, "base", dataset)
    return list(folder.classes) if isinstance(folder, ImageFolder) else None


def stored_sizes(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of every image as stored in a .beton (after --max-resolution)."""
    images = BetonImages(str(path)).images
    return np.asarray(images["height"]), np.asarray(images["width"])


def read_back(out: Path, dataset: ImageDataset, samples: int = 8) -> None:
    """Count, every label, and the first ``samples`` images against the source, read from the file one sample at a
    time (:class:`~infomax.data.beton_file.BetonImages`, as an FFCV run's kNN bank reads it; an FFCV Loader would
    JIT-compile for about 15 s, and decodes images of varied sizes only through a crop). An image stored raw equals
    its source; one stored as JPEG is within 2 levels of its source through the same encoder (JPEG drops detail by
    design: 9-13 levels on synthetic images at quality 90); one resized by --max-resolution is not compared."""
    stored = BetonImages(str(out))
    settings = stored.info.settings
    if len(stored) != len(dataset):
        raise RuntimeError(f"read-back: {out} holds {len(stored)} samples, expected {len(dataset)}")
    # With replaced unreadable images the stored labels are their neighbours': nothing to compare.
    expected = stored.labels if settings["unreadable_replaced"] else np.array([dataset.label(i) for i in
                                                                              range(len(dataset))])
    if not np.array_equal(stored.labels, expected):
        raise RuntimeError(f"read-back: labels in {out} differ from the source at "
                           f"{int(np.argmax(stored.labels != expected))}")
    limit = settings["max_resolution"]
    for i in range(min(samples, len(dataset))):
        source = dataset.load(i)[0]
        if limit and max(source.shape[1:]) > limit:
            continue  # resized on writing: nothing to compare pixel for pixel
        image = stored.load(i)[0]
        if image.shape != source.shape:
            raise RuntimeError(f"read-back: image {i} of {out} is {tuple(image.shape)}, its source "
                               f"{tuple(source.shape)}")
        if stored.stored_as_jpeg(i):
            reference = torch.from_numpy(jpeg_round_trip(source.numpy().transpose(1, 2, 0),
                                                         settings["jpeg_quality"]).transpose(2, 0, 1))
            error = (image.to(torch.int16) - reference).abs().float().mean().item()
            if error > 2.0:
                raise RuntimeError(f"read-back: image {i} of {out} differs from the source after JPEG at quality "
                                   f"{settings['jpeg_quality']} (mean abs error {error:.2f} levels)")
        elif not torch.equal(image, source):
            error = (image.to(torch.int16) - source.to(torch.int16)).abs().float().mean().item()
            raise RuntimeError(f"read-back: image {i} of {out} differs from the source (mean abs error {error:.1f})")


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """H x W x C uint8 -> the same after ffcv's JPEG encoding at ``quality`` and a decode (int16)."""
    import cv2
    from ffcv.fields.rgb_image import encode_jpeg

    decoded = cv2.cvtColor(cv2.imdecode(encode_jpeg(as_rgb(image), quality), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return decoded[..., : image.shape[2]].astype(np.int16)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_ffcv()
        dataset = validate(args)
        settings = write_beton(args, dataset)
        read_back(Path(args.out), dataset)
    except (ConfigError, DataError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mb = settings["bytes"] / 2**20
    print(f"wrote {args.out}: {settings['count']} images ({settings['write_mode']}, max side "
          f"{settings['max_resolution'] or 'as is'}), {mb:.1f} MiB in {settings['seconds']:.0f}s; read back: "
          f"count, labels and sample images match; settings in {args.out}.json")
    if settings["unreadable_replaced"]:
        print(f"warning: {len(settings['unreadable_replaced'])} unreadable images were replaced by their next "
              "readable neighbour (listed in the .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
