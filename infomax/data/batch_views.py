"""Batched view augmentation on the training device (``data.augment=batch``).

The torchvision path augments image by image in loader workers. On small images (Fashion-MNIST's
28 px) that per-image Python work costs as much CPU as the training step itself, and on a
2-core machine the workers take those cores from the step. Here the loader only collates uint8
images, and each view is drawn for the whole batch at once: one ``affine_grid`` + ``grid_sample``
for the random resized crop and flip, per-image brightness, contrast, saturation, gamma and
grayscale as broadcast arithmetic, a hue rotation through HSV, a tone curve as a gather, a blur as
one grouped convolution. Each op equals torchvision's per-image op for the same drawn parameters
(tests/test_data.py). We own these ~130 lines rather than add kornia for them.

The draws are made on the host (a private generator) and travel pinned and non-blocking
(:func:`infomax.runtime.device.send`): on CUDA the views of a step make the host wait for nothing.

Randomness is a pure function of (seed, epoch, batch index, rank), drawn from a private
generator, so a resumed run draws exactly the views the uninterrupted run drew.

Every recipe field, on grey or colour images: crop and flip, then the jitter (brightness, contrast,
saturation and hue in a random order per image, as torchvision's ColorJitter shuffles them per call,
then gamma and the tone curve; saturation and hue on 3 channels only), grayscale (3 channels), blur,
solarize: the loader path's order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from infomax.config.pretrain import ViewConfig
from infomax.data.transforms import SOLARIZE_THRESHOLD_UINT8, blur_kernel_size, random_tone_slopes, tone_curve
from infomax.runtime.device import constant, send


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
    size = [b, images.shape[1], view.size, view.size]
    grid = F.affine_grid(send(theta, images.device, images.dtype), size, align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(x: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x 1 x H x W: torchvision's luma grey (0.299 R + 0.587 G + 0.114 B), or the one channel."""
    return v2.functional.rgb_to_grayscale(x) if x.shape[1] == 3 else x


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's blend of each image with ``other`` by its own factor: factor * x + (1 - factor) * other,
    clamped to [0, 1]. x: B x C x H x W; other broadcasts to it; factor: B."""
    f = send(factor, x.device, x.dtype).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each RGB image's hue rotated by its own ``shift`` (in turns), as torchvision's adjust_hue does
    through HSV; saturation and value stay. x: B x 3 x H x W in [0, 1]; shift: B in [-0.5, 0.5].

    torchvision's adjust_hue takes one factor per call and its HSV helpers are private, so we own the
    conversion: the hue of torchvision's rgb -> hsv, and hsv -> rgb as v - (v - min) * clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B."""
    r, g, b = x.unbind(1)
    hi, lo = x.amax(1), x.amin(1)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # hue is irrelevant where the pixel is grey
    sector = torch.where(hi == r, (g - b) / span, torch.where(hi == g, 2 + (b - r) / span, 4 + (r - g) / span))
    hue = (sector / 6 + send(shift, x.device, x.dtype).view(-1, 1, 1)).remainder(1)
    k = (constant([5.0, 3.0, 1.0], x.device, x.dtype).view(1, 3, 1, 1) + 6 * hue[:, None]).remainder(6)
    return hi[:, None] - (hi - lo)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def jitter(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Per image with probability jitter_p, torchvision's ColorJitter: brightness x * U(1 +- brightness),
    contrast (x - mean grey) * U(1 +- contrast) + mean grey and, on RGB, saturation (a blend with the
    luma grey by U(1 +- saturation)) and hue (a rotation by U(+-hue) turns), each clamped to [0, 1], in a
    random order drawn per image; then (with ``view.gamma``) x ** g, log g ~ U(+-log(1 + gamma)), then
    (with ``view.tone``) a random tone curve. x: B x C x H x W in [0, 1]."""
    b = x.shape[0]
    on = (torch.rand(b, generator=g) < view.jitter_p).float()
    bright = (1 + on * torch.empty(b).uniform_(-view.brightness, view.brightness, generator=g)).clamp_min(0)
    contrast = (1 + on * torch.empty(b).uniform_(-view.contrast, view.contrast, generator=g)).clamp_min(0)
    # Each step maps the images `rows` (host indices) selects, x[rows], to their new values.
    steps = [lambda x, rows: blend(x, 0.0, bright[rows]),
             lambda x, rows: blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), contrast[rows])]
    rgb = x.shape[1] == 3
    if rgb and view.saturation > 0:  # drawn only when they act, so grey recipes keep their random stream
        sat = (1 + on * torch.empty(b).uniform_(-view.saturation, view.saturation, generator=g)).clamp_min(0)
        steps.append(lambda x, rows: blend(x, grey(x), sat[rows]))
    if rgb and view.hue > 0:
        shift = on * torch.empty(b).uniform_(-view.hue, view.hue, generator=g)
        steps.append(lambda x, rows: shift_hue(x, shift[rows]))
    # Stage k applies to each image the step its order puts k-th, computed on those images alone: each image
    # pays for each step once, as with torchvision, and images without the jitter are left as they are.
    order = torch.rand(b, len(steps), generator=g).argsort(dim=1)
    x = x.clone()
    for stage in range(len(steps)):
        for j, step in enumerate(steps):
            rows = ((order[:, stage] == j) & on.bool()).nonzero().squeeze(1)  # on the host: asks the device nothing
            if len(rows):
                on_device = send(rows, x.device)
                x[on_device] = step(x[on_device], rows)
    if view.gamma > 0:  # drawn only when asked, so recipes without it keep their random stream
        log_g = on * torch.empty(b).uniform_(-math.log1p(view.gamma), math.log1p(view.gamma), generator=g)
        x = x ** send(log_g.exp(), x.device, x.dtype).view(b, 1, 1, 1)
    if view.tone > 0:
        curved = tone_curve(x, random_tone_slopes(b, view.tone, g))
        x = torch.where(send(on.bool(), x.device).view(b, 1, 1, 1), curved, x)
    return x


def grayscale(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Per RGB image with probability grayscale_p: its luma grey in all 3 channels (torchvision's
    RandomGrayscale). x: B x C x H x W -> same shape; 1-channel images pass through, drawing nothing."""
    if x.shape[1] != 3 or view.grayscale_p <= 0:
        return x
    on = send(torch.rand(x.shape[0], generator=g) < view.grayscale_p, x.device).view(-1, 1, 1, 1)
    return torch.where(on, grey(x).expand_as(x), x)


def blur(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Per image with probability blur_p: a Gaussian blur of sigma ~ U(0.1, blur_sigma_max), the
    kernel and reflect padding of torchvision's GaussianBlur. x: B x C x H x W -> same shape."""
    if view.blur_p <= 0:  # drawn only when asked, so recipes without it keep their random stream
        return x
    b, c, h, w = x.shape
    on = torch.rand(b, generator=g) < view.blur_p
    sigma = torch.empty(b).uniform_(0.1, view.blur_sigma_max, generator=g)
    # Only the n drawn images are blurred (the draw is on the host, so choosing them asks the device nothing).
    chosen = on.nonzero().squeeze(1)
    n = len(chosen)
    if n == 0:
        return x
    k = blur_kernel_size(view.size)
    d = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    kern = torch.exp(-0.5 * (d / sigma[chosen, None]) ** 2)
    # n*C x k: one per image and channel
    kern = send((kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0), x.device, x.dtype)
    rows = send(chosen, x.device)
    y = F.pad(x[rows].reshape(1, n * c, h, w), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)  # separable: rows, then columns
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c).view(n, c, h, w)
    if n == b:
        return y
    out = x.clone()
    out[rows] = y
    return out


def solarize(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Per image with probability solarize_p: pixels at or above SOLARIZE_THRESHOLD_UINT8 / 255
    become 1 - x, as torchvision's RandomSolarize does on the loader path's uint8 images.
    x: B x C x H x W in [0, 1] -> same shape."""
    if view.solarize_p <= 0:  # drawn only when asked, so recipes without it keep their random stream
        return x
    on = send(torch.rand(x.shape[0], generator=g) < view.solarize_p, x.device).view(-1, 1, 1, 1)
    return torch.where(on & (x >= SOLARIZE_THRESHOLD_UINT8 / 255), 1 - x, x)


class BatchViews:
    """The views of a batch, drawn on its device: from whole uint8 images (``__call__``: crop, flip and
    colour steps) or from FFCV's uint8 crops (:meth:`colour`: the colour steps only)."""

    def __init__(self, views: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float], seed: int) -> None:
        self.views, self.seed = list(views), seed
        self.mean, self.std = tuple(mean), tuple(std)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] floats B x C x H x W -> (x - mean) / std in float32, as torchvision's Normalize computes it,
        with the mean and std sent to the device once (Normalize sends them at every call, a blocking copy)."""
        x = x.to(torch.float32)
        return x.sub(constant(self.mean, x.device).view(-1, 1, 1)).div(constant(self.std, x.device).view(-1, 1, 1))

    def __call__(self, images: torch.Tensor, epoch: int, batch: int, rank: int = 0) -> list[torch.Tensor]:
        """uint8 images B x C x H x W (any device) -> V normalised float32 views B x C x size_v x size_v."""
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, batch, rank))
        x = images.float() / 255
        return [self.normalise(colour_steps(random_resized_crop_flip(x, v, g), v, g)) for v in self.views]

    def colour(self, crops: list[torch.Tensor], epoch: int, batch: int, rank: int = 0) -> list[torch.Tensor]:
        """V uint8 crops B x C x size_v x size_v (FFCV cropped and flipped them while decoding) -> V
        normalised float32 views. A view FFCV already normalised (float32: no colour steps) passes through."""
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, batch, rank))
        return [x if x.is_floating_point() else self.normalise(colour_steps(x.float() / 255, v, g))
                for x, v in zip(crops, self.views, strict=True)]


def colour_steps(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """One view's random colour steps on a batch, in the loader path's order: jitter, grayscale, blur,
    solarize. x: B x C x H x W in [0, 1] -> same shape."""
    return solarize(blur(grayscale(jitter(x, view, g), view, g), view, g), view, g)
