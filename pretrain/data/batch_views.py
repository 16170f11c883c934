"""Batched view augmentation on the training device (``data.augment=batch``).

The torchvision path augments image by image in loader workers. On small images (Fashion-MNIST's
28 px) that per-image Python work costs as much CPU as the training step itself, and on a
2-core machine the workers take those cores from the step. Here the loader only collates uint8
images, and each view is drawn for the whole batch at once: one ``affine_grid`` + ``grid_sample``
for the random resized crop and flip, per-image brightness, contrast and gamma as broadcast
arithmetic, a tone curve as a gather, a blur as one grouped convolution. We own these ~90 lines
rather than add kornia for them.

Randomness is a pure function of (seed, epoch, batch index, rank), drawn from a private
generator, so a resumed run draws exactly the views the uninterrupted run drew.

Supported recipe fields: size, crop_scale_min/max, flip_p, jitter_p, brightness, contrast, gamma, tone
(jitter applied as brightness, then contrast, then gamma, then the tone curve), blur_p and
blur_sigma_max (after the jitter), solarize_p (last): the loader path's order. Saturation, hue and
grayscale need the loader path (``data.augment=loader``); :func:`check_batch_recipe` says so at start.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from pretrain.config import ConfigError, ViewConfig
from pretrain.data.transforms import (SOLARIZE_THRESHOLD_UINT8, blur_kernel_size, normalise_steps, random_tone_slopes,
                                       tone_curve)


def check_batch_recipe(views: Sequence[ViewConfig], channels: int) -> None:
    """Fail at start on recipe fields the batched path does not implement."""
    for i, v in enumerate(views):
        colour = channels == 3 and v.jitter_p > 0 and (v.saturation > 0 or v.hue > 0)
        for key, unsupported in (("saturation/hue", colour), ("grayscale_p", channels == 3 and v.grayscale_p > 0)):
            if unsupported:
                raise ConfigError(f"bad value for config key 'data.views.{i}.{key.split('/')[0]}': data.augment=batch "
                                  "implements crop, flip, brightness, contrast, gamma, tone, blur and solarize only; set it "
                                  "to 0 or use data.augment=loader")


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + batch) * 1_009 + rank


def random_resized_crop_flip(images: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """B x C x H x W float -> B x C x size x size: a random crop of area fraction in
    [crop_scale_min, crop_scale_max] and aspect ratio in [3/4, 4/3] (clipped to the image), resized
    bilinearly, mirrored with probability flip_p."""
    b = images.shape[0]
    area = torch.empty(b).uniform_(view.crop_scale_min, view.crop_scale_max, generator=g)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    x0 = torch.rand(b, generator=g) * (1 - w)
    y0 = torch.rand(b, generator=g) * (1 - h)
    flip = torch.rand(b, generator=g) < view.flip_p
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w, w)  # output x in [-1, 1] -> input x of the crop, mirrored
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta.to(images), [b, images.shape[1], view.size, view.size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Per image with probability jitter_p: brightness x * U(1 +- brightness), then contrast
    (x - mean) * U(1 +- contrast) + mean, each clamped to [0, 1] as torchvision does, then (with
    ``view.gamma``) x ** g, log g ~ U(+-log(1 + gamma)), then (with ``view.tone``) a random tone curve.
    x: B x C x H x W in [0, 1]."""
    b = x.shape[0]
    on = (torch.rand(b, generator=g) < view.jitter_p).float()
    bright = (1 + on * torch.empty(b).uniform_(-view.brightness, view.brightness, generator=g)).clamp_min(0)
    contrast = (1 + on * torch.empty(b).uniform_(-view.contrast, view.contrast, generator=g)).clamp_min(0)
    x = (x * bright.to(x).view(b, 1, 1, 1)).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # grey level of each image (1-channel; RGB: mean over channels)
    x = ((x - mean) * contrast.to(x).view(b, 1, 1, 1) + mean).clamp(0, 1)
    if view.gamma > 0:  # drawn only when asked, so recipes without it keep their random stream
        log_g = on * torch.empty(b).uniform_(-math.log1p(view.gamma), math.log1p(view.gamma), generator=g)
        x = x ** log_g.exp().to(x).view(b, 1, 1, 1)
    if view.tone > 0:
        curved = tone_curve(x, random_tone_slopes(b, view.tone, g))
        x = torch.where(on.bool().to(x.device).view(b, 1, 1, 1), curved, x)
    return x


def blur(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Per image with probability blur_p: a Gaussian blur of sigma ~ U(0.1, blur_sigma_max), the
    kernel and reflect padding of torchvision's GaussianBlur. x: B x C x H x W -> same shape."""
    if view.blur_p <= 0:  # drawn only when asked, so recipes without it keep their random stream
        return x
    b, c, h, w = x.shape
    on = torch.rand(b, generator=g) < view.blur_p
    sigma = torch.empty(b).uniform_(0.1, view.blur_sigma_max, generator=g)
    k = blur_kernel_size(view.size)
    d = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    kern = torch.exp(-0.5 * (d / sigma[:, None]) ** 2)
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0).to(x)  # B*C x k: one per image and channel
    y = F.pad(x.reshape(1, b * c, h, w), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)  # separable: rows, then columns
    y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c).view(b, c, h, w)
    return torch.where(on.to(x.device).view(b, 1, 1, 1), y, x)


def solarize(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Per image with probability solarize_p: pixels at or above SOLARIZE_THRESHOLD_UINT8 / 255
    become 1 - x, as torchvision's RandomSolarize does on the loader path's uint8 images.
    x: B x C x H x W in [0, 1] -> same shape."""
    if view.solarize_p <= 0:  # drawn only when asked, so recipes without it keep their random stream
        return x
    on = (torch.rand(x.shape[0], generator=g) < view.solarize_p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(on & (x >= SOLARIZE_THRESHOLD_UINT8 / 255), 1 - x, x)


class BatchViews:
    """uint8 images (B x C x H x W, any device) -> V normalised float32 views (B x C x size_v x size_v)."""

    def __init__(self, views: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float], seed: int) -> None:
        self.views, self.seed = list(views), seed
        self.normalise = v2.Compose(normalise_steps(mean, std))

    def __call__(self, images: torch.Tensor, epoch: int, batch: int, rank: int = 0) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, batch, rank))
        x = images.float() / 255
        return [self.normalise(solarize(blur(jitter(random_resized_crop_flip(x, v, g), v, g), v, g), v, g))
                for v in self.views]
