"""The `fast` linear probe: a linear classifier trained to convergence on cached frozen features.

Features are standardised with train statistics. The weight decay is chosen on a held-out part of
the train split, then the classifier is retrained on the whole train split with that value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ProbeResult:
    top1: float
    top5: float
    weight_decay: float
    val_top1: dict[float, float]  # held-out top-1 for each weight decay tried


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
               steps: int = 100, seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (N x F features, N labels)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + weight_decay * model.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 weight_decays: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3), held_out: float = 0.1,
                 steps: int = 100, seed: int = 0) -> ProbeResult:
    """Standardise, choose weight decay on a held-out part of train, retrain on all of train, test.

    Args:
        train_x: N x F features, train_y: N labels; test_x: M x F, test_y: M.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(held_out * len(train_x)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    val_top1 = {}
    for wd in weight_decays:
        clf = fit_linear(train_x[fit_idx], train_y[fit_idx], num_classes, wd, steps, seed)
        with torch.no_grad():
            val_top1[wd] = topk_accuracy(clf(train_x[val_idx]), train_y[val_idx], 1)
    best = max(weight_decays, key=lambda wd: (val_top1[wd], wd))
    clf = fit_linear(train_x, train_y, num_classes, best, steps, seed)
    with torch.no_grad():
        logits = clf(test_x)
    return ProbeResult(topk_accuracy(logits, test_y, 1), topk_accuracy(logits, test_y, 5), best, val_top1)
