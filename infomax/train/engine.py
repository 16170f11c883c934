"""One training step under Accelerate: forward, fp32 objective, cross-rank flags, backward, clip, step.

The step is :class:`infomax.train.loop.Run`'s step in the shared :class:`infomax.train.resumable.TrainingLoop`, whose
per-step agreement carries the non-finite flag beside the stop request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from accelerate import Accelerator
from torch import nn

from infomax.method.momentum import MomentumKeys
from infomax.method.online_probe import probe_step
from infomax.runtime.distributed import Agree, agree_max


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and what to change."""


@dataclass
class StepResult:
    loss: torch.Tensor  # detached scalar
    diag: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None  # None when the step was skipped
    probe_loss: torch.Tensor | None = None  # the online probe's cross-entropy, when it trained


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    views: Sequence[torch.Tensor],
    *,
    grad_clip: float,
    skip_nonfinite: bool,
    step: int,
    agree: Agree | None = None,
    channels_last: bool = False,
    key_model: MomentumKeys | None = None,
    probe: tuple[nn.Module, torch.optim.Optimizer, torch.Tensor] | None = None,
) -> StepResult:
    """Forward V views, InfoNCE in fp32, agree across ranks on the non-finite flag, backward, clip, step.

    ``agree`` is the loop's agreement for this step (:meth:`infomax.train.resumable.TrainingLoop.agree`): the
    non-finite flag goes into it beside the loop's stop request, one collective for both. Without it (a
    lone step: tests, benchmarks) the flag is agreed alone (:func:`infomax.runtime.distributed.agree_max`).

    With ``key_model`` (the momentum queue) the keys come from it, and after the optimizer step it
    moves towards the online model. Raises NonFiniteLoss on a NaN/inf loss unless ``skip_nonfinite``
    (then no update is made). When fp16's gradient scaler skips the optimizer step (inf/NaN gradients), the
    momentum model, the queue and the probe stay as they were too: keys of an encoder that did not move would
    enter the queue twice, and the EMA would drift towards nothing. ``probe`` = (online probe, its optimizer,
    labels): it trains on view 0's detached encoder features after the encoder's step.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = [v.to(memory_format=fmt) for v in views]
    with accelerator.autocast():
        z, features = model(views, with_features=True) if probe is not None else (model(views), None)
        keys = key_model(views, step) if key_model is not None else None
    loss, diag = objective(z, keys)  # infomax.method.objectives.base.Objective
    # One collective for the step's decisions (skip or raise here, stop in the loop), so every rank takes the same
    # branch (no DDP hang). The flag stays on the device until it: the step's one host sync (invariant 8).
    agree = agree if agree is not None else (lambda *values: agree_max(loss.device, *values))
    nonfinite = bool(agree(~torch.isfinite(loss.detach()))[0])
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if not skip_nonfinite:
            raise NonFiniteLoss(
                f"loss is not finite at step {step} (local loss {loss.item()}): lower optim.lr, set optim.grad_clip, "
                "prefer run.precision=bf16 over fp16, or set optim.skip_nonfinite=true to skip such steps"
            )
        return StepResult(loss.detach(), diag, None)
    accelerator.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # model and any learned critic
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.optimizer_step_was_skipped:  # fp16's scaler found inf/NaN gradients: nothing moved
        return StepResult(loss.detach(), diag, None)
    if key_model is not None:
        key_model.update(accelerator.unwrap_model(model))
    accelerator.unwrap_model(objective).after_step()  # MoCo's queue, NNCLR's support set
    probe_loss = probe_step(*probe[:2], features, probe[2]) if probe is not None else None
    return StepResult(loss.detach(), diag, torch.as_tensor(grad_norm).detach(), probe_loss)
