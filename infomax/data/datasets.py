"""Dataset registry: a dataset name -> a map-style dataset of uint8 images (C x H x W) and labels.

Independent of any configuration: the pretraining (:mod:`infomax.data.train_loader`) and the eval stage
open datasets through :func:`open_dataset` with their own settings. Labels are never used for
pretraining; they feed the online kNN monitor and the eval.
"""

from __future__ import annotations

import copy
import gzip
import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

FMNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Data a user pointed us at cannot be used; the message names the path and the fix. The entry points
    print it as one ``error:`` line and exit 2, as they do a config error."""


class MissingSplit(DataError):
    """The split is not there at all (no files, no directory): a dataset without a held-out split. A split that is
    there but cannot be read is a DataError of its own, never taken for a missing one."""


class UnreadableImage(Exception):
    """One image could not be decoded; carries its path so it can be reported."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def next_readable(base: "ImageDataset", index: int) -> tuple[torch.Tensor, int, list[UnreadableImage]]:
    """Image ``index``, or the next readable one after it (wrapping around); also the failures on the way.

    The one place that skips unreadable images: the training loader (which counts and reports them),
    the eval features, the .beton writer and the start-up check all go through it."""
    failures: list[UnreadableImage] = []
    for attempt in range(len(base)):
        try:
            image, label = base.load((index + attempt) % len(base))
            return image, label, failures
        except UnreadableImage as e:
            failures.append(e)
    raise DataError(f"no image of the {len(base)} in the dataset can be decoded"
                    + (f" (e.g. {failures[0]})" if failures else "") + "; check the files or data.root")


class ImageDataset(torch.utils.data.Dataset):
    """Base: ``load(i)`` returns (uint8 C x H x W tensor, int label) or raises UnreadableImage."""

    channels: int = 3
    num_classes: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    same_size: bool = False  # every image has one size, so loaded batches collate: views can be drawn per batch

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def label(self, index: int) -> int:
        """The label alone (subclasses answer without decoding the image)."""
        return self.load(index)[1]

    def load_many(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """B same-size images (B x C x H x W uint8) and labels (B) in one step, for in-memory datasets
        whose images are all readable; None (the default) where images are loaded one by one."""
        return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index)

    def rows(self, indices: Sequence[int]) -> ImageDataset | None:
        """A dataset of these images alone, in this order, that holds nothing of the others: what a :class:`Subset`
        sends to a worker process that is not forked (a fork server's), rather than the whole table of a folder or
        a .beton (1.28M entries on ImageNet, for each worker of each kNN pass). None (the default) where the whole
        dataset is cheap to send: in memory (shared when pickled) or drawn from a seed."""
        return None


