"""Training objectives: views x critic x bound -> loss plus diagnostics.

For now one objective, ``contrastive``: a temperature-scaled cosine critic between every ordered
pair of V >= 2 views (SimCLR / CMC "full graph"), with any bound from :mod:`pretrain.bounds`.
The bounds issue adds CMC's core graph and Lab views, AMDIM and DIM beside it.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import bounds
from pretrain.distributed import gather_with_grad, rank

BOUNDS = ("infonce", "nwj", "dv", "mine", "js", "smile")


class ContrastiveObjective(nn.Module):
    """Bound between every ordered pair of views, queries local, keys gathered across ranks.

    A module (not a function) so that bounds with state (MINE's moving average, one per pair)
    live in its buffers and go into checkpoints with everything else. MINE's EMA is per rank
    (each rank averages its own batches' denominators); the checkpoint keeps rank 0's.
    """

    def __init__(self, temperature: float, bound: str = "infonce", num_views: int = 2,
                 smile_tau: float = 5.0, mine_ema: float = 0.1, graph: str = "full") -> None:
        super().__init__()
        self.temperature, self.bound = temperature, bound
        self.pairs = view_pairs(num_views, graph)
        self.mine = nn.ModuleList(bounds.MINE(mine_ema) for _ in self.pairs) if bound == "mine" else None
        self._fn = {"infonce": bounds.infonce, "nwj": bounds.nwj, "dv": bounds.dv, "js": bounds.js,
                    "smile": partial(bounds.smile, tau=smile_tau)}.get(bound)

    def forward(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            z: V embeddings, each B x D (local to this rank, any dtype).

        Returns:
            loss (scalar, fp32 or wider) and detached diagnostics: ``mi`` (the bound in nats, mean over
            pairs), ``log_k`` (InfoNCE's ceiling log K, K = W*B keys), ``pos`` / ``neg`` (mean
            positive / negative cosine), ``top1`` (fraction of queries whose positive scores highest).
        """
        # Logits in fp32 even under bf16/fp16 autocast (invariant 2).
        with torch.autocast(device_type=z[0].device.type, enabled=False):
            q = [F.normalize(v.to(torch.promote_types(v.dtype, torch.float32)), dim=1) for v in z]  # V x (B x D)
            keys = [gather_with_grad(v) for v in q]  # V x (W*B x D)
            b = q[0].shape[0]
            positives = torch.arange(b, device=q[0].device) + rank() * b  # positives at rank*B + i
            values, pos, neg, top1 = [], [], [], []
            for pair, (a, c) in enumerate(self.pairs):
                cos = q[a] @ keys[c].T  # B x K, K = W*B: view-a queries against view-c keys
                scores = cos / self.temperature
                bound = self.mine[pair] if self.mine is not None else self._fn
                values.append(bound(scores, positives=positives))
                with torch.no_grad():
                    mask = F.one_hot(positives, cos.shape[1]).bool()
                    pos.append(cos[mask].mean())
                    neg.append(cos[~mask].mean())
                    top1.append((cos.argmax(1) == positives).float().mean())
            log_k = math.log(keys[0].shape[0])
            mi = torch.stack(values).mean()
            # InfoNCE's loss is shown as the usual cross-entropy, log K - bound.
            loss = (log_k if self.bound == "infonce" else 0.0) - mi
            diag = {
                "mi": mi.detach(),
                "log_k": torch.tensor(log_k, device=loss.device),
                "pos": torch.stack(pos).mean(),
                "neg": torch.stack(neg).mean(),
                "top1": torch.stack(top1).mean(),
                **{f"mi_{a}_{c}": v.detach() for (a, c), v in zip(self.pairs, values)},  # per-pair diagnostics
            }
        return loss, diag


def view_pairs(num_views: int, graph: str) -> list[tuple[int, int]]:
    """Ordered (query view, key view) pairs: CMC's full graph (all pairs, both directions) or its
    core graph (view 0 against every other view, both directions)."""
    if graph == "core":
        return [p for c in range(1, num_views) for p in ((0, c), (c, 0))]
    return [(a, c) for a in range(num_views) for c in range(num_views) if a != c]


def build_objective(name: str, temperature: float, bound: str = "infonce", num_views: int = 2,
                    smile_tau: float = 5.0, mine_ema: float = 0.1, graph: str = "full") -> nn.Module:
    if name == "contrastive":
        return ContrastiveObjective(temperature, bound, num_views, smile_tau, mine_ema, graph)
    raise ValueError(f"unknown objective '{name}'")
