"""AMDIM and DIM objectives: shapes on a timm ResNet, NCE against a naive loop, 2 ranks == 1 rank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import REPO, pretrain_in_process, spawn_ranks
from infomax.config.pretrain import ModelConfig
from infomax.method.models import LocalGlobalModel
from infomax.method.objectives import AMDIMObjective, DIMObjective, multi_positive_nce

B, WORLD = 4, 2


def test_local_and_global_terms_have_the_expected_shapes_on_resnet18() -> None:
    model = LocalGlobalModel(ModelConfig(arch="resnet18", small_input=True, head_dims=[128, 32]), 3, 2, [3, 4])
    out = model([torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)])
    assert out[0]["global"].shape == (B, 32)
    assert [m.shape for m in out[1]["local"]] == [(B, 64, 32), (B, 16, 32)]  # 8x8 and 4x4 positions
    loss, diag = AMDIMObjective()(out)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"mi_1to1_01", "mi_1to0_01", "mi_lto1_01", "mi_1to1_10", "mi_1to0_10", "mi_lto1_10"} <= set(diag)
    # The ceiling is the mean of the terms' log(1 + (K-1) N): 16 positions for 1->1 and l->1, 64 for 1->0.
    ceilings = [math.log(1 + (B - 1) * n) for n in (16, 64, 16)]
    assert diag["log_k"].item() == pytest.approx(sum(ceilings) / 3) and diag["mi"] <= diag["log_k"]
    loss.backward()
    assert model.encoders[0].conv1.weight.grad is not None


def test_multi_positive_nce_equals_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    positives = torch.tensor([2, 0, 3])
    loss, mi, reg = multi_positive_nce(q, keys, positives, tclip=2.0)
    terms = []
    for i in range(3):
        s = 2.0 * torch.tanh((keys @ q[i]) / math.sqrt(5) / 2.0)  # K x N
        negatives = torch.cat([s[j] for j in range(4) if j != positives[i]])
        for n in range(6):
            logits = torch.cat([s[positives[i], n : n + 1], negatives])
            terms.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(loss, torch.stack(terms).mean())
    assert torch.isclose(mi, math.log(1 + 3 * 6) - loss)
    assert torch.isclose(reg, (torch.einsum("qd,knd->qkn", q, keys) / math.sqrt(5)).pow(2).mean())


def dim_reference(g: torch.Tensor, local: torch.Tensor, bound: str) -> torch.Tensor:
    """A loop over rdevon/DIM's definitions (dim_losses.py): g B x D, local B x N x D -> the bound.

    nce_loss: each (image i, location n) positive g_i . l_in against every location of every other
    image, unscaled; fenchel_dual_loss / donsker_varadhan_loss: means over the same two sets."""
    b, n, _ = local.shape
    u = torch.einsum("id,jnd->ijn", g, local)  # B x B x N
    pos = torch.stack([u[i, i] for i in range(b)])  # B x N
    neg = torch.stack([u[i, j] for i in range(b) for j in range(b) if j != i])  # B(B-1) x N
    if bound == "infonce":
        terms = [torch.cat([u[i, i, m : m + 1], torch.cat([u[i, j] for j in range(b) if j != i])]) for i in range(b)
                 for m in range(n)]
        assert all(len(t) == 1 + (b - 1) * n for t in terms)
        return math.log(1 + (b - 1) * n) + torch.stack([torch.log_softmax(t, 0)[0] for t in terms]).mean()
    if bound == "dv":
        return pos.mean() - (torch.logsumexp(neg.flatten(), 0) - math.log(neg.numel()))
    # js: DIM trains E_p[-softplus(-S)] - E_q[softplus(S)]; the value is NWJ(S + 1) over the same sets
    return pos.mean() + 1 - neg.exp().mean()


@pytest.mark.parametrize("bound", ["infonce", "dv", "js"])
def test_dim_scores_every_location_of_every_other_image_as_the_reference(bound: str) -> None:
    gen = torch.Generator().manual_seed(3)
    out = [{"global": torch.randn(B, 5, generator=gen, dtype=torch.float64),
            "local": [torch.randn(B, 6, 5, generator=gen, dtype=torch.float64)]} for _ in range(2)]
    loss, diag = DIMObjective(bound)(out)
    expected = torch.stack([dim_reference(out[a]["global"], out[c]["local"][-1], bound) for a, c in ((0, 1), (1, 0))]).mean()
    assert torch.allclose(diag["mi"], expected, rtol=0, atol=1e-12)
    assert diag["log_k"].item() == pytest.approx(math.log(1 + (B - 1) * 6))  # not log B: DIM's (B-1) x N negatives


class TinyLocalGlobal(nn.Module):
    """Differentiable stand-in for LocalGlobalModel without BatchNorm: inputs B x 6."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.g, self.l1, self.l2 = nn.Linear(6, 4), nn.Linear(6, 3 * 4), nn.Linear(6, 2 * 4)

    def forward(self, views):
        return [{"global": self.g(x), "local": [self.l1(x).view(-1, 3, 4), self.l2(x).view(-1, 2, 4)]} for x in views]


def objectives():
    return {"amdim": AMDIMObjective(tclip=3.0, reg_weight=0.05), "dim_js": DIMObjective("js"),
            "dim_infonce": DIMObjective("infonce")}


def global_views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * B, 6, generator=g, dtype=torch.float64) for _ in range(2)]


def loss_and_grads(model: nn.Module, views, name: str):
    loss, _ = objectives()[name](model(views))
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _worker(rank: int, tmp: str, name: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    model = nn.parallel.DistributedDataParallel(TinyLocalGlobal().double(), find_unused_parameters=name != "amdim")
    views = [v[rank * B : (rank + 1) * B] for v in global_views()]
    loss, grads = loss_and_grads(model, views, name)
    torch.save({"loss": loss, "grads": grads}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["amdim", "dim_js", "dim_infonce"])
def test_two_ranks_match_one_rank(tmp_path: Path, name: str) -> None:
    loss1, grads1 = loss_and_grads(TinyLocalGlobal().double(), global_views(), name)
    spawn_ranks(_worker, tmp_path, name, nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.allclose(loss1, torch.stack([r["loss"] for r in results]).mean(), rtol=0, atol=1e-10)
    for g1, g2 in zip(grads1, results[0]["grads"]):
        assert torch.allclose(g1, g2, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["amdim_synthetic", "dim_synthetic"])
def test_objective_configs_pretrain_a_few_steps(config: str, run_dir: Path, capsys) -> None:
    out = pretrain_in_process(capsys, f"run.dir={run_dir}", "run.max_steps=3", "monitor.knn_every=0",
                              config=REPO / "configs" / f"{config}.yaml").stdout
    assert "finished: step 3/3" in out and (run_dir / "export" / "encoder.safetensors").is_file()