# --------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    """Read an idx (optionally .gz) file as a numpy array (LeCun's MNIST format)."""
    way_out = ("reinstall it with 'apt-get install --reinstall dataset-fashion-mnist', or copy it again "
               "into data.root")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"'{path}' is a damaged gzip file ({e}): {way_out}") from None
    # idx: two zero bytes, the type (0x08 = uint8), the number of dimensions, then each size as 4 bytes.
    ndim = data[3] if len(data) >= 4 else 0
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or ndim == 0:
        raise DataError(f"'{path}' is not a uint8 idx file (LeCun's MNIST format): {way_out}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise DataError(f"'{path}' holds {len(data)} bytes where its header promises {expected} "
                        f"({' x '.join(map(str, shape))} images), so it was cut short: {way_out}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(base: Path, stem: str) -> Path | None:
    """``stem.gz`` or ``stem`` under ``base``, whichever exists."""
    return next((p for p in (base / f"{stem}.gz", base / stem) if p.is_file()), None)


class FashionMNIST(ImageDataset):
    """Fashion-MNIST from the idx files (Debian package dataset-fashion-mnist): 1 x 28 x 28."""

    channels, num_classes, mean, std, same_size = 1, 10, (0.2860,), (0.3530,), True
    files = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}

    def __init__(self, root: str, split: str = "train") -> None:
        base = Path(root or FMNIST_DEFAULT_ROOT)
        stem = self.files[split]
        images, labels = _find_idx(base, stem), _find_idx(base, stem.replace("images-idx3", "labels-idx1"))
        if images is None or labels is None:
            raise MissingSplit(
                f"Fashion-MNIST {split} files ({stem}[.gz]) not found in '{base}': "
                "install them with 'apt-get install dataset-fashion-mnist' or set data.root=/dir/with/idx/files"
            )
        self.images = torch.from_numpy(_read_idx(images).copy())  # N x 28 x 28 uint8
        self.labels = torch.from_numpy(_read_idx(labels).astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index][None], int(self.labels[index])

    def load_many(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B images (B x 1 x 28 x 28 uint8) and labels (B) in one indexing step: the eval transform then
        runs once per batch (:class:`infomax.features.extract.ImageListDataset`) instead of once per image."""
        i = torch.as_tensor(indices, dtype=torch.long)
        return self.images[i][:, None], self.labels[i]

    def label(self, index: int) -> int:
        return int(self.labels[index])


# --------------------------------------------------------------------------- synthetic
class Synthetic(ImageDataset):
    """Deterministic procedurally drawn images with a learnable class structure (for tests).

    Image i belongs to class ``i % classes``. Each class has its own grating orientation and
    frequency and its own colour; each image has its own phase, blob position and pixel noise,
    all drawn from a generator seeded by (seed, i), so the same index always gives the same image.
    """

    mean, std, same_size = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True

    def __init__(self, size: int, classes: int, image_size: int, seed: int) -> None:
        self.size, self.classes, self.image_size, self.seed = size, classes, image_size, seed
        self.num_classes = classes

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return index % self.classes

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        c = index % self.classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.image_size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        angle = math.pi * c / self.classes
        freq = 2.0 + 2.0 * (c % 3)
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        grating = torch.sin(freq * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
        cx, cy = (torch.rand(2, generator=g) * 1.2 - 0.6).tolist()
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.08)
        hue = 2 * math.pi * c / self.classes
        colour = torch.tensor([math.cos(hue), math.cos(hue - 2.094), math.cos(hue + 2.094)]) * 0.5 + 0.5
        img = 0.5 + 0.3 * grating[None] * colour[:, None, None] + 0.3 * blob[None] * (1 - colour[:, None, None])
        img = img + 0.05 * torch.randn(3, s, s, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), c


# --------------------------------------------------------------------------- image folder
def eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit grey image (PNG, TIFF: Pillow's modes I;16* and I) scaled to 8 bits; Pillow's own conversion to RGB
    clips every value above 255, which turns such an image almost white. Mode I (32-bit) is scaled by the range its
    values use: 8 or 16 bits, or its own maximum. Other images as they are."""
    if not im.mode.startswith("I"):
        return im
    top = 65535 if im.mode.startswith("I;16") else max(255, im.getextrema()[1])
    top = 65535 if 255 < top <= 65535 else top
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) * 255 / top + 0.5, 0, 255).astype(np.uint8), "L")


# What a folder of one class usually is: the class folders one level deeper than the split's.
ONE_CLASS_HINT = ("if the class folders sit one level deeper (<root>/train/<x>/<class>/), point the root at the "
                  "folder whose train/ holds them")


