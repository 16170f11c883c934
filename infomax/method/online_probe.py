"""An online linear probe (solo-learn style): watch a run learn without touching the encoder.

A linear classifier on *detached* encoder features of view 0, trained with labels during
pretraining by its own optimizer. Labels reach only this head: the features are detached before
it, so the encoder's gradients are exactly those of the MI objective (tests/test_online_probe.py).
BatchNorm without affine parameters in front standardises the features as they drift (as in MAE's
linear probe), so one learning rate works through the whole run. Scored on held-out labelled
images at each monitor point (``monitor/online_probe_top1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnlineProbe(nn.Module):
    """features (B x F) -> class logits (B x num_classes)."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def probe_step(probe: nn.Module, optimizer: torch.optim.Optimizer, features: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """One cross-entropy step of the probe on detached fp32 features (B x F); returns the detached loss."""
    logits = probe(features.detach().float())
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def probe_accuracy(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of the probe (eval mode) on held-out features (N x F) and labels (N)."""
    was_training = probe.training
    probe.eval()
    pred = probe(features.float().to(next(probe.parameters()).device)).argmax(1).cpu()
    probe.train(was_training)
    return (pred == labels).float().mean().item()
