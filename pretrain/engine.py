"""One training step under Accelerate: forward, fp32 objective, cross-rank flags, backward, clip, step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from accelerate import Accelerator
from torch import nn

from pretrain.distributed import all_reduce_max_
from pretrain.momentum import MomentumKeys
from pretrain.online_probe import probe_step


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and what to change."""


@dataclass
class StepResult:
    loss: torch.Tensor  # detached scalar
    diag: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None  # None when the step was skipped
    stop: bool  # some rank asked to stop
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
    stop_requested: bool,
    step: int,
    channels_last: bool = False,
    key_model: MomentumKeys | None = None,
    probe: tuple[nn.Module, torch.optim.Optimizer, torch.Tensor] | None = None,
) -> StepResult:
    """Forward V views, InfoNCE in fp32, agree across ranks on (non-finite, stop), backward, clip, step.

    With ``key_model`` (the momentum queue) the keys come from it, and after the optimizer step it
    moves towards the online model. Raises NonFiniteLoss on a NaN/inf loss unless ``skip_nonfinite``
    (then no update is made). ``probe`` = (online probe, its optimizer, labels): it trains on view 0's
    detached encoder features after the encoder's step.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = [v.to(memory_format=fmt) for v in views]
    with accelerator.autocast():
        z, features = model(views, with_features=True) if probe is not None else (model(views), None)
        keys = key_model(views, step) if key_model is not None else None
    loss, diag = objective(z, keys)  # pretrain.objectives.base.Objective
    # One collective for both decisions, so every rank takes the same branch (no DDP hang).
    # Built on the device and read once: the step's one host sync, which deciding to skip or stop needs.
    stop_flag = torch.tensor(float(stop_requested), device=loss.device)
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(), stop_flag])
    nonfinite, stop = (bool(f) for f in all_reduce_max_(flags).tolist())
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if not skip_nonfinite:
            raise NonFiniteLoss(
                f"loss is not finite at step {step} (local loss {loss.item()}): lower optim.lr, set optim.grad_clip, "
                "prefer run.precision=bf16 over fp16, or set optim.skip_nonfinite=true to skip such steps"
            )
        return StepResult(loss.detach(), diag, None, stop)
    accelerator.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # model and any learned critic
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if key_model is not None:
        key_model.update(accelerator.unwrap_model(model))
    accelerator.unwrap_model(objective).after_step()  # MoCo's queue, NNCLR's support set
    probe_loss = probe_step(*probe[:2], features, probe[2]) if probe is not None else None
    return StepResult(loss.detach(), diag, torch.as_tensor(grad_norm).detach(), stop, probe_loss)
