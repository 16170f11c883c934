"""Label-fraction scores: the fast probe and kNN fitted on 1 % or 10 % of the training labels, the table SSL
papers print beside the linear probe (SimCLR and BYOL's semi-supervised columns).

Each fraction's subset holds that share of every class, drawn by a permutation seeded with the eval's seed, so
every row of a report (and every report with that seed) is fitted on the same images. Only the fits shrink: the
features are the ones the row already extracted, and the scored split is the whole one.
"""

from __future__ import annotations

from typing import Callable

import torch

from infomax.eval.probe import ProbeResult

XY = tuple[torch.Tensor, torch.Tensor]  # (N x F features, N labels)


def fraction_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Ascending positions of ``fraction`` of each class's items in ``labels`` (N), rounded, one at least, drawn
    by a permutation seeded with ``seed`` (per class, in class order)."""
    generator, picked = torch.Generator().manual_seed(seed), []
    labels = labels.cpu()
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(picked).sort().values


def fraction_key(fraction: float) -> str:
    """A fraction as the report names it: 0.01 -> "1%"."""
    return f"{100 * fraction:g}%"


def describe_fractions(fractions: list[float], seed: int) -> str:
    """The report's sentence on the label-fraction columns; "" without them."""
    if not fractions:
        return ""
    return (f" Label fractions ({', '.join(map(fraction_key, fractions))}): the probe and kNN fitted on that share of "
            f"the train images' labels, each class in proportion, drawn with seed {seed}; scored as the other columns.")


def label_fraction_scores(train_xy: XY, test_xy: XY, fractions: list[float], seed: int,
                          probe: Callable[[XY, XY], ProbeResult],
                          knn: Callable[[XY, XY], dict[str, float]]) -> dict[str, dict]:
    """For each fraction: ``probe`` and ``knn`` fitted on its subset of ``train_xy`` and scored on all of
    ``test_xy``; {"1%": {"images": n, "top1", "top5", "knn": {k: top-1}}, ...}."""
    scores = {}
    for fraction in fractions:
        idx = fraction_indices(train_xy[1], fraction, seed)
        subset = (train_xy[0][idx.to(train_xy[0].device)], train_xy[1][idx.to(train_xy[1].device)])
        scores[fraction_key(fraction)] = fraction_scores(subset, test_xy, probe, knn)
    return scores


def fraction_scores(fit_xy: XY, test_xy: XY, probe: Callable[[XY, XY], ProbeResult],
                    knn: Callable[[XY, XY], dict[str, float]]) -> dict:
    """One fraction's entry: ``probe`` and ``knn`` fitted on ``fit_xy`` and scored on ``test_xy``."""
    fit = probe(fit_xy, test_xy)
    return {"images": len(fit_xy[1]), "top1": fit.top1, "top5": fit.top5, "knn": knn(fit_xy, test_xy)}
