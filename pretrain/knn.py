"""Weighted kNN classification on L2-normalised features (Wu et al. 2018), used as an online
monitor during pretraining; a pure function, so the eval stage reuses it."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict_many(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: Sequence[int], temperature: float,
    num_classes: int, chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """Class predictions for each neighbour count in ``ks`` by temperature-weighted cosine votes of the
    k nearest bank entries, from one similarity pass: the k nearest are the first k of the largest k.

    Args:
        bank: N x F features; bank_labels: N long; queries: M x F features.

    Returns:
        k -> M long predictions.
    """
    if not ks:
        return {}
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    top = min(max(ks), bank.shape[0])
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(top, dim=1)  # M' x top, most similar first
        weights, labels = (sim / temperature).exp(), bank_labels[idx]
        for k in preds:
            votes = torch.zeros(q.shape[0], num_classes, device=q.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(p) for k, p in preds.items()}


def knn_predict(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float, num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """M long predictions of :func:`knn_predict_many` for one neighbour count ``k``."""
    return knn_predict_many(bank, bank_labels, queries, [k], temperature, num_classes, chunk)[k]
