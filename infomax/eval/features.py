"""Raw-pixel features for the probes, and the check that evaluation never changed the encoder."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from infomax.data import ImageDataset
from infomax.features.extract import ImageListDataset


class EncoderChanged(RuntimeError):
    """The encoder's weights differ after a probe: the probe trained (or corrupted) it."""


def fingerprint(encoder: nn.Module) -> str:
    """sha256 over every parameter and buffer, in state-dict order."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_unchanged(encoder: nn.Module, expected: str, name: str) -> None:
    if fingerprint(encoder) != expected:
        raise EncoderChanged(f"the weights of '{name}' changed during evaluation: a probe must never train the encoder")


def pixel_features(dataset: ImageDataset, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels (normalised, resized + centre-cropped to ``size``), flattened: N x (C * size^2)."""
    images = ImageListDataset(dataset, size)
    xs, ys = [], []
    for x, y in torch.utils.data.DataLoader(images, batch_size=batch_size):
        xs.append(x.flatten(1))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


class ConcatViewEncoders(nn.Module):
    """CMC's linear-evaluation input (HobbitLong/CMC ``LinearProbing.py``: ``torch.cat((feat_l, feat_ab), 1)``):
    each view's encoder reads its own input (``input_fns``, e.g. the L and the ab channels of Lab) and
    the features are concatenated. Loaded images B x C x H x W -> B x sum of the encoders' features."""

    def __init__(self, encoders: list[nn.Module], input_fns: list) -> None:
        super().__init__()
        self.encoders, self.input_fns = nn.ModuleList(encoders), input_fns
        self.num_features = sum(int(e.num_features) for e in encoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([encoder(fn(x)).float() for encoder, fn in zip(self.encoders, self.input_fns)], dim=1)
