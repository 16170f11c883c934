"""FFCV's random resized crop for V views of one image from one decode: each JPEG is decoded once a sample.

ffcv 1.0.2 has no way to share a decoded image between pipelines: each view of ours used to be its own
``PipelineSpec(source="image")`` with its own ``RandomResizedCropRGBImageDecoder``, so every JPEG was
decoded V times. :class:`MultiCropDecoder` decodes it once into its scratch buffer and cuts the V crops from
it, each with its own view's scale range and flip probability and its own draws, as V decoders would. We own
this decoder (ffcv offers none): it is ffcv's ``ResizedCropRGBImageDecoder`` with a loop over the views
around the crop, the same compiled ``imdecode``/``resize_crop`` and ffcv's own ``get_random_crop``.

Output: B x V x S x S x 3 uint8 (every view the same side S); :func:`views_of` turns it into V tensors
B x 3 x S x S. tests/test_ffcv.py compares its crops with the per-view decoders' on the same draws;
benchmarks/loader.py ``decode-once`` measures the speed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State


class MultiCropDecoder(ResizedCropRGBImageDecoder):
    """Decode each image once, then V random resized crops of side ``size``, view v with area fraction in
    ``scales[v]``, aspect ratio in ``ratio`` and a horizontal flip with probability ``flips[v]``."""

    def __init__(self, size: int, scales: Sequence[tuple[float, float]], flips: Sequence[float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__((size, size))
        self.scales = np.array(scales, dtype=np.float64).reshape(-1, 2)
        self.flips = np.array(flips, dtype=np.float64)
        self.ratio = np.array(ratio, dtype=np.float64)
        self.views = len(self.flips)

    @property
    def get_crop_generator(self) -> Callable:
        return get_random_crop

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        state, (_, scratch) = super().declare_state_and_memory(previous_state)
        shape = (self.views, *self.output_size, 3)
        return replace(state, shape=shape), (AllocationQuery(shape, np.dtype("<u1")), scratch)

    def generate_code(self) -> Callable:
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        scales, flips, ratio, views = self.scales, self.flips, self.ratio, self.views

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:  # the one decode of this image
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for v in range(views):
                    i, j, h, w = get_crop_c(height, width, scales[v], ratio)
                    resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix, v])
                    if np.random.rand() < flips[v]:  # mirrored in place: no buffer allocated per image
                        crop = destination[dst_ix, v]
                        side = crop.shape[1]
                        for row in range(crop.shape[0]):
                            for col in range(side // 2):
                                for ch in range(3):
                                    left = crop[row, col, ch]
                                    crop[row, col, ch] = crop[row, side - 1 - col, ch]
                                    crop[row, side - 1 - col, ch] = left
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


def views_of(crops: torch.Tensor, channels: int) -> list[torch.Tensor]:
    """B x V x S x S x 3 uint8 crops -> V tensors B x channels x S x S (one-channel data is stored as three)."""
    return [v.permute(0, 3, 1, 2)[:, :channels] for v in crops.unbind(1)]
