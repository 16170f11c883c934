"""MI bounds: oracle-critic values on the correlated Gaussian, and algebraic identities."""

from __future__ import annotations

import math

import pytest
import torch

from infomax.method import bounds

D, K, BATCHES = 20, 64, 2000


def rho_for(mi: float, d: int = D) -> float:
    """Correlation giving true MI ``mi`` nats for x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) eps."""
    return math.sqrt(1 - math.exp(-2 * mi / d))


def oracle_scores(mi: float, batches: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, x, y) with S[b, i, j] = log p(y_i | x_j) - log p(y_i), the optimal critic, float64."""
    g = torch.Generator().manual_seed(seed)
    rho = rho_for(mi)
    x = torch.randn(batches, K, D, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(batches, K, D, generator=g, dtype=torch.float64)
    var = 1 - rho**2
    dist2 = ((y[:, :, None, :] - rho * x[:, None, :, :]) ** 2).sum(-1)  # b x i x j
    S = -0.5 * D * math.log(var) - dist2 / (2 * var) + 0.5 * (y**2).sum(-1)[:, :, None]
    return S, x, y


# Where these come from: closed-form oracle-critic scores (oracle_scores above), averaged by this
# project over 2000 batches of K=64 in float64 once, with our own implementation of each formula.
# They are not published figures; they pin the formulas against regressions (Poole et al. 2019 and
# Song & Ermon 2020 show trained critics, not the oracle, so their plots cannot be compared digit by digit).
REFERENCE = {  # true MI: (InfoNCE, NWJ(S+1), DV, SMILE tau=5, SMILE tau=1)
    2: (1.812, 1.999, 2.004, 2.028, 2.372),
    4: (3.069, 4.005, 4.061, 4.266, 4.657),
    6: (3.738, None, 6.231, 6.711, 6.826),
    8: (4.023, None, 8.613, 9.318, 8.919),
    10: (4.122, None, 11.287, 12.062, 10.967),
}


@pytest.mark.parametrize("mi", sorted(REFERENCE))
def test_oracle_critic_values_match_reference(mi: int) -> None:
    S, _, _ = oracle_scores(mi, BATCHES, seed=mi)
    estimators = {
        "infonce": bounds.infonce,
        "nwj": lambda s: bounds.nwj(s + 1.0),
        "dv": bounds.dv,
        "smile5": lambda s: bounds.smile(s, 5.0),
        "smile1": lambda s: bounds.smile(s, 1.0),
    }
    for (name, fn), expected in zip(estimators.items(), REFERENCE[mi]):
        if expected is None:
            continue
        values = torch.stack([fn(s) for s in S])
        se = values.std() / math.sqrt(BATCHES)
        assert abs(values.mean().item() - expected) < 4 * se.item() + 1e-3, (name, mi, values.mean().item(), expected)


@pytest.mark.parametrize("mi", [2, 6, 10])
def test_barber_agakov_with_true_decoder_recovers_true_mi(mi: int) -> None:
    g = torch.Generator().manual_seed(100 + mi)
    rho = rho_for(mi)
    x = torch.randn(200_000, D, generator=g, dtype=torch.float64)  # SE of the mean ~ 0.007 nats
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(200_000, D, generator=g, dtype=torch.float64)
    log_q = bounds.gaussian_log_prob(x, rho * y, math.log(1 - rho**2))  # q(x|y) = p(x|y)
    entropy = 0.5 * D * math.log(2 * math.pi * math.e)
    assert abs(bounds.barber_agakov(log_q, entropy).item() - mi) < 0.04


def random_scores(k: int = 16, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(k, k, generator=g, dtype=torch.float64)).requires_grad_(requires_grad)


def grad_of(fn, S: torch.Tensor) -> torch.Tensor:
    S = S.detach().clone().requires_grad_(True)
    fn(S).backward()
    return S.grad


def test_infonce_ceiling_and_row_shift_invariance() -> None:
    S = random_scores()
    assert bounds.infonce(S * 100 + torch.eye(16, dtype=torch.float64) * 1e3) <= math.log(16) + 1e-12
    shift = torch.randn(16, 1, dtype=torch.float64)
    assert torch.allclose(bounds.infonce(S), bounds.infonce(S + shift))


def test_dv_ignores_a_global_constant_but_nwj_does_not() -> None:
    S = random_scores()
    assert torch.allclose(bounds.dv(S), bounds.dv(S + 3.0))
    assert not torch.allclose(bounds.nwj(S), bounds.nwj(S + 3.0))


def test_nwj_is_tuba_with_shifted_scores_and_smile_inf_is_dv() -> None:
    S = random_scores()
    assert torch.allclose(bounds.nwj(S), bounds.tuba(S - 1.0))
    assert torch.allclose(bounds.smile(S, math.inf), bounds.dv(S))


def test_js_reads_nwj_plus_one_with_the_js_objectives_gradient() -> None:
    S = random_scores()
    assert torch.allclose(bounds.js(S), bounds.nwj(S + 1.0))
    assert torch.allclose(grad_of(bounds.js, S), grad_of(bounds.js_objective, S))
    assert not torch.allclose(grad_of(bounds.js, S), grad_of(lambda s: bounds.nwj(s + 1.0), S))


def test_smile_value_is_clipped_dv_with_js_gradient() -> None:
    S = random_scores()
    assert bounds.smile(S, 1.0) != bounds.dv(S)
    assert torch.allclose(grad_of(lambda s: bounds.smile(s, 1.0), S), grad_of(bounds.js_objective, S))


def test_mine_value_is_dv_and_its_gradient_uses_the_moving_average() -> None:
    mine = bounds.MINE(ema_rate=0.1).double()
    S1, S2 = random_scores(seed=1), random_scores(seed=2)
    assert torch.allclose(mine(S1), bounds.dv(S1))  # first call: EMA = batch value, gradient = DV's
    g1 = grad_of(bounds.dv, S1)
    assert torch.allclose(grad_of(bounds.MINE(0.1).double(), S1), g1)
    off_diagonal = ~torch.eye(S1.shape[0], dtype=torch.bool)
    ema = 0.9 * S1[off_diagonal].exp().mean() + 0.1 * S2[off_diagonal].exp().mean()
    S = S2.clone().requires_grad_(True)
    value = mine(S)
    assert torch.allclose(value, bounds.dv(S2))
    assert torch.allclose(mine.log_ema.exp(), ema)
    value.backward()
    k = S.shape[0]
    expected = torch.eye(k, dtype=torch.float64) / k - (1 - torch.eye(k, dtype=torch.float64)) * S2.exp() / (k * (k - 1)) / ema
    assert torch.allclose(S.grad, expected)
    assert not torch.allclose(S.grad, grad_of(bounds.dv, S2))
    assert "log_ema" in mine.state_dict()  # checkpointed with the model


@pytest.mark.parametrize("name", [name for name, spec in bounds.BOUNDS.items() if not spec.stateful])
def test_rectangular_scores_with_positive_columns_equal_the_square_form(name: str) -> None:
    """Training passes B local queries x K gathered keys; permuting columns must not matter."""
    S = random_scores()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    fn = (lambda s, p=None: bounds.smile(s, 2.0, p)) if name == "smile" else getattr(bounds, name)
    permuted, positives = S[:, perm], torch.argsort(perm)
    assert torch.allclose(fn(permuted, positives), fn(S))


def reference_debiased(S: torch.Tensor, tau_plus: float, min_score: float) -> torch.Tensor:
    """Chuang et al. 2020's estimator written as in the paper, in exp space (square S, positives on
    the diagonal): Ng = max((sum_neg - N tau+ pos) / (1 - tau+), N e^{min_score})."""
    k = S.shape[0]
    e = S.exp()
    pos, n = e.diagonal(), k - 1
    ng = ((e.sum(1) - pos - n * tau_plus * pos) / (1 - tau_plus)).clamp_min(n * math.exp(min_score))
    return math.log(k) + (pos / (pos + ng)).log()


def test_debiased_infonce_matches_the_papers_estimator_and_is_infonce_at_tau_zero() -> None:
    temperature, k = 0.2, 16
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(k, 8, generator=g, dtype=torch.float64), dim=1)
    S = z @ z.T / temperature  # cosine scores in [-1/t, 1/t]; the diagonal at the top, so some rows hit the floor
    S[:4] = S[:4] * 0.1  # and some rows with negatives as likely as the positive, above it
    positives = torch.arange(k)
    floor = -1.0 / temperature
    assert torch.allclose(bounds.debiased_infonce_per_query(S, positives, 0.0, floor), bounds.infonce_per_query(S, positives))
    ours = bounds.debiased_infonce_per_query(S, positives, 0.1, floor)
    ref = reference_debiased(S, 0.1, floor)
    assert torch.allclose(ours, ref)
    e = S.exp()
    unfloored = (e.sum(1) - e.diagonal() - (k - 1) * 0.1 * e.diagonal()) / 0.9
    hits_floor = (unfloored < (k - 1) * math.exp(floor)).sum()
    assert 0 < hits_floor < k  # both branches of the floor are exercised
    gS = S.clone().requires_grad_()
    gR = S.clone().requires_grad_()
    bounds.debiased_infonce_per_query(gS, positives, 0.1, floor).sum().backward()
    reference_debiased(gR, 0.1, floor).sum().backward()
    assert torch.allclose(gS.grad, gR.grad)
    # permuted columns: the rectangular training form
    perm = torch.randperm(k, generator=g)
    assert torch.allclose(bounds.debiased_infonce_per_query(S[:, perm], torch.argsort(perm), 0.1, floor), ours)
