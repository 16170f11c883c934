"""The pretraining input, built in one place: the training loader (FFCV fast path or torchvision)
and the on-device view steps that turn a loaded batch into the model's views.

On-device steps, in order: the views' colour steps, drawn per batch by :mod:`batch_views`, either
with the crops (``data.augment=batch``) or on the uint8 crops FFCV decoded (every FFCV run); then the
Lab split (``data.colour_split=lab``: each RGB view becomes an L and an ab view, :mod:`colour`).
With ``data.augment=loader`` on the torchvision format the loader workers do the colour steps themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from accelerate import Accelerator

from infomax.config.fields import require
from infomax.config.pretrain import Config, ConfigError
from infomax.data.batch_views import BatchViews
from infomax.data.colour import split_lab
from infomax.data.datasets import (
    ONE_CLASS_HINT,
    REGISTRY,
    DataError,
    ImageDataset,
    ImageFolder,
    MissingSplit,
    disjoint_subsets,
    holdout_split,
    labels_of,
    missing_classes,
    open_configured,
    stratified_subset,
)
from infomax.data.multiview import MultiViewDataset, collate_skipped
from infomax.data.transforms import build_view_transform
from infomax.runtime.hardware import beton_memory_warning, memory_limit


@dataclass
class TrainData:
    """The training loader, the kNN monitor's labelled sets and the on-device view steps."""

    images: Any  # the training ImageDataset, or the .beton's BetonInfo (count, channels, mean/std, classes)
    loader: Any  # an Accelerate-prepared DataLoader, or an FFCVMultiViewLoader
    train_set: MultiViewDataset | None  # the torchvision path's dataset (its epoch seeds the augmentations)
    batch_views: BatchViews | None  # data.augment=batch, and every FFCV run (its crops' colour steps)
    lab: bool  # data.colour_split=lab
    view_chans: list[int]  # channels of each model view
    knn_bank: ImageDataset | None
    knn_queries: ImageDataset | None

    def __len__(self) -> int:
        return len(self.loader)

    def epoch_batches(self, accelerator: Accelerator, epoch: int, start: int) -> Iterable[dict[str, Any]]:
        """The batches of ``epoch`` from batch ``start`` on (resume inside an epoch)."""
        self.loader.set_epoch(epoch)
        if self.train_set is None:
            return self.loader.epoch_batches(start)
        self.train_set.set_epoch(epoch)
        return accelerator.skip_first_batches(self.loader, start) if start else self.loader

    def views(self, batch: dict[str, Any], epoch: int, step_in_epoch: int,
              accelerator: Accelerator) -> list[torch.Tensor]:
        """A loaded batch -> the augmented, normalised views (before any Lab split): V x (B x C x H x W)."""
        if self.batch_views is None:
            return batch["views"]
        if self.train_set is None:  # FFCV: cropped while decoding, on the device already
            return self.batch_views.colour(batch["views"], epoch, step_in_epoch, accelerator.process_index)
        # the loader pins its batches on CUDA: the copy does not make the host wait
        return self.batch_views(batch["views"][0].to(accelerator.device, non_blocking=True), epoch, step_in_epoch,
                                accelerator.process_index)

    def model_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Augmented views -> the model's views (the Lab split turns each into L and ab)."""
        return split_lab(views, self.images.mean, self.images.std) if self.lab else views

    def first_view(self, x: torch.Tensor) -> torch.Tensor:
        """An eval-transformed batch -> the first model view's input (the kNN monitor's)."""
        return self.model_views([x])[0]

    @staticmethod
    def skipped(batch: dict[str, Any]) -> list[str]:
        return collate_skipped(batch["skipped"])


def open_split(cfg: Config, split: str) -> ImageDataset:
    """The whole ``split`` of ``data.dataset``, as the pretraining's settings open it."""
    return open_configured(cfg.data, split, seed=cfg.run.seed)


def build_dataset(cfg: Config, split: str = "train") -> ImageDataset:
    """The training (or held-out) dataset named by ``data.dataset``, less ``data.holdout``'s validation
    images; fails early on bad paths."""
    return training_and_validation(cfg)[0] if split == "train" else _checked(open_split(cfg, split))


