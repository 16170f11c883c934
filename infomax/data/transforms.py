"""Per-view augmentation recipes (torchvision.transforms.v2 on uint8 C x H x W tensors)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from infomax.config.pretrain import ViewConfig
from infomax.runtime.device import send


def build_view_transform(view: ViewConfig, channels: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One view's recipe: uint8 (C x H x W) -> normalised float32 (C x size x size).

    Crop and flip first, then the colour steps. The FFCV path crops and flips while decoding and draws
    the colour steps batched on the device (infomax.data.batch_views, equal to these per image).
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


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel side for a view of ``size`` px: about a tenth of it (SimCLR), at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


SOLARIZE_THRESHOLD_UINT8 = 128  # BYOL's: half of full scale (0.5 in [0, 1]); these steps see uint8 images


def random_colour_steps(view: ViewConfig, channels: int) -> list[v2.Transform]:
    """Colour jitter, grayscale, blur, solarize: random, per image, on uint8 images; [] when the recipe has none.

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
        if view.tone > 0:
            jitter.append(RandomToneCurve(view.tone))
        steps.append(v2.RandomApply(jitter, p=view.jitter_p))
    if channels == 3 and view.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(view.grayscale_p))
    if view.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(view.size), sigma=(0.1, view.blur_sigma_max))
        steps.append(v2.RandomApply([blur], p=view.blur_p))
    if view.solarize_p > 0:
        steps.append(v2.RandomSolarize(SOLARIZE_THRESHOLD_UINT8, p=view.solarize_p))
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


TONE_SEGMENTS = 4


def random_tone_slopes(n: int, strength: float, g: torch.Generator | None = None) -> torch.Tensor:
    """n x TONE_SEGMENTS relative slopes of random tone curves, each log-uniform in [1/(1 + s), 1 + s]."""
    log_max = math.log1p(strength)
    return torch.empty(n, TONE_SEGMENTS).uniform_(-log_max, log_max, generator=g).exp()


def tone_curve(x: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Per image, the monotone piecewise-linear map of [0, 1] onto itself with equal-width segments of
    the given relative slopes (renormalised so that 0 -> 0 and 1 -> 1).

    Args:
        x: B x ... values in [0, 1]. slopes: B x S positive.

    Returns:
        x's shape, in [0, 1].
    """
    b, s = slopes.shape
    knots = torch.cat([slopes.new_zeros(b, 1), slopes.cumsum(1)], 1)
    knots = send(knots / knots[:, -1:], x.device, x.dtype)  # B x (S + 1): the curve's value at 0, 1/S, ..., 1
    t = x.reshape(b, -1) * s
    seg = t.floor().clamp(0, s - 1)  # x = 1 falls in the last segment, at its end
    i = seg.long()
    lo, hi = knots.gather(1, i), knots.gather(1, i + 1)
    return (lo + (t - seg) * (hi - lo)).view_as(x)


class RandomToneCurve(v2.Transform):
    """A random tone curve (:func:`tone_curve`) for an image in [0, 1] or uint8, one curve per call."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:  # one draw for every input of the call
        return {"slopes": random_tone_slopes(1, self.strength)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = v2.functional.to_dtype(inpt.as_subclass(torch.Tensor), torch.float32, scale=True)
        out = v2.functional.to_dtype(tone_curve(x[None], params["slopes"])[0], inpt.dtype, scale=True)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def build_eval_transform(size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0) -> v2.Compose:
    """Deterministic: resize the short side to ``size / crop_ratio``, centre crop ``size``, normalise.

    ``crop_ratio=0.875`` is ImageNet's resize 256 + centre crop 224.
    """
    return v2.Compose([
        v2.Resize(round(size / crop_ratio), antialias=True),
        v2.CenterCrop(size),
        *normalise_steps(mean, std),
    ])
