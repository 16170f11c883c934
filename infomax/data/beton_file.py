"""A ``.beton`` file as the rest of the package reads it: whether FFCV is there (:func:`require_ffcv`), what the
writer stored beside it (:class:`BetonInfo`), and its samples one at a time (:class:`BetonImages`).

:class:`BetonImages` serves the kNN monitor's labelled subsets and the writer's read-back.

A run on ``data.format=ffcv`` takes its kNN bank from the .beton it trains on, so no rank lists the image
folder's training split (1.28M paths on ImageNet) at start only to pick a few thousand images. FFCV's loader
reads whole epochs in batches and has no API for one sample; this reads single samples through the file's
allocation table, owned here on purpose (about 30 lines, against ffcv 1.0.2's layout: ``ffcv/types.py``'s
``ALLOC_TABLE_TYPE`` and ``RGBImageField.metadata_type``). Labels come from the metadata, without a decode.
"""

from __future__ import annotations

import copy
import json
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from infomax.config.pretrain import ConfigError
from infomax.data.datasets import DataError, ImageDataset, ImageFolder

INSTALL = ("FFCV is not installed: apt-get install -y --no-install-recommends libopencv-dev libturbojpeg0-dev "
           "pkg-config && pip install -e '.[ffcv]'")
JPEG = 0  # ffcv's IMAGE_MODES["jpg"]; the other mode stores the pixels raw


def require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None


class BetonInfo:
    """What the writer stored beside the file (``<path>.json``): count, channels, mean/std, classes. ``key``: the
    config key that gave the path, named when it is wrong."""

    def __init__(self, path: str, key: str = "data.path") -> None:
        beton, meta = Path(path), Path(f"{path}.json")
        if not beton.is_file():
            raise ConfigError(f"bad value for config key '{key}': '{path}' is not a file; write one with "
                              "python -m infomax.data.beton --dataset ... --out train.beton")
        if not meta.is_file():
            raise ConfigError(f"'{meta}' is missing: write the .beton with python -m infomax.data.beton, which "
                              "stores its settings there")
        try:
            settings = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"'{meta}' is damaged ({e}): write the .beton again with python -m infomax.data.beton") \
                from None
        # The writer records the file's size: a .beton cut short (a copy that stopped) fails inside FFCV's reader
        # with "negative dimensions", so it is named here.
        if "bytes" in settings and (size := beton.stat().st_size) != settings["bytes"]:
            raise ConfigError(f"'{path}' holds {size} bytes where its writer wrote {settings['bytes']} ('{meta}'): "
                              "the copy is incomplete or the file was changed; copy it again, or write it again "
                              "with python -m infomax.data.beton")
        self.path, self.settings = path, settings
        self.channels, self.num_classes = int(settings["channels"]), int(settings["num_classes"])
        self.mean, self.std = tuple(settings["mean"]), tuple(settings["std"])
        self.count = int(settings["count"])
        self.dataset = str(settings.get("dataset", ""))
        self.class_names: list[str] | None = settings.get("class_names")  # an image folder's; older writers: none

    def __len__(self) -> int:
        return self.count

    def require_dataset(self, dataset: str, key: str, dataset_key: str) -> None:
        """Refuse a .beton written from another dataset than the config names (``key``: the config key that gave
        the file, ``dataset_key``: the one that names the dataset): its export and model card would name the
        wrong one."""
        if self.dataset and self.dataset != dataset:
            raise ConfigError(f"bad value for config key '{key}': it was written from {self.dataset} (its .json says), "
                              f"but {dataset_key} is {dataset}; set {dataset_key}={self.dataset}, or give the .beton "
                              f"of {dataset}")

    def number_queries(self, queries: ImageDataset) -> None:
        """Number an image folder's labels (the kNN monitor's queries, read from val/) by the classes this .beton
        was written from, as the bank's labels are: val/ beside no train/ would number only its own folders."""
        if not isinstance(queries, ImageFolder):
            return
        if self.class_names is not None:
            queries.number_classes_as(self.class_names, f"the .beton '{self.path}'")
        elif queries.num_classes != self.num_classes:
            raise DataError(f"'{queries.split_dir}' holds {queries.num_classes} class folder(s) and '{self.path}' "
                            f"{self.num_classes} classes, and this .beton records no class names to match them by: "
                            "write it again with python -m infomax.data.beton (which records them)")


class BetonImages(ImageDataset):
    """Every sample of the .beton at ``path``: ``load(i)`` decodes image i (C x H x W uint8, as stored: after the
    writer's --max-resolution, JPEG where it chose JPEG), ``label(i)`` reads the label alone."""

    def __init__(self, path: str, info: BetonInfo | None = None) -> None:
        require_ffcv()
        from ffcv.reader import Reader

        self.info = info or BetonInfo(path)
        self.path = path
        self.channels, self.num_classes = self.info.channels, self.info.num_classes
        self.mean, self.std = self.info.mean, self.info.std
        reader = Reader(path)
        columns = {name: f"f{i}" for i, name in enumerate(reader.field_names)}  # ffcv names them f0, f1, ...
        self.images = reader.metadata[columns["image"]]
        self.labels = np.asarray(reader.metadata[columns["label"]])
        self.same_size = bool(self.images["height"].min() == self.images["height"].max()
                              and self.images["width"].min() == self.images["width"].max())
        table = np.sort(reader.alloc_table, order="ptr")  # a sample's image starts where one allocation does
        self.ptrs, self.sizes = np.asarray(table["ptr"]), np.asarray(table["size"])

    @cached_property
    def data(self) -> np.memmap:  # opened in the process that reads (a DataLoader worker), not pickled to it
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("data", None)
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, indices: Sequence[int]) -> BetonImages:
        """These samples alone: their metadata rows and the allocations their images start at."""
        kept, indices = copy.copy(self), np.asarray(indices, dtype=np.int64)  # a copy as pickled: no open memmap
        kept.images, kept.labels = self.images[indices], self.labels[indices]
        starts = np.unique(np.searchsorted(self.ptrs, kept.images["data_ptr"]))
        kept.ptrs, kept.sizes = self.ptrs[starts], self.sizes[starts]
        return kept

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def stored_as_jpeg(self, index: int) -> bool:
        """Whether the writer stored image ``index`` as JPEG (``jpg`` mode, or ``proportion``'s share), not raw."""
        return bool(self.images[index]["mode"] == JPEG)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        import cv2

        field = self.images[index]
        ptr, height, width = int(field["data_ptr"]), int(field["height"]), int(field["width"])
        stored = self.data[ptr: ptr + int(self.sizes[np.searchsorted(self.ptrs, ptr)])]
        if self.stored_as_jpeg(index):
            image = cv2.cvtColor(cv2.imdecode(np.asarray(stored), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            image = np.asarray(stored).reshape(height, width, 3)
        # The writer stores every image as RGB (a grey one as three equal planes): keep the dataset's channels.
        return torch.from_numpy(np.ascontiguousarray(image[..., : self.channels].transpose(2, 0, 1))), self.label(index)