def class_folders(split_dir: Path) -> list[str]:
    """The class folders of one split, sorted; hidden ones (``.ipynb_checkpoints``, ``.snapshot``) are not classes."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


class ImageFolder(ImageDataset):
    """ImageNet layout ``<root>/<split>/<class>/<image>``; unreadable files raise UnreadableImage."""

    def __init__(self, root: str, split: str = "train") -> None:
        base = self.find(root, split)
        self.split_dir, own = base, class_folders(base)
        self.classes, self.num_classes = own, len(own)
        self.samples, empty = [], []
        for label, cls in enumerate(own):
            files = [p for p in sorted((base / cls).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS
                     and not any(part.startswith(".") for part in p.relative_to(base).parts)]  # ._x.jpg, .snapshot/
            self.samples += [(str(p), label) for p in files]
            empty += [] if files else [cls]
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{base}/<class>/': check data.root")
        if empty and split == "train":  # a class never learnt: its scores, and the kNN bank's refusals, would mislead
            raise DataError(f"{len(empty)} class folder(s) of '{base}' hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}; add their images (other "
                            "formats converted) or remove the folder(s)")
        # Labels are numbered by train/'s class folders in every split: val/ numbering its own would shift every
        # label after a class it lacks, and each score would silently count the wrong class. A val/ with no train/
        # beside it (an FFCV run's queries) is numbered by the .beton's classes instead (number_classes_as).
        if split != "train" and (train := Path(root) / "train").is_dir():
            self.number_classes_as(class_folders(train), f"'{train}'")

    def number_classes_as(self, classes: Sequence[str], source: str) -> None:
        """Number the labels by ``classes``, the class folders of the images they are compared with (train/'s, or
        those a .beton was written from, named by ``source``); a class ``classes`` lacks is refused."""
        if extra := sorted(set(self.classes) - set(classes)):
            raise DataError(f"'{self.split_dir}' holds class folder(s) that {source} lacks ({', '.join(extra[:5])}"
                            f"{', ...' if len(extra) > 5 else ''}): labels are numbered by {source}'s classes; "
                            f"give {self.split_dir.name}/ only classes of {source}")
        label_of = {cls: label for label, cls in enumerate(classes)}
        self.samples = [(path, label_of[self.classes[label]]) for path, label in self.samples]
        self.classes, self.num_classes = list(classes), len(classes)

    @staticmethod
    def find(root: str, split: str) -> Path:
        """``<root>/<split>``, or MissingSplit saying how to set the root."""
        base = Path(root) / split
        if not root or not base.is_dir():
            raise MissingSplit(
                f"imagefolder split directory '{base}' does not exist: set data.root to a directory "
                f"holding {split}/<class>/<image> (e.g. data.root=/datasets/imagenet)"
            )
        return base

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def rows(self, indices: Sequence[int]) -> ImageFolder:
        kept = copy.copy(self)
        kept.samples = [self.samples[i] for i in indices]
        return kept

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                rgb = np.asarray(eight_bit(im).convert("RGB"))
        except Exception as e:  # PIL raises many types for damaged files
            raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous(), label

    def check_readable(self) -> None:
        """Fail at start when no image can be decoded (tries files in order until one works)."""
        try:
            next_readable(self, 0)
        except DataError:
            raise DataError(f"none of the {len(self.samples)} images under '{self.samples[0][0].rsplit('/', 2)[0]}' "
                            "can be decoded: check the files (e.g. with PIL) or data.root") from None


# --------------------------------------------------------------------------- registry
def _synthetic(split: str, root: str = "", *, synthetic_size: int = 2048, synthetic_classes: int = 8,
               synthetic_image_size: int = 32, seed: int = 0) -> ImageDataset:
    size = synthetic_size if split == "train" else max(synthetic_size // 4, 2 * synthetic_classes)
    # The held-out split draws from another seed: different images, same classes.
    return Synthetic(size, synthetic_classes, synthetic_image_size, seed=seed + (0 if split == "train" else 7919))


@dataclass(frozen=True)
class DatasetKind:
    """A dataset as the configs name it (``data.dataset``, the eval's ``dataset``): how to open a split, and what its
    class declares before any file is read, so that a config is checked against it (channels, one image size)."""

    cls: type[ImageDataset]
    open: Callable[..., ImageDataset]  # (split, root, **options) -> the split
    # (split, root) -> None, or MissingSplit: the split is there, said without listing or reading it (a launcher's
    # check on a login node: ImageNet's train/ holds 1.28M files)
    find: Callable[[str, str], Any] = lambda split, root: None

    @property
    def channels(self) -> int:
        return self.cls.channels

    @property
    def same_size(self) -> bool:
        return self.cls.same_size


def folder_split(split: str) -> str:
    """An image folder's directory for a split: train/, or val/ for "test" (ImageNet's layout)."""
    return "train" if split == "train" else "val"


REGISTRY: dict[str, DatasetKind] = {
    "fashion_mnist": DatasetKind(FashionMNIST, lambda split, root="", **_: FashionMNIST(root, split)),
    "imagefolder": DatasetKind(ImageFolder, lambda split, root="", **_: ImageFolder(root, folder_split(split)),
                               lambda split, root: ImageFolder.find(root, folder_split(split))),
    "synthetic": DatasetKind(Synthetic, _synthetic),
}


def open_dataset(name: str, split: str, root: str = "", **options: Any) -> ImageDataset:
    """The ``split`` ("train" or "test"; ImageFolder reads val/ for "test") of dataset ``name``.

    Independent of any configuration; ``options`` are the synthetic dataset's (``synthetic_size``,
    ``synthetic_classes``, ``synthetic_image_size``, ``seed``) and are ignored by the others."""
    return REGISTRY[name].open(split, root, **options)


def open_configured(section: Any, split: str, seed: int = 0, key_prefix: str = "data.") -> ImageDataset:
    """The ``split`` of the dataset a config section names by its ``dataset``, ``root`` and ``synthetic_*``
    fields: the pretraining's ``data.*`` and the eval config both have them. Errors name the keys as the
    section's stage spells them (``key_prefix``: ``data.`` for pretraining, none for the eval)."""
    with root_named(f"{key_prefix}root"):
        return open_dataset(section.dataset, split, section.root, synthetic_size=section.synthetic_size,
                            synthetic_classes=section.synthetic_classes,
                            synthetic_image_size=section.synthetic_image_size, seed=seed)


