"""The images of a ``.beton`` one at a time, for the kNN monitor's labelled subsets.

A run on ``data.format=ffcv`` takes its kNN bank from the .beton it trains on, so no rank lists the image
folder's training split (1.28M paths on ImageNet) at start only to pick a few thousand images. FFCV's loader
reads whole epochs in batches and has no API for one sample; this reads single samples through the file's
allocation table, owned here on purpose (about 30 lines, against ffcv 1.0.2's layout: ``ffcv/types.py``'s
``ALLOC_TABLE_TYPE`` and ``RGBImageField.metadata_type``). Labels come from the metadata, without a decode.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from infomax.data.beton import require_ffcv
from infomax.data.datasets import ImageDataset
from infomax.data.ffcv_loader import BetonInfo

JPEG = 0  # ffcv's IMAGE_MODES["jpg"]; the other mode stores the pixels raw


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
