"""Per-view augmentation recipes (torchvision.transforms.v2 on uint8 C x H x W tensors)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchvision.transforms import v2

from pretrain.config import ViewConfig


def build_view_transform(view: ViewConfig, channels: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One view's recipe: uint8 (C x H x W) -> normalised float32 (C x size x size).

    Crop and flip first, then the colour steps; the FFCV path does the first two while decoding
    and the rest on the device (pretrain.data.train_loader.DeviceColour), so both paths share one recipe.
    """
    return v2.Compose([*crop_flip_steps(view), *colour_steps(view, channels, mean, std)])


def crop_flip_steps(view: ViewConfig) -> list[v2.Transform]:
    return [
        v2.RandomResizedCrop(view.size, scale=(view.crop_scale_min, view.crop_scale_max), antialias=True),
        v2.RandomHorizontalFlip(view.flip_p),
    ]


def colour_steps(view: ViewConfig, channels: int, mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """The random colour steps of :func:`random_colour_steps`, then to float and normalise."""
    return random_colour_steps(view, channels) + normalise_steps(mean, std)


def normalise_steps(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """uint8 (or [0, 1] float) image C x H x W, or batch B x C x H x W -> normalised float32: the last
    steps of every training view and of the eval transform."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def random_colour_steps(view: ViewConfig, channels: int) -> list[v2.Transform]:
    """Colour jitter, grayscale, blur: random, per image, on uint8 images; [] when the recipe has none.

    One-channel data gets brightness/contrast jitter only and no grayscale step: it has no
    colour to jitter or remove, and pretending otherwise would just be a no-op at best.
    """
    steps: list[v2.Transform] = []
    if view.jitter_p > 0:
        colour = channels == 3
        jitter = [v2.ColorJitter(view.brightness, view.contrast,
                                 view.saturation if colour else 0, view.hue if colour else 0)]
        if view.gamma > 0:
            jitter.append(RandomGamma(view.gamma))
        steps.append(v2.RandomApply(jitter, p=view.jitter_p))
    if channels == 3 and view.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(view.grayscale_p))
    if view.blur_p > 0:
        kernel = max(3, int(0.1 * view.size) // 2 * 2 + 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, view.blur_sigma_max))], p=view.blur_p))
    return steps


class RandomGamma(v2.Transform):
    """x ** g for an image in [0, 1] (uint8 scaled), one g per call with log g ~ U(-log(1 + s), log(1 + s))."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.log_max = math.log1p(strength)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:  # one draw for every input of the call
        return {"gamma": math.exp(float(torch.empty(()).uniform_(-self.log_max, self.log_max)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return v2.functional.adjust_gamma(inpt, params["gamma"])


def build_eval_transform(size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0) -> v2.Compose:
    """Deterministic: resize the short side to ``size / crop_ratio``, centre crop ``size``, normalise.

    ``crop_ratio=0.875`` is ImageNet's resize 256 + centre crop 224.
    """
    return v2.Compose([
        v2.Resize(round(size / crop_ratio), antialias=True),
        v2.CenterCrop(size),
        *normalise_steps(mean, std),
    ])
