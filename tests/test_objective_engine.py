"""InfoNCE diagnostics and the non-finite-loss guard (docs/DESIGN.md, invariant 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from pretrain.bounds import infonce_per_query as infonce
from pretrain.engine import NonFiniteLoss, train_step
from pretrain.objectives import ContrastiveObjective


def test_infonce_equals_log_k_minus_cross_entropy_and_never_exceeds_log_k() -> None:
    scores = torch.randn(6, 10) * 5
    pos = torch.tensor([0, 3, 2, 9, 4, 5])
    bound = infonce(scores, pos)
    assert torch.allclose(bound, math.log(10) - F.cross_entropy(scores, pos, reduction="none"))
    assert (bound <= math.log(10)).all()
    perfect = torch.eye(10) * 50  # negatives e^-50 below the positive: the bound sits at its ceiling
    assert torch.allclose(infonce(perfect, torch.arange(10)), torch.full((10,), math.log(10)))


def test_objective_diagnostics_for_identical_and_random_views() -> None:
    objective = ContrastiveObjective(temperature=0.05)
    z = torch.randn(16, 8)
    loss, diag = objective([z, z.clone()])
    assert diag["top1"] == 1.0 and torch.isclose(diag["pos"], torch.tensor(1.0 / 0.05))  # cos = 1, / temperature
    assert torch.isclose(diag["mi"], diag["log_k"] - loss) and diag["log_k"] == pytest.approx(math.log(16))
    _, diag_random = objective([torch.randn(16, 8), torch.randn(16, 8)])
    assert diag_random["mi"] < diag["mi"]


def test_logits_stay_fp32_under_bf16_autocast() -> None:
    seen = []
    objective = ContrastiveObjective(0.1)
    original = infonce.__globals__["torch"].logsumexp

    def spy(x, dim):
        seen.append(x.dtype)
        return original(x, dim=dim)

    z = [torch.randn(8, 4, dtype=torch.bfloat16) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.logsumexp, saved = spy, torch.logsumexp
        try:
            loss, _ = objective(z)
        finally:
            torch.logsumexp = saved
    assert loss.dtype == torch.float32 and seen and all(d == torch.float32 for d in seen)


def _step(model: nn.Module, views: list[torch.Tensor], skip: bool):
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_step(accelerator, model, ContrastiveObjective(0.1), optimizer, views, grad_clip=1.0,
                      skip_nonfinite=skip, stop_requested=False, step=7)


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


@pytest.mark.parametrize("critic", ["cosine", "dot", "bilinear", "concat"])
def test_every_critic_combines_with_every_bound(critic: str) -> None:
    z = [torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for bound in ("infonce", "nwj", "dv", "mine", "js", "smile"):
        objective = ContrastiveObjective(0.5, bound, critic=critic, dim=4).double()
        loss, diag = objective(z)
        loss.backward()
        assert torch.isfinite(loss) and z[0].grad is not None
        if critic in ("bilinear", "concat"):
            assert all(p.grad is not None for p in objective.critic.parameters())
