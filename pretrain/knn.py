"""Weighted kNN classification on L2-normalised features (Wu et al. 2018), used as an online
monitor during pretraining; a pure function, so the eval stage reuses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float, num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class predictions by temperature-weighted cosine votes of the k nearest bank entries.

    Args:
        bank: N x F features; bank_labels: N long; queries: M x F features.

    Returns:
        M long predictions.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # M' x k
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)
