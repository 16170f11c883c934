"""The training step's non-finite-loss guard: stop naming the step, or skip it untouched (docs/DESIGN.md, invariant 2)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from conftest import contrastive
from infomax.train.engine import NonFiniteLoss, train_step


def _step(model: nn.Module, views: list[torch.Tensor], skip: bool):
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_step(accelerator, model, contrastive(0.1), optimizer, views, grad_clip=1.0,
                      skip_nonfinite=skip, step=7)


class TwoView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, views):
        return [self.net(v) for v in views]


def test_nonfinite_loss_stops_with_the_step_named() -> None:
    views = [torch.full((4, 4), float("nan")), torch.randn(4, 4)]
    with pytest.raises(NonFiniteLoss, match="not finite at step 7.*optim.skip_nonfinite"):
        _step(TwoView(), views, skip=False)


def test_nonfinite_loss_skips_without_touching_weights_when_configured() -> None:
    model = TwoView()
    before = [p.clone() for p in model.parameters()]
    result = _step(model, [torch.full((4, 4), float("nan")), torch.randn(4, 4)], skip=True)
    assert result.grad_norm is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    result = _step(model, [torch.randn(4, 4), torch.randn(4, 4)], skip=True)
    assert result.grad_norm is not None and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("gradient", [float("inf"), 1.0], ids=["inf", "finite"])
def test_fp16_scaler_skip_leaves_the_momentum_model_and_the_queue_alone(gradient: float) -> None:
    """fp16 on a GPU: GradScaler skips the optimizer step when a gradient is inf/NaN while the loss is finite.
    The EMA key model and the queue must then not move either. Rehearsed on the CPU with torch's CPU
    GradScaler handed to Accelerate and one gradient forced to ``gradient`` (a finite one: everything moves)."""
    from infomax.method.momentum import MomentumKeys

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")
    model = TwoView()
    key_model = MomentumKeys(model, momentum=0.5)
    model.net.bias.register_hook(lambda g: torch.full_like(g, gradient))
    objective = contrastive(0.1, dim=3, queue_size=16)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    weights, keys = [p.clone() for p in model.parameters()], [p.clone() for p in key_model.parameters()]
    result = train_step(accelerator, model, objective, optimizer, [torch.randn(4, 4), torch.randn(4, 4)],
                        grad_clip=0.0, skip_nonfinite=False, step=0, key_model=key_model)
    skipped = gradient == float("inf")
    assert (result.grad_norm is None) == skipped and torch.isfinite(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())) == skipped
    assert all(torch.equal(a, b) for a, b in zip(keys, key_model.parameters())) == skipped
    assert objective.candidates.queue.filled_now == (0 if skipped else 4)
