"""The FFCV fast path: V augmented views per image from a ``.beton`` file (see infomax/data/beton.py).

Batches have the torchvision path's structure (``views``: V tensors B x C x H x W on the training
device; ``label``; ``skipped``), made from the same per-view recipes. RandomResizedCrop and flip
happen in FFCV's JIT-compiled decoder, which hands over uint8 crops; colour jitter, grayscale, blur,
solarize and normalisation then run on the device in torch, batched over the whole batch (no cupy
needed): ``BatchViews.colour`` of infomax.data.batch_views. On a CPU, a view without
random colour steps is normalised inside FFCV's compiled per-image threads instead (NormalizeImage
before ToTensor, ffcv's CPU placement) and comes out as float32, saving a pass over the batch in
torch in the main process (benchmarks/results/loading.md). Such a view is FFCV's own buffer,
reused about ``batches_ahead`` + 2 batches later, as FFCV's outputs always are: copy a batch to keep
it longer.

Views of one side whose crops go to torch (all of them on GPUs) are cut from one decode of each image
(:class:`infomax.data.ffcv_multicrop.MultiCropDecoder`). Otherwise, since ffcv 1.0.2 has no field mapper,
each extra view is another ``PipelineSpec(source="image")`` that decodes the image again; the batch comes
back as the stored fields first (image, label), then the extra views.

Resume: the epoch order is ``OrderOption.RANDOM`` seeded with run.seed + epoch (per rank a
``DistributedSampler`` shard under several processes), so :meth:`epoch_batches` can restart an
epoch at batch k without decoding the k batches before it. Unlike the torchvision path, the crops
FFCV draws are not replayed bit for bit after a resume.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from infomax.config.pretrain import ViewConfig
from infomax.data.beton_file import BetonInfo, require_ffcv
from infomax.data.transforms import random_colour_steps


class FFCVMultiViewLoader:
    """Iterate training batches of V views from a .beton; ``len()`` = batches per epoch on this rank.

    View i comes out normalised float32 when ``normalised[i]`` (CPU, no random colour steps), else
    as uint8 crops for :meth:`infomax.data.batch_views.BatchViews.colour`."""

    def __init__(self, path: str, views: Sequence[ViewConfig], batch_size: int, device: torch.device, *,
                 seed: int, distributed: bool, num_workers: int, os_cache: bool = True, batches_ahead: int = 3,
                 info: BetonInfo | None = None, normalise_in_ffcv: bool = True, decode_once: bool = True) -> None:
        require_ffcv()
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        self.info = info or BetonInfo(path)
        self.device, self.epoch = device, 0
        on_cpu, c, non_blocking = device.type == "cpu", self.info.channels, device.type == "cuda"
        # normalise_in_ffcv=False: always uint8 crops (benchmarks/loader.py compare --breakdown measures what it saves)
        self.normalised = [normalise_in_ffcv and on_cpu and not random_colour_steps(view, c) for view in views]
        # One-channel data is stored as three equal channels: the table repeats its mean/std.
        mean, std = (np.resize(np.array(m, dtype=np.float64) * 255, 3) for m in (self.info.mean, self.info.std))

        def image_pipeline(view: ViewConfig, normalise: bool) -> list[Any]:
            decoder = RandomResizedCropRGBImageDecoder((view.size, view.size),
                                                       scale=(view.crop_scale_min, view.crop_scale_max))
            steps = [decoder, RandomHorizontalFlip(view.flip_p)]
            if normalise:  # on the numpy side: after ToTensor/ToTorchImage it hangs ffcv's CPU Loader
                steps.append(NormalizeImage(mean, std, np.float32))
            steps.append(ToTensor())
            if not on_cpu:  # on a CPU the batch already is where it is used: no copy
                steps.append(ToDevice(device, non_blocking=non_blocking))
            return steps + [ToTorchImage()]

        label = [IntDecoder(), ToTensor(), Squeeze()]
        label += [] if on_cpu else [ToDevice(device, non_blocking=non_blocking)]
        # One decode for every view: views of one side, each handed to torch as uint8 crops (decode_once=False:
        # a decode per view, as before; benchmarks/loader.py decode-once measures the difference).
        self.decode_once = (decode_once and len(views) > 1 and len({v.size for v in views}) == 1
                            and not any(self.normalised))
        if self.decode_once:
            from infomax.data.ffcv_multicrop import MultiCropDecoder

            crops = [MultiCropDecoder(views[0].size, [(v.crop_scale_min, v.crop_scale_max) for v in views],
                                      [v.flip_p for v in views]), ToTensor()]
            crops += [] if on_cpu else [ToDevice(device, non_blocking=non_blocking)]
            pipelines: dict[str, Any] = {"image": crops, "label": label}
        else:
            pipelines = {"image": image_pipeline(views[0], self.normalised[0]), "label": label}
        for i, view in enumerate(views[1:] if not self.decode_once else [], start=1):
            first, *rest = image_pipeline(view, self.normalised[i])
            pipelines[f"view{i}"] = PipelineSpec(source="image", decoder=first, transforms=rest)
        self.loader = Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                             distributed=distributed, seed=seed, drop_last=True, os_cache=os_cache,
                             batches_ahead=batches_ahead, pipelines=pipelines)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """This epoch's batches from batch ``start`` on (earlier ones are not decoded)."""
        from ffcv.loader.epoch_iterator import EpochIterator

        from infomax.data.ffcv_multicrop import views_of

        bs = self.loader.batch_size
        order = self.loader.traversal_order.sample_order(self.epoch)[: len(self) * bs]
        self.loader.next_epoch = self.epoch + 1
        if self.loader.code is None:
            self.loader.generate_code()
        for image, label, *extra in EpochIterator(self.loader, order[start * bs:]):
            if self.decode_once:
                views = views_of(image, self.info.channels)
            else:
                views = [x[:, : self.info.channels] for x in (image, *extra)]  # one-channel data: stored as three
            yield {"views": views, "label": label.long(), "skipped": [""] * len(label)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.epoch_batches(0)