def _checked(ds: ImageDataset) -> ImageDataset:
    if isinstance(ds, ImageFolder):  # a folder that exists but cannot be decoded is an error now, not mid-run
        ds.check_readable()
    return ds


def training_and_validation(cfg: Config) -> tuple[ImageDataset, ImageDataset | None]:
    """(the training images, ``data.holdout``'s validation images or None), from one opening of the train split."""
    ds, validation = _checked(open_split(cfg, "train")), None
    if cfg.data.holdout:
        ds, validation = holdout_split(ds, cfg.data.holdout)
    if cfg.data.limit:
        ds = stratified_subset(ds, cfg.data.limit)  # a prefix of a class-sorted folder would be its first classes
    return ds, validation


def build_knn_sets(cfg: Config, train: ImageDataset, validation: ImageDataset | None = None,
                   note: Callable[[str], None] = lambda line: None) -> tuple[ImageDataset, ImageDataset]:
    """(memory bank, queries) for the online kNN monitor: labelled subsets of ``train`` and of the images held
    out of it, each class in proportion (:func:`~infomax.data.datasets.stratified_indices`).

    Queries come from ``validation`` (``data.holdout``'s images) when given, else from the held-out
    split when the dataset has one (Fashion-MNIST test, ImageFolder val/, synthetic's second seed);
    otherwise from training images that are not in the bank (a query that is also a bank image would
    find itself), said in one line by ``note``, since the eval will need held-out images too. Then at most half of
    the images are queries, and the bank is at most the rest. A bank without a class the queries hold is refused:
    the monitor could never vote for it.
    """
    m = cfg.monitor
    if train.num_classes < 2:  # every vote would be right: a monitor at 100 % that says nothing
        raise DataError(f"the training images hold {train.num_classes} class: the kNN monitor scores classes and needs "
                        f"2 or more; set monitor.knn_every=0 to pretrain without it, or {ONE_CLASS_HINT}"
                        f"{' (and write the .beton again)' if cfg.data.format == 'ffcv' else ''}")
    if cfg.data.holdout and validation is None:  # the queries would come from images the eval does not score
        raise ValueError("with data.holdout the kNN queries come from its validation images: pass them")
    if validation is not None:
        bank, queries = stratified_subset(train, m.knn_bank), stratified_subset(validation, m.knn_queries)
    else:
        try:
            held_out = open_split(cfg, "test")
        except MissingSplit:  # no held-out split (one that is there but damaged is an error)
            held_out = None
        if held_out is None:
            way = ("give data.root a val/ of its classes" if cfg.data.format == "ffcv" else
                   "set data.holdout=N now, and evaluate with holdout=N")  # a .beton holds no images out
            note(f"note: {cfg.data.dataset} has no held-out split here, so the kNN monitor's queries are training "
                 f"images; the eval will need held-out images too: {way}")
            bank, queries = disjoint_subsets(train, m.knn_bank, m.knn_queries)
        else:  # one that exists but cannot be decoded is an error, not a reason to fall back
            if cfg.data.format == "ffcv":  # the bank's labels are the .beton's
                train.info.number_queries(held_out)
            bank, queries = stratified_subset(train, m.knn_bank), stratified_subset(_checked(held_out), m.knn_queries)
    if missing := missing_classes(bank, queries):
        raise DataError(f"bad value for config key 'monitor.knn_bank': its {len(bank)} images hold none of class(es) "
                        f"{', '.join(map(str, missing[:10]))} that the kNN queries hold, so the monitor could never "
                        f"vote for them; raise it to at least the {len(set(labels_of(queries)))} classes")
    return bank, queries


