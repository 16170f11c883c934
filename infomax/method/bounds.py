"""Mutual-information lower bounds as pure functions of score matrices.

Convention: ``S`` is K x K with ``S[i, j] = f(x_j, y_i)``; the diagonal holds the K positive pairs
(samples of p(x, y)) and the K(K-1) off-diagonal entries stand in for samples of p(x)p(y).
Every bound also takes a rectangular B x K matrix with ``positives`` (B column indices), the form
training uses: B local queries against K keys gathered from all ranks.
All values are in nats. No process groups, no global state: callers pass scores already computed
against gathered keys. References: Poole et al. 2019 ("On Variational Bounds of Mutual
Information"), Song & Ermon 2020 ("Understanding the Limitations of Variational MI Estimators"),
Belghazi et al. 2018 (MINE), Hjelm et al. 2019 (Deep InfoMax).

Which one to use: InfoNCE has low variance but can never read above log K; NWJ/TUBA and DV are
unbiased-ish in the limit but their variance grows like e^I; SMILE trades the two with tau; JS is
the most stable *training* signal (Deep InfoMax) and reads out through NWJ(S + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from infomax.runtime.distributed import gather, is_distributed, world_size


def _positive_mask(S: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    """B x K bool, True at the positive scores of a B x K score matrix.

    ``positives`` gives each row's positive column (B indices); None means the diagonal of a square
    matrix. A B x K boolean mask instead marks several positives per row (Deep InfoMax's form: every
    location of the query's own image), and the bounds that are means over the two sets (NWJ, DV,
    JS, SMILE, TUBA, MINE) take it as it is; InfoNCE needs one positive per row.

    The bounds below take means over the mask instead of indexing with it: a boolean index asks the
    GPU how many entries it selects, a host sync every step; a comparison, a fill and a sum do not.
    """
    if positives is not None and positives.dtype == torch.bool:
        return positives
    if positives is None:
        positives = torch.arange(S.shape[0], device=S.device)
    return positives[:, None] == torch.arange(S.shape[1], device=S.device)


def _positive_mean(v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The mean of ``v`` over the positives ``pos`` marks (the count stays on the device)."""
    return v.masked_fill(~pos, 0.0).sum() / pos.sum()


