"""More negatives than one batch (MoCo v2): a momentum copy of encoder and head, and a queue of its keys.

- :class:`MomentumKeys` holds an exponential moving average of the online model (encoders and
  heads), updated after every optimizer step: theta_k <- m theta_k + (1 - m) theta_q. It computes
  the keys, without gradient, in train mode (BatchNorm on batch statistics, as MoCo's key encoder).
- :class:`KeyQueue` holds, per key view, the last ``size`` gathered keys. Every rank enqueues the
  same gathered W*B keys at the same position, so the queue is identical on all ranks and equal to
  the queue of one process fed the W*B batch (tests/test_distributed.py).

With the queue the contrastive objective scores each query against the W*B gathered batch keys of
the momentum model plus the filled part of the queue: K = W*B + filled candidates, the positive at
``rank*B + i``. Only queries carry gradient. The export is the online (query) encoder.

MoCo shuffles BatchNorm across GPUs because its only in-batch candidate is the positive, which BN
statistics could single out. Here every batch key is a candidate (positive or negative), and on
several processes ``model.sync_bn`` computes statistics over the global batch, so we do not shuffle.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumKeys(nn.Module):
    """An EMA copy of the online model that maps V views to V key embeddings (B x D each), no gradient."""

    def __init__(self, online: nn.Module, momentum: float) -> None:
        super().__init__()
        self.model = copy.deepcopy(online).requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        self.model.train()
        return self.model(views)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter (BN buffers follow their own batches)."""
        keys = [p for p in self.model.parameters()]
        queries = [p.detach() for p in online.parameters()]
        torch._foreach_lerp_(keys, queries, 1.0 - self.momentum)


class KeyQueue(nn.Module):
    """A FIFO of the last ``size`` keys of each of V views (buffers, so they go into checkpoints).

    ``keys(v)`` returns the filled part (n x D, n <= size) in the order written; ``push`` writes
    a gathered batch of keys (W*B x D per view) at the current position, wrapping around.
    """

    def __init__(self, num_views: int, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("queue", torch.zeros(num_views, size, dim))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def keys(self, view: int) -> torch.Tensor:
        return self.queue[view, : int(self.filled)]

    @torch.no_grad()
    def push(self, keys: list[torch.Tensor]) -> None:
        """Enqueue V tensors of N keys each (N = W*B, identical on every rank)."""
        n = keys[0].shape[0]
        rows = (self.position + torch.arange(n, device=self.queue.device)) % self.size
        for v, k in enumerate(keys):
            self.queue[v, rows[-self.size:]] = k[-self.size:].to(self.queue.dtype)
        self.position.copy_((self.position + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
