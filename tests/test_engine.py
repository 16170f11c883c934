"""The training step's non-finite-loss guard: stop naming the step, or skip it untouched (docs/DESIGN.md, invariant 2)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from conftest import contrastive
from pretrain.engine import NonFiniteLoss, train_step


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
