"""The only module that calls torch.distributed.

We deliberately own :func:`gather_with_grad` instead of using a library's: ``accelerator.gather``
carries no gradient, and ``torch.distributed.nn.all_gather`` returned wrong gradients in some
releases. Its exactness is pinned by tests/test_distributed.py (2 processes == 1 process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # never all-reduce autograd's own buffer in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B x D per rank) into (W*B x D), rank r's rows at ``r*B : (r+1)*B``.

    Carries gradient to every rank's rows. Rank r's embeddings are keys in every rank's loss,
    so dL_total/dx_r = sum over ranks k of dL_k/dx_r: backward all-reduces (sums) the incoming
    gradient of the gathered tensor and returns this rank's slice. Each rank then holds the
    gradient of the *sum* of all ranks' losses with respect to its own inputs; DDP's gradient
    averaging divides by W, which yields exactly the gradient of the mean loss over the global
    W*B batch, i.e. what one process with the whole batch computes.

    Every rank must pass the same shape. With one process this is the identity.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B x D per rank) into (W*B x D) in rank order, *without* gradient.

    For tensors that carry none by design: a momentum model's keys (pretrain.momentum).
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (used to agree on stop / non-finite flags). No gradient."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
