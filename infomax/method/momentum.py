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

BatchNorm leaks: queries, their positives and the batch's other keys share the current batch's
statistics, the queue's keys older ones, so the model can tell "this batch" from "the queue" (MoCo
Sec. 3.3). ``model.shuffle_bn`` is MoCo's cure, shuffling BN (:func:`shuffled_keys`): the keys of a
random permutation of the global batch, computed in groups with their own statistics. Without it, on
several processes ``model.sync_bn`` computes statistics over the global batch (so at least no rank's
queries find their keys by their rank's statistics), and ``monitor/neg_score_batch`` against
``monitor/neg_score_queue`` shows what leak is left.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from infomax.runtime.device import send
from infomax.runtime.distributed import gather, own_rows, rank, world_size


class MomentumKeys(nn.Module):
    """An EMA copy of the online model that maps V views to V key embeddings (B x D each), no gradient."""

    def __init__(self, online: nn.Module, momentum: float, shuffle_groups: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.model = copy.deepcopy(online).requires_grad_(False)
        self.momentum, self.shuffle_groups, self.seed = momentum, shuffle_groups, seed

    @torch.no_grad()
    def forward(self, views: list[torch.Tensor], step: int = 0) -> list[torch.Tensor]:
        """V views (B x C x H x W each, this rank's) -> V keys (B x D); with ``shuffle_groups`` through
        :func:`shuffled_keys`, its permutation a function of (seed, step), so a resumed run draws it again."""
        self.model.train()
        if not self.shuffle_groups:
            return self.model(views)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return shuffled_keys(self.model, views, self.shuffle_groups, g)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter (BN buffers follow their own batches)."""
        keys = [p for p in self.model.parameters()]
        queries = [p.detach() for p in online.parameters()]
        torch._foreach_lerp_(keys, queries, 1.0 - self.momentum)


def shuffled_keys(model: Callable[[list[torch.Tensor]], list[torch.Tensor]], views: list[torch.Tensor], groups: int,
                  g: torch.Generator) -> list[torch.Tensor]:
    """MoCo's shuffling BN (its ``_batch_shuffle_ddp``, and on one process its SplitBatchNorm demo): the
    global batch (W*B images per view) in a random order ``g`` draws alike on every rank; each rank takes
    its B of that order, computes their keys in ``groups`` groups, each on its own BatchNorm statistics,
    and gets back the keys of its own rows. A query and its positive key then rarely share statistics.

    views: V x (B x C x H x W), this rank's; returns V x (B x D) in the views' row order."""
    b, device = views[0].shape[0], views[0].device
    images = [gather(v) for v in views]  # V x (W*B x C x H x W)
    order = send(torch.randperm(world_size() * b, generator=g), device)
    share = order[rank() * b: (rank() + 1) * b]
    computed = [model([v[rows] for v in images]) for rows in share.chunk(groups)]  # per group: V x (rows x D)
    keys = [gather(torch.cat(per_view)) for per_view in zip(*computed)]  # V x (W*B x D): key j is of row order[j]
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=device)  # where each global row's key landed
    return [k[position[own_rows(b, device)]] for k in keys]


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
        self.filled_now = 0  # ``filled`` on the host, so that reading the queue asks the GPU nothing

    def keys(self, view: int) -> torch.Tensor:
        return self.queue[view, : self.filled_now]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.filled_now = int(self.filled)  # once, at a resume

    @torch.no_grad()
    def push(self, keys: list[torch.Tensor]) -> None:
        """Enqueue V tensors of N keys each (N = W*B, identical on every rank)."""
        n = keys[0].shape[0]
        rows = (self.position + torch.arange(n, device=self.queue.device)) % self.size
        for v, k in enumerate(keys):
            self.queue[v, rows[-self.size:]] = k[-self.size:].to(self.queue.dtype)
        self.position.copy_((self.position + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
        self.filled_now = min(self.filled_now + n, self.size)
