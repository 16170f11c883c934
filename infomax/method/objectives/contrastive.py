"""``contrastive``: a critic and a bound between pairs of V >= 2 views (CMC's full or core graph; SimCLR is the
full graph of 2 views), composed from three parts a reader can hold apart:

- the **critic** (:mod:`infomax.method.critics`) scores B local queries against K candidate keys: B x K;
- the **candidates** (:class:`Candidates` and its kinds) say what a query is scored against: the W*B
  keys gathered across ranks (SimCLR, CMC), plus its own view's other images (NT-Xent), plus a queue of a
  momentum model's past keys (MoCo v2), or with each query replaced by its nearest past embedding (NNCLR);
- the **bound** (:class:`PairBound`) turns each pair's scores into an MI value in nats and the loss.

Positives sit at ``rank * B + i`` of the gathered keys (:func:`infomax.runtime.distributed.own_rows`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from infomax.method import bounds
from infomax.method.critics import build_critic
from infomax.method.momentum import KeyQueue
from infomax.method.objectives.base import Objective, diagnostics, fp32
from infomax.runtime.distributed import gather, gather_with_grad, own_rows

if TYPE_CHECKING:
    from infomax.config.pretrain import ObjectiveConfig

Critic = nn.Module  # (B x D queries, K x D keys) -> B x K scores


def view_pairs(num_views: int, graph: str) -> list[tuple[int, int]]:
    """Ordered (query view, key view) pairs: CMC's full graph (all pairs, both directions) or its
    core graph (view 0 against every other view, both directions)."""
    if graph == "core":
        return [p for c in range(1, num_views) for p in ((0, c), (c, 0))]
    return [(a, c) for a in range(num_views) for c in range(num_views) if a != c]


def without_own_column(scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """B x N scores -> B x (N - 1): each row without its column ``own[i]``, by a gather (a boolean index
    would ask the GPU for its size, a host sync)."""
    cols = torch.arange(scores.shape[1] - 1, device=scores.device)[None]  # 1 x (N - 1)
    return scores.gather(1, cols + (cols >= own[:, None]))


class Candidates(nn.Module):
    """In-batch keys: each view-a query against the W*B keys of view c gathered from every rank (SimCLR, CMC).

    The other kinds below change one thing each; a run has exactly one kind (the config refuses mixtures).
    """

    takes_keys = False  # True: the keys are a momentum model's, passed to the objective

    def queries(self, q: list[torch.Tensor]) -> list[torch.Tensor]:
        """The V x (B x D) queries that are scored (the embeddings themselves)."""
        return q

    def scores(self, critic: Critic, queries: list[torch.Tensor], keys: list[torch.Tensor], a: int, c: int,
               positives: torch.Tensor) -> torch.Tensor:
        """B x K scores of view a's queries against view c's candidates, the positive at column ``positives[i]``."""
        return critic(queries[a], keys[c])

    def remember(self, keys: list[torch.Tensor]) -> None:
        """Note this step's gathered V x (W*B x D) keys, to keep once the step is taken (:meth:`after_step`)."""

    def after_step(self) -> None:
        """Keep what :meth:`remember` noted (only for steps that were taken)."""

    def diagnostics(self, scores: list[torch.Tensor], keys: list[torch.Tensor], positives: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Diagnostics of this kind of candidates, from each pair's scores (no gradient)."""
        return {}


class IntraViewNegatives(Candidates):
    """SimCLR's NT-Xent: a view-a query is also scored against view a's other W*B - 1 images, so
    K = 2*W*B - 1 (SimCLR's 2N - 2 negatives for 2 views)."""

    def scores(self, critic: Critic, queries: list[torch.Tensor], keys: list[torch.Tensor], a: int, c: int,
               positives: torch.Tensor) -> torch.Tensor:
        same = without_own_column(critic(queries[a], keys[a]), positives)  # B x (W*B - 1)
        return torch.cat([critic(queries[a], keys[c]), same], dim=1)


class QueueKeys(Candidates):
    """MoCo v2 (:mod:`infomax.method.momentum`): the keys are a momentum model's, and each query is also scored against
    the last ``size`` keys of the key view: K = W*B + the filled queue. The queue is a buffer, checkpointed with
    the objective.

    Queue keys come from older weights and older batches' BatchNorm statistics, so a model can learn to tell
    them from the batch's keys (MoCo's Sec. 3.3): the mean negative score of each kind is logged
    (``monitor/neg_score_batch``, ``monitor/neg_score_queue``) to show such a gap, and since a bound over stale
    keys is no lower bound on the MI, InfoNCE over the batch's keys alone is logged beside it
    (``monitor/mi_batch_keys``).
    """

    takes_keys = True

    def __init__(self, num_views: int, size: int, dim: int) -> None:
        super().__init__()
        self.queue = KeyQueue(num_views, size, dim)
        self.pending: list[torch.Tensor] | None = None

    def scores(self, critic: Critic, queries: list[torch.Tensor], keys: list[torch.Tensor], a: int, c: int,
               positives: torch.Tensor) -> torch.Tensor:
        return critic(queries[a], torch.cat([keys[c], self.queue.keys(c)]))  # the batch's keys first

    def remember(self, keys: list[torch.Tensor]) -> None:
        self.pending = [k.detach() for k in keys]

    def after_step(self) -> None:  # after scoring: a key is never its own negative
        if self.pending is not None:
            self.queue.push(self.pending)
        self.pending = None

    @torch.no_grad()
    def diagnostics(self, scores: list[torch.Tensor], keys: list[torch.Tensor], positives: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        b = positives.shape[0]
        neg_batch, neg_queue, mi_batch = [], [], []
        for s, (_, c) in zip(scores, pairs):
            n = keys[c].shape[0]
            positive = s.gather(1, positives[:, None])
            neg_batch.append((s[:, :n].sum() - positive.sum()) / (b * (n - 1)))
            mi_batch.append(bounds.infonce(s[:, :n], positives=positives))
            if s.shape[1] > n:
                neg_queue.append(s[:, n:].mean())
        out = {"monitor/neg_score_batch": torch.stack(neg_batch).mean(),
               "monitor/mi_batch_keys": torch.stack(mi_batch).mean()}
        if neg_queue:
            out["monitor/neg_score_queue"] = torch.stack(neg_queue).mean()
        return out


class NearestNeighbourQueries(Candidates):
    """NNCLR (Dwibedi et al. 2021): each query replaced by its cosine nearest neighbour among the last ``size``
    view-0 embeddings (the support set, a buffer; no gradient), so the gradient reaches the model through the
    keys only. Unchanged while the support set is empty."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.support = KeyQueue(1, size, dim)
        self.pending: torch.Tensor | None = None

    def queries(self, q: list[torch.Tensor]) -> list[torch.Tensor]:  # looked up once for all of a view's pairs
        support = self.support.keys(0)
        if support.shape[0] == 0:
            return q
        with torch.no_grad():
            return [support[(F.normalize(v, dim=1) @ support.T).argmax(1)] for v in q]

    def remember(self, keys: list[torch.Tensor]) -> None:  # normalised, gathered: the same set on every rank
        self.pending = F.normalize(keys[0].detach(), dim=1)

    def after_step(self) -> None:  # after scoring: an embedding is never its own neighbour
        if self.pending is not None:
            self.support.push([self.pending])
        self.pending = None


class PairBound(nn.Module):
    """``objective.bound`` on each view pair's B x K scores: the MI value (nats) and what the loss trains.

    A module so that MINE's moving average (one per pair; it follows the global batch, so it is the same on every
    rank) is a buffer that goes into checkpoints. With ``debias_tau_plus`` the loss is debiased InfoNCE (Chuang et
    al. 2020) over the cosine critic's least score ``min_score``, while ``mi`` stays InfoNCE's.
    """

    def __init__(self, name: str, num_pairs: int, knobs: Any = None, debias_tau_plus: float = 0.0,
                 min_score: float = -math.inf) -> None:
        """``knobs``: what the bound reads (an ObjectiveConfig; its spec says which keys)."""
        super().__init__()
        self.name, self.debias_tau_plus, self.min_score = name, debias_tau_plus, min_score
        self.spec = bounds.BOUNDS[name]
        # a stateful bound (MINE's moving average): one module per pair, its state in checkpoints
        self.per_pair = nn.ModuleList(bounds.build_bound(name, knobs) for _ in range(num_pairs)) \
            if self.spec.stateful else None
        self.fn = None if self.spec.stateful else bounds.build_bound(name, knobs)

    def forward(self, pair: int, scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """The bound (a scalar, nats) of pair ``pair``'s B x K scores."""
        fn = self.per_pair[pair] if self.per_pair is not None else self.fn
        return fn(scores, positives=positives)

    def loss(self, values: list[torch.Tensor], scores: list[torch.Tensor], positives: torch.Tensor,
             log_k: float) -> torch.Tensor:
        """The loss from the pairs' bound ``values``; InfoNCE's is shown as the usual cross-entropy, log K - bound."""
        if self.debias_tau_plus:
            trained = torch.stack([bounds.debiased_infonce_per_query(
                s, positives, self.debias_tau_plus, self.min_score).mean() for s in scores]).mean()
        else:
            trained = torch.stack(values).mean()
        return (log_k if self.spec.ceiling else 0.0) - trained


def score_summary(scores: list[torch.Tensor], positives: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean critic score of positives (``pos``) and negatives (``neg``) and the fraction of queries whose
    positive scores highest (``top1``), over the pairs; sums and gathers, no boolean index: no host sync."""
    b = positives.shape[0]
    with torch.no_grad():
        positive = [s.gather(1, positives[:, None]) for s in scores]  # B x 1 each
        return {"pos": torch.stack([p.mean() for p in positive]).mean(),
                "neg": torch.stack([(s.sum() - p.sum()) / (s.numel() - b) for s, p in zip(scores, positive)]).mean(),
                "top1": torch.stack([(s.argmax(1) == positives).float().mean() for s in scores]).mean()}


class ContrastiveObjective(Objective):
    """Queries local to this rank, keys gathered across ranks, scored by a critic, bounded pair by pair."""

    def __init__(self, critic: Critic, bound: PairBound, pairs: list[tuple[int, int]],
                 candidates: Candidates | None = None) -> None:
        super().__init__()
        self.critic, self.bound, self.pairs = critic, bound, pairs
        self.candidates = candidates if candidates is not None else Candidates()
        self.takes_keys = self.candidates.takes_keys

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, num_views: int, embed_dim: int) -> ContrastiveObjective:
        pairs = view_pairs(num_views, cfg.graph)
        # debiased InfoNCE's floor is the cosine critic's least score
        bound = PairBound(cfg.bound, len(pairs), cfg, cfg.debias_tau_plus, min_score=-1.0 / cfg.temperature)
        if cfg.queue_size:
            candidates: Candidates = QueueKeys(num_views, cfg.queue_size, embed_dim)
        elif cfg.nn_support_size:
            candidates = NearestNeighbourQueries(cfg.nn_support_size, embed_dim)
        elif cfg.intra_view_negatives:
            candidates = IntraViewNegatives()
        else:
            candidates = Candidates()
        return cls(build_critic(cfg.critic, embed_dim, cfg.temperature), bound, pairs, candidates)

    def after_step(self) -> None:
        self.candidates.after_step()

    def forward(self, z: list[torch.Tensor], keys: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            z: V query embeddings, each B x D (local to this rank, any dtype).
            keys: V key embeddings (B x D) of a momentum model, without gradient; required with the queue.
                Without them the queries are their own keys (SimCLR/CMC).

        Returns:
            loss (scalar, fp32 or wider) and detached diagnostics: ``mi`` (the bound in nats, mean over
            pairs), ``log_k`` (InfoNCE's ceiling log K), ``pos`` / ``neg`` (mean critic score of positives /
            negatives), ``top1`` (fraction of queries whose positive scores highest), ``mi_A_B`` per ordered
            pair of views, and the candidates' own (:meth:`Candidates.diagnostics`).
        """
        if self.takes_keys and keys is None:
            raise ValueError("objective.queue_size > 0 needs the momentum model's keys")
        # Logits in fp32 even under bf16/fp16 autocast (docs/DESIGN.md, invariant 2).
        with torch.autocast(device_type=z[0].device.type, enabled=False):
            q = [fp32(v) for v in z]  # V x (B x D)
            if keys is None:
                gathered = [gather_with_grad(v) for v in q]  # V x (W*B x D), gradient to every rank's rows
            else:
                gathered = [gather(fp32(k)) for k in keys]  # momentum keys carry no gradient
            positives = own_rows(q[0].shape[0], q[0].device)  # positives at rank*B + i
            queries = self.candidates.queries(q)
            scores = [self.candidates.scores(self.critic, queries, gathered, a, c, positives) for a, c in self.pairs]
            values = [self.bound(pair, s, positives) for pair, s in enumerate(scores)]  # nats, per pair
            log_k = math.log(scores[0].shape[1])
            loss = self.bound.loss(values, scores, positives, log_k)
            self.candidates.remember(gathered)  # kept by after_step() once the step is known to be finite
            per_pair = {f"mi_{a}_{c}": v.detach() for (a, c), v in zip(self.pairs, values)}
            return loss, diagnostics(torch.stack(values).mean(), log_k, **score_summary(scores, positives), **per_pair,
                                     **self.candidates.diagnostics(scores, gathered, positives, self.pairs))


OBJECTIVE = ContrastiveObjective
