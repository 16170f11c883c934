"""What the training loop needs from an objective, and nothing more.

An objective is an ``nn.Module`` (learned critics train with the model; state such as MINE's moving
average or MoCo's queue lives in buffers and goes into checkpoints) that:

- declares the model it needs: ``local_stages`` None for one embedding per view (``MultiViewModel``),
  or the timm stages whose local feature maps it scores (``LocalGlobalModel``);
- maps the model's output (and, with ``takes_keys``, a momentum model's keys) to a loss and
  diagnostics that hold at least ``mi`` and ``log_k``: build them with :func:`diagnostics`;
- may act once a step has been taken (:meth:`Objective.after_step`: MoCo's queue, NNCLR's support set);
- is built from ``objective.*`` by its ``from_config``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from infomax.config.pretrain import ObjectiveConfig


class Objective(nn.Module):
    """Base class of every objective in the registry (:func:`infomax.method.objectives.build_objective`)."""

    local_stages: list[int] | None = None  # None: embeddings per view; else the stages of the local maps it scores
    takes_keys: bool = False  # True: forward also takes a momentum model's keys (objective.queue_size)

    @classmethod
    def check_config(cls, cfg: ObjectiveConfig) -> None:
        """Refuse (ConfigError) ``objective.*`` settings this objective cannot train with, before anything is built:
        ``launch/submit.py`` calls it so that a job does not queue for hours to fail at its start."""

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, num_views: int, embed_dim: int) -> Objective:
        """The objective configured by ``objective.*`` for ``num_views`` views of ``embed_dim``-wide embeddings."""
        raise NotImplementedError

    def forward(self, z: list[Any], keys: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, diagnostics) for the model's output ``z`` (one entry per view); see :func:`diagnostics`."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step that was taken (a skipped non-finite step calls nothing)."""


def diagnostics(mi: torch.Tensor, log_k: torch.Tensor | float, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """The diagnostics every objective returns: ``mi`` (its bound in nats, detached), ``log_k`` (the bound's
    ceiling, log of the candidates per positive: the progress bar shows mi / log_k) and its own ``extra``
    (``monitor/x`` keys are logged under monitor/, the rest under train/)."""
    log_k = log_k if isinstance(log_k, torch.Tensor) else mi.new_full((), log_k)  # made on the device: no copy
    return {"mi": mi.detach(), "log_k": log_k.detach(), **extra}


def fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (keeps float64 for exactness tests); scores never run in bf16/fp16 (invariant 2)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))

