"""Training objectives: views x critic x bound -> loss plus diagnostics.

- ``contrastive``: a temperature-scaled cosine critic between pairs of V >= 2 views (CMC's full or
  core graph; SimCLR is the full graph of 2 views), with any bound from :mod:`pretrain.bounds`.
- ``amdim``: multiscale global-vs-local NCE with score clipping and regularisation.
- ``dim``: global-vs-local with the JS, DV or InfoNCE bound (Deep InfoMax).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import bounds
from pretrain.config import ObjectiveConfig
from pretrain.critics import build_critic
from pretrain.distributed import gather, gather_with_grad, own_rows
from pretrain.momentum import KeyQueue


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (keeps float64 for exactness tests); scores never run in bf16/fp16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def stateless_bound(name: str, smile_tau: float):
    """The bound function for ``objective.bound`` (MINE, which has state, is built separately)."""
    return {"infonce": bounds.infonce, "nwj": bounds.nwj, "dv": bounds.dv, "js": bounds.js,
            "smile": partial(bounds.smile, tau=smile_tau)}.get(name)


class ContrastiveObjective(nn.Module):
    """A critic and a bound between pairs of views, queries local, keys gathered across ranks.

    A module (not a function) so that learned critics are trained with the model and bounds with
    state (MINE's moving average, one per pair) live in buffers that go into checkpoints. MINE's EMA
    follows the global batch, so it is the same on every rank.

    With ``queue_size > 0`` (MoCo v2, :mod:`pretrain.momentum`) the keys are a momentum model's,
    passed to ``forward``, and each query is also scored against the last ``queue_size`` keys of
    the key view; the queue is a buffer, so it is checkpointed with the objective. Queue keys come from
    older weights and older batches' BatchNorm statistics, so a model can learn to tell them from the
    batch's keys (MoCo's Sec. 3.3): the mean negative score of each kind is logged
    (``monitor/neg_score_batch``, ``monitor/neg_score_queue``) to show such a gap, and since a bound over
    stale keys is no lower bound on the MI, the bound over the batch's keys alone is logged beside it
    (``monitor/mi_batch_keys``).
    """

    def __init__(self, temperature: float, bound: str = "infonce", num_views: int = 2,
                 smile_tau: float = 5.0, mine_ema: float = 0.1, graph: str = "full",
                 critic: str = "cosine", dim: int = 128, queue_size: int = 0, intra_view_negatives: bool = False,
                 nn_support_size: int = 0, debias_tau_plus: float = 0.0) -> None:
        super().__init__()
        self.bound, self.intra_view_negatives = bound, intra_view_negatives
        # debiased InfoNCE trains, InfoNCE still reads out MI; its floor is the cosine critic's least score
        self.debias_tau_plus, self.min_score = debias_tau_plus, -1.0 / temperature
        self.critic = build_critic(critic, dim, temperature)
        self.pairs = view_pairs(num_views, graph)
        self.mine = nn.ModuleList(bounds.MINE(mine_ema) for _ in self.pairs) if bound == "mine" else None
        self._fn = stateless_bound(bound, smile_tau)
        self.queue = KeyQueue(num_views, queue_size, dim) if queue_size else None
        self.support = KeyQueue(1, nn_support_size, dim) if nn_support_size else None
        self.pending_keys: list[torch.Tensor] | None = None
        self.pending_support: torch.Tensor | None = None

    def enqueue_pending(self) -> None:
        """Push the last forward's gathered keys into the queue, and its view-0 embeddings into the
        support set (after scoring: a key is never its own negative, an embedding never its own
        neighbour; and only for steps that were taken, so a skipped non-finite step leaves nothing)."""
        if self.queue is not None and self.pending_keys is not None:
            self.queue.push(self.pending_keys)
        if self.support is not None and self.pending_support is not None:
            self.support.push([self.pending_support])
        self.pending_keys = self.pending_support = None

    def nearest_in_support(self, z: torch.Tensor) -> torch.Tensor:
        """NNCLR (Dwibedi et al. 2021): each of the B x D embeddings replaced by its cosine nearest
        neighbour in the support set (no gradient); unchanged while the support set is empty."""
        support = self.support.keys(0)
        if support.shape[0] == 0:
            return z
        with torch.no_grad():
            return support[(F.normalize(z, dim=1) @ support.T).argmax(1)]

    def forward(self, z: list[torch.Tensor], keys: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            z: V query embeddings, each B x D (local to this rank, any dtype).
            keys: V key embeddings (B x D) of a momentum model, without gradient; required with
                the queue. Without them the queries are their own keys (SimCLR/CMC); with
                ``intra_view_negatives`` a view-a query is also scored against view a's other W*B - 1
                images (SimCLR's 2N - 2 negatives for 2 views), so K = 2*W*B - 1. With a support set
                (``nn_support_size``) each query is replaced by its nearest past view-0 embedding, so
                the gradient reaches the model through the keys only (NNCLR).

        Returns:
            loss (scalar, fp32 or wider) and detached diagnostics: ``mi`` (the bound in nats, mean over
            pairs), ``log_k`` (InfoNCE's ceiling log K, K = W*B keys + the filled queue), ``pos`` /
            ``neg`` (mean critic score of positives / negatives), ``top1`` (fraction of queries whose
            positive scores highest), ``mi_A_B`` per ordered pair of views.
        """
        if self.queue is not None and keys is None:
            raise ValueError("objective.queue_size > 0 needs the momentum model's keys")
        # Logits in fp32 even under bf16/fp16 autocast (docs/DESIGN.md, invariant 2).
        with torch.autocast(device_type=z[0].device.type, enabled=False):
            q = [_fp32(v) for v in z]  # V x (B x D)
            if keys is None:
                batch_keys = [gather_with_grad(v) for v in q]  # V x (W*B x D), gradient to every rank's rows
            else:
                batch_keys = [gather(_fp32(k)) for k in keys]  # momentum keys carry no gradient
            b = q[0].shape[0]
            positives = own_rows(b, q[0].device)  # positives at rank*B + i
            # NNCLR's queries: each view's nearest support embeddings, looked up once for all its pairs
            queries = q if self.support is None else [self.nearest_in_support(v) for v in q]
            values, trained, pos, neg, top1 = [], [], [], [], []
            neg_batch, neg_queue, mi_batch = [], [], []  # with the queue: its keys and the batch's apart
            for pair, (a, c) in enumerate(self.pairs):
                candidates = batch_keys[c] if self.queue is None else torch.cat([batch_keys[c], self.queue.keys(c)])
                scores = self.critic(queries[a], candidates)  # B x K: view-a queries against view-c keys (+ queue)
                if self.intra_view_negatives:  # SimCLR's NT-Xent: view a's other images are negatives too
                    same = without_own_column(self.critic(q[a], batch_keys[a]), positives)  # B x (W*B - 1)
                    scores = torch.cat([scores, same], dim=1)
                bound = self.mine[pair] if self.mine is not None else self._fn
                values.append(bound(scores, positives=positives))
                if self.debias_tau_plus:
                    trained.append(bounds.debiased_infonce_per_query(
                        scores, positives, self.debias_tau_plus, self.min_score).mean())
                with torch.no_grad():  # sums and gathers, no boolean indexing: no host sync (issue 25.7)
                    positive = scores.gather(1, positives[:, None])  # B x 1
                    pos.append(positive.mean())
                    neg.append((scores.sum() - positive.sum()) / (scores.numel() - b))
                    top1.append((scores.argmax(1) == positives).float().mean())
                    if self.queue is not None:
                        n = batch_keys[c].shape[0]  # the batch's keys first, then the filled queue
                        neg_batch.append((scores[:, :n].sum() - positive.sum()) / (b * (n - 1)))
                        if scores.shape[1] > n:
                            neg_queue.append(scores[:, n:].mean())
                        mi_batch.append(bounds.infonce(scores[:, :n], positives=positives))
            log_k = math.log(scores.shape[1])
            # enqueued by enqueue_pending() once the step is known to be finite
            if self.queue is not None:
                self.pending_keys = [k.detach() for k in batch_keys]
            if self.support is not None:  # normalised, gathered: the same support set on every rank
                self.pending_support = F.normalize(batch_keys[0].detach(), dim=1)
            mi = torch.stack(values).mean()
            # InfoNCE's loss is shown as the usual cross-entropy, log K - bound.
            loss = (log_k if self.bound == "infonce" else 0.0) - (torch.stack(trained).mean() if trained else mi)
            diag = {
                "mi": mi.detach(),
                "log_k": torch.tensor(log_k, device=loss.device),
                "pos": torch.stack(pos).mean(),
                "neg": torch.stack(neg).mean(),
                "top1": torch.stack(top1).mean(),
                **{f"mi_{a}_{c}": v.detach() for (a, c), v in zip(self.pairs, values)},  # per-pair diagnostics
                **({"monitor/neg_score_batch": torch.stack(neg_batch).mean(),
                    "monitor/mi_batch_keys": torch.stack(mi_batch).mean()} if neg_batch else {}),
                **({"monitor/neg_score_queue": torch.stack(neg_queue).mean()} if neg_queue else {}),
            }
        return loss, diag


