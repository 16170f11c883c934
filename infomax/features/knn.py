"""Weighted kNN classification on L2-normalised features (Wu et al. 2018), used as an online
monitor during pretraining; pure functions, so the eval stage reuses them. :func:`sharded_knn_predict_many`
leaves the bank split across ranks (ImageNet's 1.28M x 2048 train features are 10 GB a copy), as DINO's
``eval_knn`` does."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from infomax.runtime.device import send
from infomax.runtime.distributed import gather, is_distributed

QUERY_CHUNK = 1024  # queries scored against the bank at once: a 1024 x bank similarity block


@torch.no_grad()
def knn_predict_many(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: Sequence[int], temperature: float,
    num_classes: int, chunk: int = QUERY_CHUNK,
) -> dict[int, torch.Tensor]:
    """Class predictions for each neighbour count in ``ks`` by temperature-weighted cosine votes of the
    k nearest bank entries, from one similarity pass: the k nearest are the first k of the largest k.

    Args:
        bank: N x F features; bank_labels: N long (on the bank's device); queries: M x F features (any device).

    Returns:
        k -> M long predictions, on the bank's device.
    """
    if not ks:
        return {}
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    top = min(max(ks), bank.shape[0])
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    for q in queries.split(chunk):  # the queries may be on the host; each chunk is scored where the bank is
        sim, idx = similarities(send(q, bank.device), bank).topk(top, dim=1)  # M' x top, best first
        _vote(sim, bank_labels[idx], temperature, num_classes, preds)
    return {k: torch.cat(p) for k, p in preds.items()}


@torch.no_grad()
def sharded_knn_predict_many(
    bank_shard: torch.Tensor, shard_labels: torch.Tensor, queries: torch.Tensor, ks: Sequence[int], temperature: float,
    num_classes: int, chunk: int = QUERY_CHUNK,
) -> dict[int, torch.Tensor]:
    """:func:`knn_predict_many` with the bank split across ranks: each rank holds only its shard
    (N_r x F, disjoint shards that together are the bank) and the same M x F queries. For each chunk of
    queries every rank finds the largest k in its shard, the ranks gather those (M' x W*k scores and
    labels) and keep the largest k: the same neighbours as one bank in one process. No rank holds more
    than its shard, one chunk's M' x N_r similarities and the gathered candidates. Every rank returns
    the predictions, on the shard's device. With one process it is :func:`knn_predict_many`.

    As DINO's ``knn_classifier``, each chunk is scored where the shard lives and only device tensors cross
    ranks (NCCL takes nothing else): keep the shard on the accelerator; the queries may be on the host.
    """
    if not ks:
        return {}
    if not is_distributed():
        return knn_predict_many(bank_shard, shard_labels, queries, ks, temperature, num_classes, chunk)
    bank_shard = F.normalize(bank_shard.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    top = max(ks)
    # a shard smaller than k: pad with candidates that never win (score -inf, weight 0)
    pad = max(0, top - bank_shard.shape[0])
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    for q in queries.split(chunk):
        sim = similarities(send(q, bank_shard.device), bank_shard)
        if pad:
            sim = torch.cat([sim, sim.new_full((q.shape[0], pad), float("-inf"))], dim=1)
        labels = torch.cat([shard_labels, shard_labels.new_zeros(pad)]) if pad else shard_labels
        sim, idx = sim.topk(top, dim=1)
        # the ranks' candidates side by side: M' x (W * top), then the best top of them
        cand_sim, cand_labels = (gather(t.T.contiguous()).T for t in (sim, labels[idx]))
        sim, best = cand_sim.topk(top, dim=1)
        _vote(sim, cand_labels.gather(1, best), temperature, num_classes, preds)
    return {k: torch.cat(p) for k, p in preds.items()}


def similarities(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """M' x N cosine similarities of normalised rows (the only M' x N tensor a kNN pass holds)."""
    return queries @ bank.T


def _vote(sim: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int,
          preds: dict[int, list[torch.Tensor]]) -> None:
    """Append each k's prediction for M' queries from their neighbours' M' x top scores and labels (best first)."""
    weights = (sim / temperature).exp()  # -inf padding weighs 0
    for k in preds:
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[:, :k], weights[:, :k])
        preds[k].append(votes.argmax(1))


def knn_predict(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float, num_classes: int,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """M long predictions of :func:`knn_predict_many` for one neighbour count ``k``."""
    return knn_predict_many(bank, bank_labels, queries, [k], temperature, num_classes, chunk)[k]
