"""``amdim``: multiscale global-vs-local NCE between two views (Bachman et al. 2019)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from infomax.method.objectives.base import Objective, diagnostics, fp32
from infomax.method.objectives.local_nce import multi_positive_nce
from infomax.runtime.distributed import gather_with_grad, own_rows

if TYPE_CHECKING:
    from infomax.config.pretrain import ObjectiveConfig


class AMDIMObjective(Objective):
    """AMDIM (Bachman et al. 2019): multiscale NCE between two views, both directions.

    With local stages (s1, s2), s2 the deeper one, the terms are global(a) -> local_s2(b) ("1->5"),
    global(a) -> local_s1(b) ("1->7") and every local_s2(a) position -> local_s2(b) ("5->5"),
    for (a, b) = (0, 1) and (1, 0); negatives are all positions of all other gathered images.
    Loss = mean of the terms + reg_weight * mean squared raw score.
    """

    def __init__(self, tclip: float = 20.0, reg_weight: float = 0.05, local_stages: tuple[int, int] = (3, 4)) -> None:
        super().__init__()
        self.tclip, self.reg_weight = tclip, reg_weight
        self.local_stages = list(local_stages)

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, num_views: int, embed_dim: int) -> AMDIMObjective:
        return cls(cfg.amdim_tclip, cfg.amdim_reg, tuple(cfg.local_stages))

    def forward(self, out: list[dict], keys: None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``out``: per view {"global": B x D, "local": [B x N_s x D per local stage, shallow first]}."""
        with torch.autocast(device_type=out[0]["global"].device.type, enabled=False):
            g = [fp32(o["global"]) for o in out]
            local = [[fp32(m) for m in o["local"]] for o in out]
            b = g[0].shape[0]
            positives = own_rows(b, g[0].device)
            maps = [[gather_with_grad(m) for m in views_local] for views_local in local]  # K x N x D
            terms: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            for a, c in ((0, 1), (1, 0)):
                deep, shallow = maps[c][-1], maps[c][0]
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
            # Each term's ceiling is log(1 + (K-1) N) for its own map's N positions (mi + nce),
            # not log K over images: the bar would show MI above its ceiling.
            log_k = torch.stack([t[1] + t[0].detach() for t in terms.values()]).mean()
            return loss, diagnostics(torch.stack(list(mis.values())).mean(), log_k, nce=nce.detach(),
                                     score_reg=reg.detach(), **{f"mi_{k}": v for k, v in mis.items()})


OBJECTIVE = AMDIMObjective