def _negatives(S: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """S with the positives at -inf, where e^S and softplus(S) vanish and carry no gradient (filled
    before the exp, so an overflowing positive cannot turn the gradient into NaN)."""
    return S.masked_fill(pos, float("-inf"))


def _count_negatives(pos: torch.Tensor) -> torch.Tensor:
    return pos.numel() - pos.sum()


def _log_mean_exp(v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """log of the mean of e^v over the negatives (the entries ``pos`` does not mark)."""
    return torch.logsumexp(_negatives(v, pos).flatten(), dim=0) - _count_negatives(pos).to(v.dtype).log()


def _exp_mean(v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The mean of e^v over the negatives."""
    return _negatives(v, pos).exp().sum() / _count_negatives(pos)


def infonce_per_query(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-query InfoNCE bound for a rectangular score matrix (the training objectives' form).

    Args:
        scores: B x K critic scores of B queries against K candidates (fp32).
        positives: B long indices, the candidate column holding each query's positive.

    Returns:
        B values ``log K + S[i, pos_i] - logsumexp_j S[i, j]``; each is <= log K.
    """
    k = scores.shape[1]
    pos = scores.gather(1, positives[:, None]).squeeze(1)
    return math.log(k) + pos - torch.logsumexp(scores, dim=1)


def debiased_infonce_per_query(scores: torch.Tensor, positives: torch.Tensor, tau_plus: float,
                               min_score: float) -> torch.Tensor:
    """Per-query debiased InfoNCE (Chuang et al. 2020, "Debiased Contrastive Learning").

    With C classes about ``tau_plus = 1/C`` of the K - 1 negatives share the query's class. Their
    share of the negatives' sum is estimated by the positive's own term and removed:
    ``Ng = (sum_j e^{S_ij} - (K-1) tau_plus e^{S_i,pos}) / (1 - tau_plus)``, floored at its least
    possible value ``(K-1) e^{min_score}`` (``-1/temperature`` for the cosine critic). It trains the
    encoder; it is no longer a lower bound on I, so read MI out with :func:`infonce`.

    Args:
        scores: B x K critic scores (fp32). positives: B long indices of each row's positive column.

    Returns:
        B values ``log K + S_i,pos - log(e^{S_i,pos} + Ng)``; ``tau_plus = 0`` gives
        :func:`infonce_per_query`.
    """
    k = scores.shape[1]
    pos = scores.gather(1, positives[:, None]).squeeze(1)
    own = positives[:, None] == torch.arange(k, device=scores.device)  # not one_hot, which checks its input on the host
    neg_lse = torch.logsumexp(scores.masked_fill(own, float("-inf")), dim=1)  # log sum_j e^{S_ij}, j negative
    m = k - 1
    # log(sum - m tau e^pos) = lse + log(1 - m tau e^{pos - lse}); the clamp only guards the log where the floor wins
    share = (1 - m * tau_plus * (pos - neg_lse).exp()).clamp_min(1e-12)
    log_ng = torch.maximum(neg_lse + share.log() - math.log(1 - tau_plus),
                           torch.full_like(pos, math.log(m) + min_score))
    return math.log(k) + pos - torch.logaddexp(pos, log_ng)


def infonce(S: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE (CPC): log K + mean_i (S_i,pos - logsumexp_j S_ij). Never above log K."""
    if positives is None:
        positives = torch.arange(S.shape[0], device=S.device)
    return infonce_per_query(S, positives).mean()


def tuba(S: torch.Tensor, log_a: torch.Tensor | float = 0.0, positives: torch.Tensor | None = None) -> torch.Tensor:
    """TUBA with baseline a(y_i) = e^{log_a[i]} (scalar or per row): 1 + E_p[S - log a] - E_q[e^{S - log a}]."""
    if not isinstance(log_a, torch.Tensor):
        log_a = S.new_full((), log_a)  # made on the device: torch.as_tensor would copy it from the host
    log_a = log_a.to(S.dtype).expand(S.shape[0])
    pos, shifted = _positive_mask(S, positives), S - log_a[:, None]
    return 1.0 + _positive_mean(shifted, pos) - _exp_mean(shifted, pos)


def nwj(S: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """NWJ (f-divergence / MINE-f): E_p[S] - e^{-1} E_q[e^S]; equals tuba(S - 1)."""
    pos = _positive_mask(S, positives)
    return _positive_mean(S, pos) - _exp_mean(S - 1.0, pos)


def dv(S: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Donsker-Varadhan: E_p[S] - log E_q[e^S], with a stable log-mean-exp."""
    pos = _positive_mask(S, positives)
    return _positive_mean(S, pos) - _log_mean_exp(S, pos)


def js_objective(S: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """The f-GAN Jensen-Shannon objective Deep InfoMax trains with: E_p[-sp(-S)] - E_q[sp(S)].

    Not an MI bound itself (it bounds a JS divergence); see :func:`js` for the MI readout.
    """
    pos = _positive_mask(S, positives)
    return -_positive_mean(F.softplus(-S), pos) - F.softplus(_negatives(S, pos)).sum() / _count_negatives(pos)


def js(S: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Value NWJ(S + 1), gradient of the JS objective.

    The JS objective's optimal critic is S* = log p(x,y)/(p(x)p(y)), for which NWJ(S* + 1) = I
    exactly; we read NWJ(S + 1), tight at the JS optimum. Poole et al.'s colab and
    ermongroup/smile-mi-estimator (``js_lower_bound``) read NWJ(S) instead, I - 1/e there; the
    Gaussian benchmark reports that readout too (``js_nwj``). Deep InfoMax's code (rdevon/DIM)
    trains the JS objective and has no MI readout of it.
    """
    objective = js_objective(S, positives)
    return objective + (nwj(S + 1.0, positives) - objective).detach()


def smile(S: torch.Tensor, tau: float, positives: torch.Tensor | None = None) -> torch.Tensor:
    """SMILE: DV with the scores clipped to [-tau, tau] inside the log-mean-exp; JS gradient.

    tau = inf gives DV's value. Smaller tau lowers the variance and adds bias.
    """
    pos = _positive_mask(S, positives)
    clipped = S if math.isinf(tau) else S.clamp(-tau, tau)
    value = _positive_mean(S, pos) - _log_mean_exp(clipped, pos)
    objective = js_objective(S, positives)
    return objective + (value - objective).detach()


class MINE(nn.Module):
    """MINE (Belghazi et al. Sec. 3.2): the DV value with a bias-corrected gradient.

    The gradient of log E_q[e^S] is E_q[grad e^S] / E_q[e^S]; a minibatch denominator biases it,
    so MINE divides by an exponential moving average of E_q[e^S] instead. The EMA (kept in log
    space for stability) is a buffer, so it goes into checkpoints with the model.
    """

    def __init__(self, ema_rate: float = 0.1) -> None:
        super().__init__()
        self.ema_rate = ema_rate
        self.register_buffer("log_ema", torch.tensor(float("nan"), dtype=torch.float64))

    def forward(self, S: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        pos = _positive_mask(S, positives)
        log_m = _log_mean_exp(S, pos)  # log E_q[e^S] on this batch
        with torch.no_grad():
            # The EMA follows the global batch's E_q[e^S] (ranks hold equally many negatives), so every rank keeps
            # the same one, as one process with the whole batch would, and a checkpoint of rank 0's resumes them all.
            lm = log_m.detach().to(self.log_ema.dtype)
            if is_distributed():
                lm = torch.logsumexp(gather(lm[None]), 0) - math.log(world_size())
            moved = torch.logaddexp(self.log_ema + math.log1p(-self.ema_rate), lm + math.log(self.ema_rate))
            # the first batch starts it; a where, not an `if`, so no host sync
            self.log_ema.copy_(torch.where(torch.isnan(self.log_ema), lm, moved))
        # Surrogate whose gradient is grad E_p[S] - grad E_q[e^S] / EMA.
        surrogate = _positive_mean(S, pos) - (log_m - self.log_ema.to(S.dtype)).exp()
        value = _positive_mean(S, pos) - log_m
        return surrogate + (value - surrogate).detach()


@dataclass(frozen=True)
class BoundSpec:
    """One bound as ``objective.bound`` names it, and what the rest of the code asks of it: the objectives build
    it from here, DIM checks it, the pretraining's summary says its ceiling and what its minibatch value is, the
    tests and the Gaussian benchmark run every one. Adding a bound is its function and one :func:`register_bound`.
    """

    help: str  # one line, for the config's choices
    build: Callable[[dict[str, Any]], Callable[..., torch.Tensor]]  # its knobs' values -> fn(S, positives=...)
    knobs: tuple[str, ...] = ()  # the objective.* keys it reads (objective.smile_tau, ...)
    stateful: bool = False  # keeps state between steps: one module per view pair, saved in checkpoints
    dim: bool = True  # Deep InfoMax can train with it (a stateless bound of a score matrix)
    ceiling: bool = False  # its value never passes log K (InfoNCE's): printed beside it only then
    minibatch: str = "a lower bound on a minibatch"  # what one batch's value is


BOUNDS: dict[str, BoundSpec] = {}


def register_bound(name: str, spec: BoundSpec) -> None:
    """Make ``objective.bound=name`` a choice: the config accepts it from now on (its choices are this registry's)."""
    from infomax.config.pretrain import CHOICE_HELP

    BOUNDS[name] = spec
    CHOICE_HELP["objective.bound"].setdefault(name, spec.help)  # the built-ins' help lines stay the config's


_HIGH = "biased upward on a minibatch (a log of a minibatch mean)"
register_bound("infonce", BoundSpec("the contrastive bound, ceiling log K", lambda k: infonce, ceiling=True))
register_bound("nwj", BoundSpec("NWJ / f-GAN KL", lambda k: nwj))
register_bound("dv", BoundSpec("Donsker-Varadhan", lambda k: dv, minibatch=_HIGH))
register_bound("mine", BoundSpec("DV with MINE's moving-average gradient", lambda k: MINE(k["mine_ema"]),
                                 knobs=("mine_ema",), stateful=True, dim=False, minibatch=_HIGH))
register_bound("js", BoundSpec("Jensen-Shannon training, NWJ(S + 1) readout (Deep InfoMax)", lambda k: js))
register_bound("smile", BoundSpec("DV with scores clipped to [-smile_tau, smile_tau]",
                                  lambda k: partial(smile, tau=k["smile_tau"]), knobs=("smile_tau",),
                                  minibatch=_HIGH))


def build_bound(name: str, objective: Any) -> Callable[..., torch.Tensor]:
    """The bound called ``name`` built with its knobs read from ``objective`` (an ObjectiveConfig, or anything
    with those attributes), as ``fn(S, positives=...)``; a stateful one is a module."""
    if name not in BOUNDS:
        raise ValueError(f"no bound '{name}' (choose from {', '.join(BOUNDS)})")
    spec = BOUNDS[name]
    return spec.build({k: getattr(objective, k) for k in spec.knobs})


def barber_agakov(log_q: torch.Tensor, entropy: float) -> torch.Tensor:
    """Barber-Agakov: I(x; y) >= H(x) + E_p[log q(x | y)].

    Args:
        log_q: N values log q(x_n | y_n) from a decoder (e.g. :class:`GaussianDecoder`).
        entropy: H(x) in nats. It must be *known* (e.g. d/2 log(2 pi e) for x ~ N(0, I_d), as in the
            Gaussian benchmark); it is not estimated here, since an estimated H(x) would make the
            result no longer a bound.
    """
    return entropy + log_q.mean()


class GaussianDecoder(nn.Module):
    """q(x | y) = N(mu(y), diag(sigma^2(y))) with an MLP; ``log_prob(x, y)`` returns N values."""

    def __init__(self, y_dim: int, x_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(y_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * x_dim))

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, log_var = self.net(y).chunk(2, dim=1)
        return gaussian_log_prob(x, mu, log_var)


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor | float) -> torch.Tensor:
    """Sum over dimensions of log N(x; mu, e^{log_var}); N x D inputs -> N values."""
    log_var = log_var.to(x.dtype) if isinstance(log_var, torch.Tensor) else x.new_full((), log_var)
    return (-0.5 * (math.log(2 * math.pi) + log_var + (x - mu) ** 2 / log_var.exp())).sum(dim=1)