def without_own_column(scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """B x N scores -> B x (N - 1): each row without its column ``own[i]``, by a gather (a boolean index
    would ask the GPU for its size, a host sync)."""
    cols = torch.arange(scores.shape[1] - 1, device=scores.device)[None]  # 1 x (N - 1)
    return scores.gather(1, cols + (cols >= own[:, None]))


def multi_positive_nce(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
                       tclip: float | None, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NCE of query vectors against *all positions* of gathered local maps (AMDIM; DIM's ``nce_loss``).

    Args:
        queries: Q x D (a global embedding per image, or one per local position).
        keys: K x N x D local embeddings (K images gathered from all ranks, N positions each).
        positives: Q indices into K: the image each query's positives come from.
        tclip: scores are soft-clipped to ``tclip * tanh(s / tclip)`` (AMDIM); None: no clipping (DIM).
        scaled: dot products divided by sqrt(D) (AMDIM); DIM's reference uses them as they are.

    Returns:
        (loss, mi, reg): loss = mean over queries and positive positions of -log softmax of that
        positive against every position of every other image; mi = log(1 + (K-1) N) - loss (an
        InfoNCE bound with that many candidates); reg = mean squared raw score (AMDIM's regulariser).
    """
    k, n, d = keys.shape
    raw = torch.einsum("qd,knd->qkn", queries, keys) / (math.sqrt(d) if scaled else 1.0)  # Q x K x N
    scores = raw if tclip is None else tclip * torch.tanh(raw / tclip)
    rows = torch.arange(len(queries), device=queries.device)
    pos = scores[rows, positives]  # Q x N
    own = positives[:, None] == torch.arange(k, device=queries.device)  # Q x K: a fill, not a boolean index
    neg_lse = torch.logsumexp(scores.masked_fill(own[:, :, None], float("-inf")).flatten(1), dim=1)  # Q
    loss = -(pos - torch.logaddexp(pos, neg_lse[:, None])).mean()
    return loss, math.log(1 + (k - 1) * n) - loss.detach(), (raw**2).mean()


class AMDIMObjective(nn.Module):
    """AMDIM (Bachman et al. 2019): multiscale NCE between two views, both directions.

    With local stages (s1, s2), s2 the deeper one, the terms are global(a) -> local_s2(b) ("1->5"),
    global(a) -> local_s1(b) ("1->7") and every local_s2(a) position -> local_s2(b) ("5->5"),
    for (a, b) = (0, 1) and (1, 0); negatives are all positions of all other gathered images.
    Loss = mean of the terms + reg_weight * mean squared raw score.
    """

    def __init__(self, tclip: float = 20.0, reg_weight: float = 0.05) -> None:
        super().__init__()
        self.tclip, self.reg_weight = tclip, reg_weight

    def forward(self, out: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=out[0]["global"].device.type, enabled=False):
            g = [_fp32(o["global"]) for o in out]
            local = [[_fp32(m) for m in o["local"]] for o in out]
            b = g[0].shape[0]
            positives = own_rows(b, g[0].device)
            keys = [[gather_with_grad(m) for m in views_local] for views_local in local]  # K x N x D
            terms: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            for a, c in ((0, 1), (1, 0)):
                deep, shallow = keys[c][-1], keys[c][0]
                terms[f"1to{len(local[a]) - 1}_{a}{c}"] = multi_positive_nce(g[a], deep, positives, self.tclip)
                terms[f"1to0_{a}{c}"] = multi_positive_nce(g[a], shallow, positives, self.tclip)
                n = local[a][-1].shape[1]
                q = local[a][-1].reshape(b * n, -1)  # every deep position of view a is a query
                terms[f"lto{len(local[a]) - 1}_{a}{c}"] = multi_positive_nce(
                    q, deep, positives.repeat_interleave(n), self.tclip)
            nce = torch.stack([t[0] for t in terms.values()]).mean()
            reg = torch.stack([t[2] for t in terms.values()]).mean()
            loss = nce + self.reg_weight * reg
            mis = {name: t[1] for name, t in terms.items()}
            diag = {"mi": torch.stack(list(mis.values())).mean(), "nce": nce.detach(), "score_reg": reg.detach(),
                    # Each term's ceiling is log(1 + (K-1) N) for its own map's N positions (mi + nce),
                    # not log K over images: the bar would show MI above its ceiling.
                    "log_k": torch.stack([t[1] + t[0].detach() for t in terms.values()]).mean(),
                    **{f"mi_{k}": v for k, v in mis.items()}}
        return loss, diag


class DIMObjective(nn.Module):
    """Deep InfoMax: global embedding of view a vs every position of the deepest local map of view b.

    As in rdevon/DIM (``cortex_DIM/functions/dim_losses.py``), the scores are plain dot products
    g_a[i] . l_b[j, m] (no 1/sqrt(D) scale) of every query against every position m of every gathered
    image j; the positives are the N positions of the query's own image, the negatives all
    positions of every other image. ``infonce`` is DIM's ``nce_loss``: each positive against the
    (K-1) x N negatives, so K' = 1 + (K-1) N candidates. ``js``, ``dv``, ``nwj``, ``smile`` take the
    means over those same positive and negative sets (``fenchel_dual_loss``, ``donsker_varadhan_loss``).
    Both directions (a, b) = (0, 1) and (1, 0) are averaged.
    """

    def __init__(self, bound: str = "js", smile_tau: float = 5.0) -> None:
        super().__init__()
        self.bound = bound
        self._fn = stateless_bound(bound, smile_tau)

    def forward(self, out: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=out[0]["global"].device.type, enabled=False):
            values = []
            for a, c in ((0, 1), (1, 0)):
                g = _fp32(out[a]["global"])  # B x D
                keys = gather_with_grad(_fp32(out[c]["local"][-1]))  # K x N x D
                (b, _), (k, n, _) = g.shape, keys.shape
                positives = own_rows(b, g.device)  # each query's own image
                if self.bound == "infonce":
                    nce, _, _ = multi_positive_nce(g, keys, positives, tclip=None, scaled=False)
                    values.append(math.log(1 + (k - 1) * n) - nce)
                else:
                    scores = torch.einsum("bd,knd->bkn", g, keys).reshape(b, k * n)  # columns j * N + m
                    own = positives[:, None] == torch.arange(k, device=g.device)  # B x K
                    mask = own.repeat_interleave(n, dim=1)  # B x (K N)
                    values.append(self._fn(scores, positives=mask))
            mi = torch.stack(values).mean()
            log_k = math.log(1 + (k - 1) * n)  # candidates per positive: itself and every other image's positions
            loss = (log_k if self.bound == "infonce" else 0.0) - mi
        return loss, {"mi": mi.detach(), "log_k": torch.tensor(log_k, device=loss.device)}


def view_pairs(num_views: int, graph: str) -> list[tuple[int, int]]:
    """Ordered (query view, key view) pairs: CMC's full graph (all pairs, both directions) or its
    core graph (view 0 against every other view, both directions)."""
    if graph == "core":
        return [p for c in range(1, num_views) for p in ((0, c), (c, 0))]
    return [(a, c) for a in range(num_views) for c in range(num_views) if a != c]


def build_objective(cfg: ObjectiveConfig, num_views: int, embed_dim: int) -> nn.Module:
    """The objective named by ``objective.name``, configured from the rest of ``objective.*``."""
    if cfg.name == "contrastive":
        return ContrastiveObjective(cfg.temperature, cfg.bound, num_views, cfg.smile_tau, cfg.mine_ema, cfg.graph,
                                    cfg.critic, embed_dim, cfg.queue_size, cfg.intra_view_negatives,
                                    cfg.nn_support_size, cfg.debias_tau_plus)
    if cfg.name == "amdim":
        return AMDIMObjective(cfg.amdim_tclip, cfg.amdim_reg)
    if cfg.name == "dim":
        return DIMObjective(cfg.bound, cfg.smile_tau)
    raise ValueError(f"unknown objective '{cfg.name}'")
