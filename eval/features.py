"""Frozen-encoder features for the probes, and the check that evaluation never changed the encoder."""

from __future__ import annotations

import hashlib

import torch
from accelerate import Accelerator
from torch import nn

from pretrain.data import ImageDataset
from pretrain.data.colour import split_lab
from pretrain.engine import ImageListDataset, extract_features


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


def frozen_features(encoder: nn.Module, dataset: ImageDataset, meta: dict, accelerator: Accelerator,
                    batch_size: int, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N x F features of the encoder in eval mode (resize + centre crop + normalise as exported)."""
    size = meta["input_size"][-1]
    input_fn = (lambda x: split_lab([x], meta["mean"], meta["std"])[0]) if meta.get("input_transform") == "lab_L" else (lambda x: x)
    images = ImageListDataset(dataset, size)
    encoder = encoder.to(accelerator.device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return extract_features(encoder, images, accelerator, batch_size, num_workers, input_fn=input_fn)


def pixel_features(dataset: ImageDataset, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels (normalised, resized + centre-cropped to ``size``), flattened: N x (C * size^2)."""
    images = ImageListDataset(dataset, size)
    xs, ys = [], []
    for x, y in torch.utils.data.DataLoader(images, batch_size=batch_size):
        xs.append(x.flatten(1))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
