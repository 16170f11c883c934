"""Host data onto the device without making the host wait.

On CUDA, ``t.to(device)`` of a CPU tensor, and ``torch.tensor(values, device=cuda)``, wait for the stream
before they copy: in a training step each one is a host sync, as an ``.item()`` is. A step's per-image
draws (crop boxes, jitter factors, the rows a colour step acts on) are made on the host, so they travel
with :func:`send`: a pinned, non-blocking copy that the stream orders after the work queued before it.
Constants (normalisation means, colour matrices) are sent once per device and dtype (:func:`constant`).
tests/test_gpu_rules.py counts the blocking copies of a whole step on fake ``cuda`` tensors.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


def can_pin() -> bool:
    """Whether host memory can be pinned: a CUDA runtime with a device (a CPU-only build has none)."""
    return torch.cuda.is_available()


def send(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (a host tensor) on ``device`` (as ``dtype``, converted there): pinned and non-blocking on CUDA (a
    non-blocking copy from pageable memory still makes the host wait). Pinning goes through torch's caching host
    allocator, which keeps the memory until the copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and can_pin():
        t = t.pin_memory()
    t = t.to(device, non_blocking=True)
    return t if dtype is None else t.to(dtype)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return send(torch.tensor(values, dtype=dtype), device)


def constant(values: Sequence[float] | Sequence[Sequence[float]], device: torch.device | str,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A constant tensor of ``values`` on ``device``, sent once and then reused (do not write into it)."""
    key = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in values)
    return _constant(key, torch.device(device), dtype)