def data_identity(cfg: Config, images: Any) -> dict[str, Any]:
    """What the training data is, wherever it lives: compared when a run dir resumes on data found elsewhere."""
    identity = {"dataset": cfg.data.dataset, "format": cfg.data.format, "images": len(images),
                "classes": images.num_classes, "channels": images.channels}
    if cfg.data.format == "ffcv":
        identity["beton_bytes"] = Path(cfg.data.path).stat().st_size
    elif isinstance(images, ImageFolder) or isinstance(getattr(images, "base", None), ImageFolder):
        folder = images if isinstance(images, ImageFolder) else images.base
        identity["class_names"] = hashlib.sha256("\n".join(folder.classes).encode()).hexdigest()[:16]
    return identity


def check_dataset_use(d: Any) -> None:
    """``data.*`` against what its dataset declares (:class:`~infomax.data.datasets.DatasetKind`), before any file
    is read: the Lab split needs RGB, views drawn per batch need images of one size."""
    kind = REGISTRY[d.dataset]
    require(d.colour_split != "lab" or kind.channels == 3, "data.colour_split",
            f"lab needs RGB data, {d.dataset} has {kind.channels} channel(s)")
    require(d.augment == "loader" or d.format == "ffcv" or kind.same_size, "data.augment",
            f"batch needs same-size images, and {d.dataset}'s differ: use loader, or write a .beton "
            "(data.format=ffcv), whose crops are of one size")


def build_train_data(cfg: Config, accelerator: Accelerator) -> TrainData:
    """Datasets, loader and view steps for ``cfg.data``; every data error is raised here, before the model."""
    check_dataset_use(cfg.data)
    d, batch = cfg.data, cfg.optim.batch_size_per_process
    ffcv = d.format == "ffcv"
    if ffcv:  # the kNN bank is read from the .beton itself: the image folder's training split is never listed
        from infomax.data.beton_file import BetonImages, BetonInfo, require_ffcv

        require_ffcv()
        images = BetonInfo(d.path)
        images.require_dataset(d.dataset, "data.path", "data.dataset")
        if warning := beton_memory_warning(Path(d.path).stat().st_size, memory_limit(), d.os_cache):
            accelerator.print(warning, flush=True)
        decoded, validation = (BetonImages(d.path, images) if cfg.monitor.knn_every else None), None
    else:
        decoded, validation = training_and_validation(cfg)
        images = decoded
    batch_views = BatchViews(d.views, images.mean, images.std, cfg.run.seed) if d.augment == "batch" or ffcv else None
    bank, queries = (build_knn_sets(cfg, decoded, validation, lambda line: accelerator.print(line, flush=True))
                     if cfg.monitor.knn_every else (None, None))
    if len(images) < batch * accelerator.num_processes:
        raise ConfigError(
            f"bad value for config key 'optim.batch_size_per_process': {batch} x {accelerator.num_processes} "
            f"processes needs at least that many images, the dataset has {len(images)}; lower it"
        )
    train_set = None
    if ffcv:  # FFCV shards across processes itself (distributed=True) and delivers batches on the device
        from infomax.data.ffcv_loader import FFCVMultiViewLoader

        loader = FFCVMultiViewLoader(
            d.path, d.views, batch, accelerator.device, seed=cfg.run.seed, distributed=accelerator.num_processes > 1,
            num_workers=max(1, d.num_workers), os_cache=d.os_cache, batches_ahead=d.batches_ahead, info=images)
    else:
        # data.augment=batch: the loader only collates uint8 images; the views are drawn per batch on the device
        transforms = [] if d.augment == "batch" else [
            build_view_transform(v, images.channels, images.mean, images.std) for v in d.views]
        train_set = MultiViewDataset(images, transforms, seed=cfg.run.seed)
        loader = accelerator.prepare(torch.utils.data.DataLoader(
            train_set, batch_size=batch, shuffle=True, drop_last=True, num_workers=d.num_workers,
            pin_memory=accelerator.device.type == "cuda"))
    lab = d.colour_split == "lab"
    # With the Lab split each loaded RGB view becomes an L view (1 channel) and an ab view (2 channels).
    view_chans = [1, 2] * len(d.views) if lab else [images.channels] * len(d.views)
    return TrainData(images, loader, train_set, batch_views, lab, view_chans, bank, queries)
