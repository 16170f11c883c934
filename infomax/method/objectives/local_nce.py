"""NCE of queries against every position of gathered local feature maps: AMDIM's and DIM's shared estimator."""

from __future__ import annotations

import math

import torch


def multi_positive_nce(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
                       tclip: float | None, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NCE of query vectors against *all positions* of gathered local maps (AMDIM; DIM's ``nce_loss``).

    Args:
        queries: Q x D (a global embedding per image, or one per local position).
        keys: K x N x D local embeddings (K images gathered from all ranks, N positions each).
        positives: Q indices into K: the image each query's positives come from.
        tclip: scores are soft-clipped to ``tclip * tanh(s / tclip)`` (AMDIM); None: no clipping (DIM).
        scaled: dot products divided by sqrt(D) (AMDIM); DIM's reference uses them as they are.

    Returns:
        (loss, mi, reg): loss = mean over queries and positive positions of -log softmax of that
        positive against every position of every other image; mi = log(1 + (K-1) N) - loss (an
        InfoNCE bound with that many candidates); reg = mean squared raw score (AMDIM's regulariser).
    """
    k, n, d = keys.shape
    raw = torch.einsum("qd,knd->qkn", queries, keys) / (math.sqrt(d) if scaled else 1.0)  # Q x K x N
    scores = raw if tclip is None else tclip * torch.tanh(raw / tclip)
    rows = torch.arange(len(queries), device=queries.device)
    pos = scores[rows, positives]  # Q x N
    own = positives[:, None] == torch.arange(k, device=queries.device)  # Q x K: a fill, not a boolean index
    neg_lse = torch.logsumexp(scores.masked_fill(own[:, :, None], float("-inf")).flatten(1), dim=1)  # Q
    loss = -(pos - torch.logaddexp(pos, neg_lse[:, None])).mean()
    return loss, math.log(1 + (k - 1) * n) - loss.detach(), (raw**2).mean()
