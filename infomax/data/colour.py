"""Batched colour-space conversion on the training device (CMC's Lab views).

sRGB (D65) <-> CIE Lab, for B x 3 x H x W tensors in [0, 1]; float32 math whatever the input.
Lab is then normalised with CMC's constants (HobbitLong/CMC's training script: ``RGB2Lab`` followed by
``Normalize(mean, std)``), so our L and ab views are the inputs its encoders saw.
"""

from __future__ import annotations

from typing import Sequence

import torch

from infomax.runtime.device import constant

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])  # D65
_EPS, _KAPPA = 216 / 24389, 24389 / 27
LAB_MEAN = (50.0, 6.025, -6.6895)  # CMC's Normalize constants for (L, a, b)
LAB_STD = (50.0, 92.2075, 101.1675)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W sRGB in [0, 1] -> B x 3 x H x W Lab (L in [0, 100], a/b roughly [-110, 110])."""
    rgb = rgb.float().clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", constant(_RGB_TO_XYZ.tolist(), rgb.device), linear)
    xyz = xyz / constant(_WHITE.tolist(), rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > _EPS, xyz.clamp_min(1e-12) ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab` (B x 3 x H x W), clamped to [0, 1]."""
    L, a, b = lab.float().unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
    xyz = torch.where(f ** 3 > _EPS, f ** 3, (116 * f - 16) / _KAPPA)
    xyz = xyz * _WHITE.to(lab.device).view(1, 3, 1, 1)
    linear = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB_TO_XYZ).to(lab.device), xyz).clamp(0, 1)
    curved = 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055
    return torch.where(linear > 0.0031308, curved, 12.92 * linear).clamp(0, 1)


def split_lab(views: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float]) -> list[torch.Tensor]:
    """Normalised RGB views -> [L, ab, L, ab, ...]: each view becomes a 1-channel and a 2-channel view.

    Args:
        views: V tensors B x 3 x H x W, normalised with ``mean``/``std`` by the loader.

    Returns:
        2V tensors: B x 1 x H x W and B x 2 x H x W, (Lab - LAB_MEAN) / LAB_STD.
    """
    out = []
    for v in views:
        m = constant(tuple(mean), v.device).view(1, -1, 1, 1)
        s = constant(tuple(std), v.device).view(1, -1, 1, 1)
        lab = rgb_to_lab(v.float() * s + m)
        lab = (lab - constant(LAB_MEAN, v.device).view(1, 3, 1, 1)) / constant(LAB_STD, v.device).view(1, 3, 1, 1)
        out += [lab[:, :1], lab[:, 1:]]
    return out
