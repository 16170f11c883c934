"""``dim``: Deep InfoMax, a global embedding against every position of a local map (Hjelm et al. 2019)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from infomax.config.pretrain import ConfigError
from infomax.method import bounds
from infomax.method.objectives.base import Objective, diagnostics, fp32
from infomax.method.objectives.local_nce import multi_positive_nce
from infomax.runtime.distributed import gather_with_grad, own_rows

if TYPE_CHECKING:
    from infomax.config.pretrain import ObjectiveConfig


class DIMObjective(Objective):
    """Deep InfoMax: global embedding of view a vs every position of the deepest local map of view b.

    As in rdevon/DIM (``cortex_DIM/functions/dim_losses.py``), the scores are plain dot products
    g_a[i] . l_b[j, m] (no 1/sqrt(D) scale) of every query against every position m of every gathered
    image j; the positives are the N positions of the query's own image, the negatives all
    positions of every other image. ``infonce`` is DIM's ``nce_loss``: each positive against the
    (K-1) x N negatives, so K' = 1 + (K-1) N candidates. ``js``, ``dv``, ``nwj``, ``smile`` take the
    means over those same positive and negative sets (``fenchel_dual_loss``, ``donsker_varadhan_loss``).
    Both directions (a, b) = (0, 1) and (1, 0) are averaged.
    """

    def __init__(self, bound: str = "js", knobs: Any = None, local_stage: int = 4) -> None:
        super().__init__()
        self.check_config(SimpleNamespace(bound=bound))
        self.bound = bound
        self._fn = bounds.build_bound(bound, knobs or SimpleNamespace(smile_tau=5.0, mine_ema=0.1))
        # DIM reads only the deepest map; a head for another would leave DDP an unused parameter.
        self.local_stages = [local_stage]

    @classmethod
    def check_config(cls, cfg: ObjectiveConfig) -> None:
        if not bounds.BOUNDS[cfg.bound].dim:
            raise ConfigError(f"bad value for config key 'objective.bound': dim supports "
                              f"{', '.join(n for n, b in bounds.BOUNDS.items() if b.dim)}, got {cfg.bound}")

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, num_views: int, embed_dim: int) -> DIMObjective:
        return cls(cfg.bound, cfg, cfg.local_stages[-1])

    def forward(self, out: list[dict], keys: None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``out``: per view {"global": B x D, "local": [B x N x D]} (its one local stage)."""
        with torch.autocast(device_type=out[0]["global"].device.type, enabled=False):
            values = []
            for a, c in ((0, 1), (1, 0)):
                g = fp32(out[a]["global"])  # B x D
                maps = gather_with_grad(fp32(out[c]["local"][-1]))  # K x N x D
                (b, _), (k, n, _) = g.shape, maps.shape
                positives = own_rows(b, g.device)  # each query's own image
                if self.bound == "infonce":
                    nce, _, _ = multi_positive_nce(g, maps, positives, tclip=None, scaled=False)
                    values.append(math.log(1 + (k - 1) * n) - nce)
                else:
                    scores = torch.einsum("bd,knd->bkn", g, maps).reshape(b, k * n)  # columns j * N + m
                    own = positives[:, None] == torch.arange(k, device=g.device)  # B x K
                    mask = own.repeat_interleave(n, dim=1)  # B x (K N)
                    values.append(self._fn(scores, positives=mask))
            mi = torch.stack(values).mean()
            log_k = math.log(1 + (k - 1) * n)  # candidates per positive: itself and every other image's positions
            loss = (log_k if self.bound == "infonce" else 0.0) - mi
        return loss, diagnostics(mi, log_k)


OBJECTIVE = DIMObjective
