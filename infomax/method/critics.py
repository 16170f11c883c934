"""Critics f(x, y): query embeddings (B x D) x key embeddings (K x D) -> scores (B x K), fp32.

Critics and bounds combine freely (``objective.critic`` x ``objective.bound``). Learned critics
(bilinear, concat) hold parameters: they are optimised with the model and, with several processes,
wrapped in DDP like it, so their gradients are averaged exactly as the encoder's are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from infomax.config.pretrain import CHOICES


class CosineCritic(nn.Module):
    """Separable: cos(q, k) / temperature (SimCLR, CMC)."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / self.temperature


class DotCritic(nn.Module):
    """Separable: q . k / sqrt(D) (CPC, AMDIM-style unnormalised scores)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.T / math.sqrt(q.shape[1])


class BilinearCritic(nn.Module):
    """q^T W k / sqrt(D) with a learned D x D matrix W, initialised to the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ self.weight.to(q.dtype) @ k.T / math.sqrt(q.shape[1])


class ConcatCritic(nn.Module):
    """Joint critic MLP([q_i, k_j]) over all B x K pairs: the most expressive, O(B K) MLP calls."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b, n = q.shape[0], k.shape[0]
        pairs = torch.cat([q[:, None, :].expand(b, n, -1), k[None, :, :].expand(b, n, -1)], dim=2)
        return self.net.to(q.dtype)(pairs).squeeze(-1)


CRITICS = CHOICES["objective.critic"]


def build_critic(name: str, dim: int, temperature: float) -> nn.Module:
    if name == "cosine":
        return CosineCritic(temperature)
    if name == "dot":
        return DotCritic()
    if name == "bilinear":
        return BilinearCritic(dim)
    if name == "concat":
        return ConcatCritic(dim)
    raise ValueError(f"unknown critic '{name}'; choose from {', '.join(CRITICS)}")
