"""Training objectives: views x critic x bound -> loss plus diagnostics.

For now one objective, multiview InfoNCE with a temperature-scaled cosine critic (SimCLR / CMC
"full graph" over V >= 2 views); the bounds issue adds CMC, AMDIM and DIM variants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import bounds
from pretrain.distributed import gather_with_grad, rank


class InfoNCEObjective(nn.Module):
    """Symmetric InfoNCE between every ordered pair of views, negatives gathered across ranks.

    A module (not a function) so that bounds with state (e.g. MINE's moving average) live in
    its buffers and go into checkpoints with everything else.
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            z: V embeddings, each B x D (local to this rank, any dtype).

        Returns:
            loss (scalar fp32) and detached diagnostics: ``mi`` (InfoNCE bound in nats, mean over
            pairs), ``log_k`` (the bound's ceiling), ``pos`` / ``neg`` (mean positive / negative
            cosine score), ``top1`` (fraction of queries whose positive scores highest).
        """
        # Logits in fp32 even under bf16/fp16 autocast (invariant 2).
        with torch.autocast(device_type=z[0].device.type, enabled=False):
            q = [F.normalize(v.to(torch.promote_types(v.dtype, torch.float32)), dim=1) for v in z]  # V x (B x D)
            keys = [gather_with_grad(v) for v in q]  # V x (W*B x D)
            b = q[0].shape[0]
            positives = torch.arange(b, device=q[0].device) + rank() * b  # positives at rank*B + i
            losses, mis, pos, neg, top1 = [], [], [], [], []
            for a in range(len(q)):
                for c in range(len(q)):
                    if a == c:
                        continue
                    cos = q[a] @ keys[c].T  # B x K, K = W*B
                    bound = bounds.infonce_per_query(cos / self.temperature, positives)  # B
                    losses.append(-bound.mean())
                    with torch.no_grad():
                        mask = F.one_hot(positives, cos.shape[1]).bool()
                        mis.append(bound.mean())
                        pos.append(cos[mask].mean())
                        neg.append(cos[~mask].mean())
                        top1.append((cos.argmax(1) == positives).float().mean())
            log_k = math.log(keys[0].shape[0])
            # The loss is -bound (+ constant log K), i.e. the usual cross-entropy.
            loss = torch.stack(losses).mean() + log_k
            diag = {
                "mi": torch.stack(mis).mean(),
                "log_k": torch.tensor(log_k, device=loss.device),
                "pos": torch.stack(pos).mean(),
                "neg": torch.stack(neg).mean(),
                "top1": torch.stack(top1).mean(),
            }
        return loss, diag


def build_objective(name: str, temperature: float) -> nn.Module:
    if name == "infonce":
        return InfoNCEObjective(temperature)
    raise ValueError(f"unknown objective '{name}'")
