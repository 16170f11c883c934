"""Mutual-information lower bounds as pure functions of score matrices.

No process groups, no global state: callers pass scores already computed against gathered keys.
The bounds issue adds NWJ, DV, MINE, JS, SMILE and Barber-Agakov beside InfoNCE.
"""

from __future__ import annotations

import math

import torch


def infonce(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-query InfoNCE lower bound on I(x; y) in nats.

    Args:
        scores: B x K critic scores f(x_j, y_i) of B queries against K candidates (fp32).
        positives: B long indices, the candidate column holding each query's positive.

    Returns:
        B values ``log K + S[i, pos_i] - logsumexp_j S[i, j]``; each is <= log K.
    """
    k = scores.shape[1]
    pos = scores.gather(1, positives[:, None]).squeeze(1)
    return math.log(k) + pos - torch.logsumexp(scores, dim=1)