@contextmanager
def root_named(key: str) -> Iterator[None]:
    """Data errors raised inside name the data's root as ``key`` (the eval's ``root``, the .beton writer's
    ``--root``): the datasets name it ``data.root``, the pretraining's key."""
    try:
        yield
    except DataError as e:
        if key == "data.root":
            raise
        raise type(e)(str(e).replace("data.root", key)) from None


class Subset(ImageDataset):
    def __init__(self, base: ImageDataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices
        self.channels, self.num_classes, self.mean, self.std = base.channels, base.num_classes, base.mean, base.std
        self.same_size = base.same_size

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base.load(self.indices[index])

    def label(self, index: int) -> int:
        return self.base.label(self.indices[index])

    def load_many(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.base.load_many([self.indices[i] for i in indices])

    def rows(self, indices: Sequence[int]) -> ImageDataset | None:
        return self.base.rows([self.indices[i] for i in indices])

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled (for a worker process) as its own rows of the base where the base can cut them out."""
        own = self.base.rows(self.indices)
        return super().__reduce_ex__(protocol) if own is None else (Subset, (own, list(range(len(self.indices)))))


def stratified_indices(labels: Sequence[int], n: int, among: Sequence[int] | None = None) -> list[int]:
    """``min(n, len(among))`` positions of ``among`` (default: all of ``labels``), ascending, holding each class in
    proportion to its share (largest remainders), and one of every class at least when ``n`` allows; within a
    class, evenly spaced. Deterministic, so both stages find the same images.

    Evenly spaced positions alone meet periodic labels (the synthetic data's label is ``i % classes``) and take
    whole classes; a class-sorted folder they spread well. Stratifying holds for both."""
    by_class: dict[int, list[int]] = {}
    for i in range(len(labels)) if among is None else among:
        by_class.setdefault(int(labels[i]), []).append(i)
    classes, total = sorted(by_class), sum(len(members) for members in by_class.values())
    n = min(n, total)
    exact = {c: n * len(by_class[c]) / total for c in classes}
    quota = {c: math.floor(exact[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (quota[c] - exact[c], c))[: n - sum(quota.values())]:
        quota[c] += 1
    for c in [c for c in classes if quota[c] == 0] if n >= len(classes) else []:  # one of each, from the most over
        donor = max((d for d in classes if quota[d] > 1), key=lambda d: (quota[d] - exact[d], -d))
        quota[donor], quota[c] = quota[donor] - 1, 1
    return sorted(by_class[c][j * len(by_class[c]) // quota[c]] for c in classes for j in range(quota[c]))


def labels_of(ds: ImageDataset) -> list[int]:
    """Every item's label, read without decoding an image."""
    return [ds.label(i) for i in range(len(ds))]


def stratified_subset(ds: ImageDataset, n: int) -> ImageDataset:
    """``min(n, len(ds))`` items of ``ds``, each class in proportion (:func:`stratified_indices`)."""
    return Subset(ds, stratified_indices(labels_of(ds), n))


def holdout_split(ds: ImageDataset, n: int, key: str = "data.holdout") -> tuple[ImageDataset, ImageDataset]:
    """(the rest, the validation split): ``n`` images of ``ds`` held out, each class in proportion. Pretraining
    (``data.holdout``) and the eval stage (``holdout``: ``key``) both call it, so they hold out the same images."""
    if not 0 < n < len(ds):
        raise DataError(f"bad value for config key '{key}': {n} held-out images leave none of the "
                        f"{len(ds)} training images to train on; hold out fewer")
    held = stratified_subset(ds, n)
    taken = set(held.indices)
    return Subset(ds, [i for i in range(len(ds)) if i not in taken]), held


def disjoint_subsets(ds: ImageDataset, n_first: int, n_second: int) -> tuple[ImageDataset, ImageDataset]:
    """Two subsets of ``ds`` that share no index, each class in proportion in both: up to ``n_first`` and
    ``n_second`` items (the second capped at half of ``ds``, the first at what the second leaves)."""
    n, labels = len(ds), labels_of(ds)
    n_second = min(n_second, n // 2)
    first = stratified_indices(labels, min(n_first, n - n_second))
    taken = set(first)
    second = stratified_indices(labels, n_second, among=[i for i in range(n) if i not in taken])
    return Subset(ds, first), Subset(ds, second)


def missing_classes(subset: ImageDataset, scored: ImageDataset) -> list[int]:
    """The classes of ``scored`` that ``subset`` holds no image of (a kNN bank that cannot vote for them)."""
    return sorted(set(labels_of(scored)) - set(labels_of(subset)))
