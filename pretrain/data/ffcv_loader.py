"""The FFCV fast path: V augmented views per image from a ``.beton`` file (see pretrain/data/beton.py).

Batches have the torchvision path's structure (``views``: V tensors B x C x H x W, normalised
float32 on the training device; ``label``; ``skipped``), made from the same per-view recipes:
RandomResizedCrop and flip happen in FFCV's JIT-compiled decoder; colour jitter, grayscale, blur
and normalisation run on the device in torch (no cupy needed), per image.

ffcv 1.0.2 has no field mapper: each extra view is another ``PipelineSpec(source="image")``; the
batch comes back as the stored fields first (image, label), then the extra views.

Resume: the epoch order is ``OrderOption.RANDOM`` seeded with run.seed + epoch (per rank a
``DistributedSampler`` shard under several processes), so :meth:`epoch_batches` can restart an
epoch at batch k without decoding the k batches before it. Unlike the torchvision path, the crops
FFCV draws are not replayed bit for bit after a resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torchvision.transforms import v2

from pretrain.config import ConfigError, ViewConfig
from pretrain.data.beton import require_ffcv
from pretrain.data.transforms import colour_steps


class BetonInfo:
    """What the writer stored beside the file (``<path>.json``): count, channels, mean/std, classes."""

    def __init__(self, path: str) -> None:
        beton, meta = Path(path), Path(f"{path}.json")
        if not beton.is_file():
            raise ConfigError(f"bad value for config key 'data.path': '{path}' is not a file; write one with "
                              "python -m pretrain.data.beton --dataset ... --out train.beton")
        if not meta.is_file():
            raise ConfigError(f"'{meta}' is missing: write the .beton with python -m pretrain.data.beton, which "
                              "stores its settings there")
        settings = json.loads(meta.read_text())
        self.settings = settings
        self.channels, self.num_classes = int(settings["channels"]), int(settings["num_classes"])
        self.mean, self.std = tuple(settings["mean"]), tuple(settings["std"])
        self.count = int(settings["count"])

    def __len__(self) -> int:
        return self.count


class FFCVMultiViewLoader:
    """Iterate training batches of V views from a .beton; ``len()`` = batches per epoch on this rank."""

    def __init__(self, path: str, views: Sequence[ViewConfig], batch_size: int, device: torch.device, *,
                 seed: int, distributed: bool, num_workers: int, os_cache: bool = True, batches_ahead: int = 3,
                 info: BetonInfo | None = None) -> None:
        require_ffcv()
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        self.info = info or BetonInfo(path)
        self.device, self.epoch = device, 0
        non_blocking = device.type == "cuda"

        def image_pipeline(view: ViewConfig) -> list[Any]:
            # NormalizeImage stays out: after ToTensor/ToTorchImage it hangs ffcv's CPU Loader; torch does it below.
            decoder = RandomResizedCropRGBImageDecoder((view.size, view.size), scale=(view.crop_scale_min, view.crop_scale_max))
            return [decoder, RandomHorizontalFlip(view.flip_p), ToTensor(), ToDevice(device, non_blocking=non_blocking),
                    ToTorchImage()]

        pipelines: dict[str, Any] = {
            "image": image_pipeline(views[0]),
            "label": [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=non_blocking)],
        }
        for i, view in enumerate(views[1:], start=1):
            first, *rest = image_pipeline(view)
            pipelines[f"view{i}"] = PipelineSpec(source="image", decoder=first, transforms=rest)
        self.loader = Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                             distributed=distributed, seed=seed, drop_last=True, os_cache=os_cache,
                             batches_ahead=batches_ahead, pipelines=pipelines)
        self.colour = [self._on_device(view) for view in views]

    def _on_device(self, view: ViewConfig) -> tuple[list[v2.Transform], v2.Compose]:
        """(per-image random colour steps, batched to-float + normalise)."""
        *random_steps, to_float, normalise = colour_steps(view, self.info.channels, self.info.mean, self.info.std)
        return random_steps, v2.Compose([to_float, normalise])

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """This epoch's batches from batch ``start`` on (earlier ones are not decoded)."""
        from ffcv.loader.epoch_iterator import EpochIterator

        bs = self.loader.batch_size
        order = self.loader.traversal_order.sample_order(self.epoch)[: len(self) * bs]
        self.loader.next_epoch = self.epoch + 1
        if self.loader.code is None:
            self.loader.generate_code()
        for image, label, *extra in EpochIterator(self.loader, order[start * bs:]):
            views = []
            for x, (random_steps, to_float) in zip([image, *extra], self.colour):
                x = x[:, : self.info.channels]  # one-channel data is stored as three equal channels
                if random_steps:  # random per image, as in the torchvision path
                    x = torch.stack([v2.Compose(random_steps)(img) for img in x])
                views.append(to_float(x))
            yield {"views": views, "label": label.long(), "skipped": [""] * len(label)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.epoch_batches(0)
