"""The objectives' registry and interface; the contrastive objective: InfoNCE against its cross-entropy form, diagnostics, fp32 logits under
bf16 autocast (docs/DESIGN.md, invariant 2), every critic with every bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import contrastive
from infomax.config.pretrain import CHOICES, ObjectiveConfig
from infomax.method.bounds import debiased_infonce_per_query as debiased_infonce
from infomax.method.bounds import infonce_per_query as infonce
from infomax.method.objectives import Objective, build_objective, objective_class


def test_infonce_equals_log_k_minus_cross_entropy_and_never_exceeds_log_k() -> None:
    scores = torch.randn(6, 10) * 5
    pos = torch.tensor([0, 3, 2, 9, 4, 5])
    bound = infonce(scores, pos)
    assert torch.allclose(bound, math.log(10) - F.cross_entropy(scores, pos, reduction="none"))
    assert (bound <= math.log(10)).all()
    perfect = torch.eye(10) * 50  # negatives e^-50 below the positive: the bound sits at its ceiling
    assert torch.allclose(infonce(perfect, torch.arange(10)), torch.full((10,), math.log(10)))


def test_objective_diagnostics_for_identical_and_random_views() -> None:
    objective = contrastive(temperature=0.05)
    z = torch.randn(16, 8)
    loss, diag = objective([z, z.clone()])
    assert diag["top1"] == 1.0 and torch.isclose(diag["pos"], torch.tensor(1.0 / 0.05))  # cos = 1, / temperature
    assert torch.isclose(diag["mi"], diag["log_k"] - loss) and diag["log_k"] == pytest.approx(math.log(16))
    _, diag_random = objective([torch.randn(16, 8), torch.randn(16, 8)])
    assert diag_random["mi"] < diag["mi"]


def test_intra_view_negatives_are_simclrs_nt_xent() -> None:
    """SimCLR's loss as its paper writes it: 2N x 2N cosine similarities over both views, the self-pairs
    removed, each image's positive its other view; our two ordered pairs average the same 2N terms."""
    torch.manual_seed(0)
    n, t = 8, 0.2
    z1, z2 = (torch.randn(n, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    loss, diag = contrastive(t, intra_view_negatives=True)([z1, z2])
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    reference = F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
    assert torch.allclose(loss, reference, rtol=0, atol=1e-12)
    assert diag["log_k"] == pytest.approx(math.log(2 * n - 1))  # 2N - 1 candidates, the positive among them
    grads = torch.autograd.grad(loss, [z1, z2])
    for g, g_ref in zip(grads, torch.autograd.grad(reference, [z1, z2])):
        assert torch.allclose(g, g_ref, rtol=0, atol=1e-12)
    without, _ = contrastive(t)([z1, z2])
    assert not torch.isclose(without, loss)  # the option changes the loss: the comparison above can fail


def test_debiased_objective_trains_on_the_debiased_loss_and_reads_mi_by_infonce() -> None:
    torch.manual_seed(0)
    t, n = 0.2, 12
    z1, z2 = torch.randn(n, 16, dtype=torch.float64), torch.randn(n, 16, dtype=torch.float64)
    plain_loss, plain = contrastive(t)([z1, z2])
    loss, diag = contrastive(t, debias_tau_plus=0.1)([z1, z2])
    assert torch.allclose(diag["mi"], plain["mi"])  # the diagnostic is still InfoNCE's bound
    scores = [F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / t for a, b in ((z1, z2), (z2, z1))]
    expected = math.log(n) - torch.stack([debiased_infonce(s, torch.arange(n), 0.1, -1 / t).mean() for s in scores]).mean()
    assert torch.allclose(loss, expected) and not torch.isclose(loss, plain_loss)


def test_nnclr_scores_each_querys_nearest_support_embedding() -> None:
    torch.manual_seed(0)
    n, d, t = 6, 8, 0.2
    objective = contrastive(t, dim=d, nn_support_size=32)
    z1, z2 = torch.randn(n, d), torch.randn(n, d)
    assert torch.equal(objective([z1, z2])[0], contrastive(t)([z1, z2])[0])  # empty support: the queries themselves
    objective.after_step()
    assert torch.allclose(objective.candidates.support.keys(0), F.normalize(z1, dim=1))  # view 0, normalised, after scoring
    assert "candidates.support.queue" in objective.state_dict()  # a buffer: checkpointed and resumed with the objective

    support = F.normalize(torch.randn(32, d), dim=1)
    objective.candidates.support.push([support])
    picks = torch.tensor([3, 17, 5, 30, 0, 9])
    q1 = (2 * support[picks] + 0.01 * torch.randn(n, d)).requires_grad_()  # near support rows `picks`
    q2 = torch.randn(n, d, requires_grad=True)
    loss, _ = objective([q1, q2])
    nearest2 = support[(F.normalize(q2, dim=1) @ support.T).argmax(1)]
    cos = lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / t  # noqa: E731
    target = torch.arange(n)
    expected = (F.cross_entropy(cos(support[picks], q2), target) + F.cross_entropy(cos(nearest2, q1), target)) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()  # the neighbours carry no gradient: q1 gets it as a key of pair (1, 0) only
    q1_as_key = torch.autograd.grad(F.cross_entropy(cos(nearest2, q1), target) / 2, q1)[0]
    assert torch.allclose(q1.grad, q1_as_key, atol=1e-6)


def test_logits_stay_fp32_under_bf16_autocast() -> None:
    seen = []
    objective = contrastive(0.1)
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


@pytest.mark.parametrize("critic", ["cosine", "dot", "bilinear", "concat"])
def test_every_critic_combines_with_every_bound(critic: str) -> None:
    z = [torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for bound in ("infonce", "nwj", "dv", "mine", "js", "smile"):
        objective = contrastive(0.5, bound, critic=critic, dim=4).double()
        loss, diag = objective(z)
        loss.backward()
        assert torch.isfinite(loss) and z[0].grad is not None
        if critic in ("bilinear", "concat"):
            assert all(p.grad is not None for p in objective.critic.parameters())


def test_the_queue_logs_its_negatives_apart_from_the_batch_and_the_bound_over_fresh_keys() -> None:
    """Queue keys carry older weights and BatchNorm statistics, so the model can tell them from
    the batch's; the two kinds of negative are logged apart, and so is InfoNCE over the batch's keys alone
    (a bound over stale keys is none)."""
    from infomax.method.bounds import infonce as infonce_bound

    torch.manual_seed(0)
    objective = contrastive(temperature=0.5, num_views=2, dim=8, queue_size=16)
    u = torch.randn(8)
    z = [F.normalize(u + 0.3 * torch.randn(4, 8), dim=1) for _ in range(2)]  # images alike: batch negatives score high
    _, first = objective(z, keys=z)
    assert "monitor/neg_score_queue" not in first  # nothing queued yet
    objective.after_step()
    objective.candidates.queue.queue.copy_(-objective.candidates.queue.queue)  # queue keys opposite to every query: a visible gap
    _, diag = objective(z, keys=z)
    off = ~torch.eye(4, dtype=torch.bool)
    pair_neg = [(z[a] @ z[c].T / 0.5)[off].mean() for a, c in objective.pairs]
    assert torch.allclose(diag["monitor/neg_score_batch"], torch.stack(pair_neg).mean(), atol=1e-5)
    assert diag["monitor/neg_score_queue"] < 0 < diag["monitor/neg_score_batch"]
    fresh = [infonce_bound(z[a] @ z[c].T / 0.5, positives=torch.arange(4)) for a, c in objective.pairs]
    assert torch.allclose(diag["monitor/mi_batch_keys"], torch.stack(fresh).mean(), atol=1e-5)
    assert torch.allclose(first["mi"], diag["monitor/mi_batch_keys"], atol=1e-5)  # with no queue they agree


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that make a GPU wait until the host has read a value back: ``.item()``, ``bool()``
    and ``int()`` of a tensor (aten._local_scalar_dense, is_nonzero), nonzero, masked_select, and
    indexing or assigning with a boolean mask (which must count its entries first). Seen on the CPU,
    they are the same ops that stall a GPU's queue every step."""

    SYNCING = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "item"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in self.SYNCING or boolean_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("settings", [
    {"bound": "infonce"}, {"bound": "nwj"}, {"bound": "dv"}, {"bound": "js"}, {"bound": "smile"}, {"bound": "mine"},
    {"bound": "infonce", "intra_view_negatives": True}, {"bound": "infonce", "debias_tau_plus": 0.1},
    {"bound": "infonce", "queue_size": 16}, {"bound": "infonce", "nn_support_size": 16},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_a_training_step_of_the_objective_asks_the_device_nothing(settings: dict) -> None:
    """Forward, backward and the queue's push read no value back to the host: the diagnostics are sums
    and gathers, not boolean indexing; MINE's first-batch start is a torch.where; the queue's fill level
    is kept on the host. The detector itself is checked on a boolean index and an .item()."""
    objective = contrastive(temperature=0.2, dim=8, **settings)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 8, generator=g, requires_grad=True) for _ in range(2)]
    keys = [torch.randn(6, 8, generator=g) for _ in range(2)] if settings.get("queue_size") else None
    for step in range(2):  # the second step scores against the filled queue and moves MINE's average
        with HostSyncs() as syncs:
            loss, diag = objective(z) if keys is None else objective(z, keys)
            loss.backward()
            objective.after_step()
        assert syncs.seen == [], (step, syncs.seen)
    if keys is not None:
        assert diag["log_k"] > math.log(6) and objective.candidates.queue.keys(0).shape[0] == 12
    with HostSyncs() as syncs:
        x = torch.randn(4)
        x[x > 0].sum().item()
    assert "index" in syncs.seen and "_local_scalar_dense" in syncs.seen


def test_deep_infomax_scores_ask_the_device_nothing() -> None:
    """AMDIM's multi-positive NCE and DIM's mask of positive positions, forward and backward."""
    from infomax.method import bounds
    from infomax.method.objectives import multi_positive_nce

    g = torch.Generator().manual_seed(1)
    queries, local = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(4, 5, 8, generator=g)
    with HostSyncs() as syncs:
        loss, _, _ = multi_positive_nce(queries, local, torch.arange(4), tclip=20.0)
        scores = torch.einsum("bd,knd->bkn", queries, local).reshape(4, 20)
        mask = (torch.arange(4)[:, None] == torch.arange(4)).repeat_interleave(5, dim=1)
        (loss - bounds.js(scores, positives=mask) - bounds.dv(scores, positives=mask)).backward()
    assert syncs.seen == []


@pytest.mark.parametrize("name", CHOICES["objective.name"])
def test_every_objective_in_the_registry_declares_its_model_and_returns_mi_and_log_k(name: str) -> None:
    """The registry is the config's list of names (infomax/method/objectives/<name>.py's OBJECTIVE). Each one, built
    from its defaults, takes the output of the model it declares (embeddings per view, or local maps at its
    stages) and returns a finite loss with the diagnostics the loop reads (mi below its ceiling log_k)."""
    objective = build_objective(ObjectiveConfig(name=name), num_views=2, embed_dim=8)
    assert isinstance(objective, Objective) and type(objective) is objective_class(name)
    g = torch.Generator().manual_seed(0)
    if objective.local_stages is None:
        out = [torch.randn(6, 8, generator=g, requires_grad=True) for _ in range(2)]
    else:
        out = [{"global": torch.randn(6, 8, generator=g, requires_grad=True),
                "local": [torch.randn(6, 4, 8, generator=g, requires_grad=True) for _ in objective.local_stages]}
               for _ in range(2)]
    loss, diag = objective(out)
    loss.backward()
    objective.after_step()
    assert torch.isfinite(loss) and {"mi", "log_k"} <= set(diag)
    assert not diag["mi"].requires_grad and diag["mi"] <= diag["log_k"] + 1e-6


def test_an_unknown_objective_name_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown objective 'simsiam' .*contrastive, amdim, dim"):
        objective_class("simsiam")


def test_toy_bound_registered_in_one_file_trains_two_steps(run_dir, capsys) -> None:
    """Adding a bound is its function and one register_bound (docs/DESIGN.md, "How to add a bound"): the config
    accepts it, the contrastive objective trains with it, and the summary says what the registry says of it."""
    from conftest import main_in_process
    from infomax.config.pretrain import CHOICE_HELP
    from infomax.method import bounds

    def toy(S: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:  # InfoNCE at half the scores
        return bounds.infonce(S / 2, positives)

    bounds.register_bound("toy", bounds.BoundSpec("InfoNCE at half the scores", lambda knobs: toy, ceiling=True))
    try:
        code, out, err = main_in_process(capsys, f"run.dir={run_dir}", "objective.bound=toy", "run.max_steps=2",
                                         "monitor.knn_every=0")
        assert code == 0, err[-2000:]
        assert "infomax pretraining finished: step 2/2" in out and "ceiling log K" in out
    finally:
        del bounds.BOUNDS["toy"], CHOICE_HELP["objective.bound"]["toy"]
    code, _, err = main_in_process(capsys, f"run.dir={run_dir}_2", "objective.bound=toy")
    assert code == 2 and "'objective.bound': 'toy' is not one of infonce, nwj" in err
