"""docs/DESIGN.md, invariant 1: W processes x B images give exactly the loss and gradients of 1 process x W*B."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import contrastive, free_port, spawn_ranks
from infomax.method.objectives import contrastive as contrastive_module

B, WORLD = 4, 2


def tiny_model() -> nn.Module:
    """A small encoder + head, float64, without BatchNorm (whose batch statistics differ by design)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6)
    ).double()


def global_batch() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * B, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]


def loss_and_grads(model: nn.Module, views: list[torch.Tensor], bound: str = "infonce",
                   intra_view_negatives: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    objective = contrastive(temperature=0.5, bound=bound, intra_view_negatives=intra_view_negatives)
    loss, _ = objective([model(v) for v in views])
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def naive_gather(x: torch.Tensor) -> torch.Tensor:
    """The common mistake: all_gather (no gradient) with only the local slice carrying gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _worker(rank: int, tmp: str, naive: bool, bound: str, intra_view_negatives: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    if naive:
        contrastive_module.gather_with_grad = naive_gather  # where the contrastive objective looks it up
    model = nn.parallel.DistributedDataParallel(tiny_model())
    views = [v[rank * B : (rank + 1) * B] for v in global_batch()]
    loss, grads = loss_and_grads(model, views, bound, intra_view_negatives)  # DDP has averaged the gradients over ranks
    torch.save({"loss": loss, "grads": grads}, f"{tmp}/rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort under load)
    dist.destroy_process_group()


def two_rank_result(tmp_path: Path, naive: bool, bound: str = "infonce",
                    intra_view_negatives: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    spawn_ranks(_worker, tmp_path, naive, bound, intra_view_negatives, nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in results[1:]:  # after DDP's all-reduce every rank holds the same gradient
        assert all(torch.equal(a, b) for a, b in zip(results[0]["grads"], r["grads"]))
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    return mean_loss, results[0]["grads"]


@pytest.mark.parametrize("bound, intra_view_negatives", [("infonce", False), ("nwj", False), ("js", False), ("infonce", True)])
def test_two_ranks_match_one_rank_loss_and_gradients(tmp_path: Path, bound: str, intra_view_negatives: bool) -> None:
    """Exact for bounds that are means over queries/negatives. (DV, MINE and SMILE take the log of a
    batch mean, so per-rank values are not the global one by construction.) With SimCLR's intra-view
    negatives each rank must leave out its own queries at rank * B + i of the gathered keys."""
    loss1, grads1 = loss_and_grads(tiny_model(), global_batch(), bound, intra_view_negatives)
    loss2, grads2 = two_rank_result(tmp_path, naive=False, bound=bound, intra_view_negatives=intra_view_negatives)
    assert torch.allclose(loss1, loss2, rtol=0, atol=1e-10)
    for g1, g2 in zip(grads1, grads2):
        assert torch.allclose(g1, g2, rtol=0, atol=1e-10), (g1 - g2).abs().max()


def test_naive_gather_breaks_the_gradient_comparison(tmp_path: Path) -> None:
    """The check above has teeth: gathering without cross-rank gradient gives a different gradient."""
    loss1, grads1 = loss_and_grads(tiny_model(), global_batch())
    loss2, grads2 = two_rank_result(tmp_path, naive=True)
    assert torch.allclose(loss1, loss2, rtol=0, atol=1e-10)  # the forward pass is the same...
    worst = max((g1 - g2).abs().max().item() for g1, g2 in zip(grads1, grads2))
    assert worst > 1e-4  # ...but the gradients are wrong


def tiny_bn_model() -> nn.Module:
    """tiny_model with BatchNorm after the conv and in the head, as the default encoder and head have."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8),
        nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6)
    ).double()


def _bn_worker(rank: int, tmp: str, global_bn: bool) -> None:
    from infomax.runtime.distributed import convert_global_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    model = tiny_bn_model()
    model = nn.parallel.DistributedDataParallel(convert_global_batchnorm(model) if global_bn else model)
    views = [v[rank * B : (rank + 1) * B] for v in global_batch()]
    loss, grads = loss_and_grads(model, views)
    buffers = [b.clone() for b in model.module.buffers()]
    torch.save({"loss": loss, "grads": grads, "buffers": buffers}, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("global_bn", [True, False])
def test_batchnorm_over_two_cpu_ranks_matches_one_process(tmp_path: Path, global_bn: bool) -> None:
    """model.sync_bn on CPU ranks (GlobalBatchNorm): loss, gradients and running statistics of 2 x B
    equal 1 x 2B in float64. Plain per-rank BatchNorm does not (the check has teeth)."""
    model = tiny_bn_model()
    loss1, grads1 = loss_and_grads(model, global_batch())
    buffers1 = list(model.buffers())
    spawn_ranks(_bn_worker, tmp_path, global_bn, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    loss2 = torch.stack([r["loss"] for r in ranks]).mean()
    worst = max((g1 - g2).abs().max().item() for g1, g2 in zip(grads1, ranks[0]["grads"]))
    if not global_bn:
        assert abs(loss1 - loss2).item() > 1e-4 and worst > 1e-4
        return
    assert torch.allclose(loss1, loss2, rtol=0, atol=1e-10)
    assert worst < 1e-10
    for b1, b2 in zip(buffers1, ranks[1]["buffers"]):  # running mean/var (unbiased) and the batch count
        assert torch.allclose(b1.double(), b2.double(), rtol=0, atol=1e-12)


def _offset_bn_worker(rank: int, tmp: str) -> None:
    from infomax.runtime.distributed import GlobalBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    y = GlobalBatchNorm(3)(offset_batch()[rank * B : (rank + 1) * B])
    torch.save({"y": y.detach()}, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def offset_batch() -> torch.Tensor:
    """fp32 channels with a mean of 1e4 and a spread of 1: E[x^2] - E[x]^2 loses every digit there."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(WORLD * B, 3, 4, 4, generator=g) + 1e4


def test_global_batchnorm_keeps_fp32_variance_when_the_mean_is_large(tmp_path: Path) -> None:
    spawn_ranks(_offset_bn_worker, tmp_path, nprocs=WORLD)
    y = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["y"] for r in range(WORLD)])
    expected = nn.BatchNorm2d(3)(offset_batch())
    assert torch.allclose(y, expected, atol=2e-3), (y - expected).abs().max()


def test_global_batchnorm_refuses_batchnorm_subclasses_it_would_strip() -> None:
    from timm.layers import BatchNormAct2d

    from infomax.config.pretrain import ConfigError
    from infomax.runtime.distributed import GlobalBatchNorm, convert_global_batchnorm

    converted = convert_global_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    assert type(converted[1]) is GlobalBatchNorm
    with pytest.raises(ConfigError, match="BatchNormAct2d; set model.sync_bn=false"):
        convert_global_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), BatchNormAct2d(4)))


def test_gpu_sync_batchnorm_keeps_the_activation_of_timms_batchnorm_act() -> None:
    """model.sync_bn on GPUs: timm's BatchNormAct2d (resnetv2, efficientnet) becomes SyncBatchNormAct with its
    ReLU; torch's own conversion would make it a plain SyncBatchNorm without it (the check has teeth). The
    conversion needs no GPU: only running SyncBatchNorm does."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    from infomax.runtime.distributed import sync_batchnorm

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.BatchNorm2d(4))

    reference = model().eval()
    converted = sync_batchnorm(copy.deepcopy(reference), "cuda").eval()
    assert type(converted[1]) is SyncBatchNormAct and isinstance(converted[1].act, nn.ReLU)
    assert type(converted[2]) is nn.SyncBatchNorm
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(converted(x), reference(x))  # eval mode: the same function, activation included
    assert (reference(x) >= 0).all()  # after the ReLU, the last BN (fresh running statistics) keeps the sign
    torch_converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference)).eval()
    assert (torch_converted(x) < 0).any()  # torch's conversion keeps the act module but never calls it


def test_gather_is_identity_without_process_group() -> None:
    from infomax.runtime.distributed import gather_with_grad

    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


# ---------------------------------------------------------------- the momentum queue (MoCo v2)
QUEUE = 12  # smaller than 3 global batches of 8: the second push wraps around


def queue_steps(model: nn.Module, views_per_step: list[list[torch.Tensor]]) -> dict[str, object]:
    """Three optimizer steps with a momentum key model and a queue; the last step's loss and gradients,
    the final queue and the final momentum weights."""
    from infomax.method.momentum import MomentumKeys

    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    keys = MomentumKeys(raw, momentum=0.9)
    objective = contrastive(temperature=0.5, queue_size=QUEUE, dim=6).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for views in views_per_step:
        optimizer.zero_grad()
        with torch.no_grad():  # the pipeline's model maps a list of views; this tiny one maps one view
            key_embeddings = [keys.model(v) for v in views]
        loss, diag = objective([model(v) for v in views], key_embeddings)
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        optimizer.step()
        keys.update(raw)
        objective.after_step()
    return {"loss": loss.detach(), "grads": grads, "log_k": diag["log_k"], "queue": objective.candidates.queue.queue.clone(),
            "filled": objective.candidates.queue.filled.clone(), "momentum": [p.detach().clone() for p in keys.parameters()]}


def three_global_batches() -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [[torch.randn(WORLD * B, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)] for _ in range(3)]


def _queue_worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    model = nn.parallel.DistributedDataParallel(tiny_model())
    local = [[v[rank * B : (rank + 1) * B] for v in views] for views in three_global_batches()]
    torch.save(queue_steps(model, local), f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_queue_is_identical_on_every_rank_and_matches_one_process(tmp_path: Path) -> None:
    one = queue_steps(tiny_model(), three_global_batches())
    spawn_ranks(_queue_worker, tmp_path, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])  # enqueued identically on every rank
    assert torch.allclose(ranks[0]["queue"], one["queue"], rtol=0, atol=1e-10)  # == one process fed 2B
    assert int(one["filled"]) == QUEUE and float(one["log_k"]) == pytest.approx(math.log(WORLD * B + QUEUE))
    assert float(ranks[0]["log_k"]) == pytest.approx(math.log(WORLD * B + QUEUE))  # K counts the true candidates
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    assert torch.allclose(mean_loss, one["loss"], rtol=0, atol=1e-10)
    for g1, g2 in zip(one["grads"], ranks[0]["grads"]):
        assert torch.allclose(g1, g2, rtol=0, atol=1e-10), (g1 - g2).abs().max()
    for m1, m2 in zip(one["momentum"], ranks[1]["momentum"]):
        assert torch.allclose(m1, m2, rtol=0, atol=1e-10)


def test_queue_wraps_around_keeping_the_newest_keys() -> None:
    from infomax.method.momentum import KeyQueue

    q = KeyQueue(num_views=1, size=5, dim=1)
    for start in (0, 3, 6):
        q.push([torch.arange(start, start + 3, dtype=torch.float32)[:, None]])
    assert sorted(q.keys(0).flatten().tolist()) == [4, 5, 6, 7, 8]  # the 5 newest of 0..8
    assert int(q.filled) == 5


class _ViewsBN(nn.Module):
    """tiny_bn_model on each view of a list, as the pipeline's multi-view model maps views to embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_bn_model()

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.net(v) for v in views]


def test_shuffled_bn_computes_each_keys_group_on_its_own_statistics() -> None:
    """One process (MoCo's SplitBatchNorm demo): the keys of a random permutation of the batch,
    each group's BatchNorm on its own statistics, come back in the batch's order; a query's positive key is
    not normalised with the statistics of the whole batch it was computed in."""
    from infomax.method.momentum import MomentumKeys

    views = global_batch()  # 2 views of 8
    keys = MomentumKeys(_ViewsBN(), 0.99, shuffle_groups=2, seed=3)
    got = keys(views, step=5)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3 * 1_000_003 + 5))
    net = copy.deepcopy(keys.model.net).train()
    for rows in order.chunk(2):
        for v in range(2):
            assert torch.allclose(got[v][rows], net(views[v][rows]), rtol=0, atol=1e-12)
    plain = MomentumKeys(_ViewsBN(), 0.99)(views)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)  # the whole batch's statistics differ from a group's
    assert torch.equal(keys(views, step=5)[1], got[1]) and not torch.equal(keys(views, step=6)[1], got[1])


def _shuffled_bn_worker(rank: int, tmp: str) -> None:
    from infomax.method.momentum import MomentumKeys

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    local = [v[rank * B : (rank + 1) * B] for v in global_batch()]
    torch.save(MomentumKeys(_ViewsBN(), 0.99, shuffle_groups=1, seed=3)(local, step=5), f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_shuffled_bn_over_two_ranks_is_mocos_batch_shuffle(tmp_path: Path) -> None:
    """MoCo's _batch_shuffle_ddp: 2 ranks of B, each computing its share of the shuffled global batch on its
    own BatchNorm, return for their own rows exactly the keys of one process splitting the 2B batch into 2
    groups of the same order."""
    from infomax.method.momentum import MomentumKeys

    one = MomentumKeys(_ViewsBN(), 0.99, shuffle_groups=WORLD, seed=3)(global_batch(), step=5)
    spawn_ranks(_shuffled_bn_worker, tmp_path, nprocs=WORLD)
    for r in range(WORLD):
        ranks = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for v in range(2):
            assert torch.allclose(ranks[v], one[v][r * B : (r + 1) * B], rtol=0, atol=1e-12)


def _key_model_worker(rank: int, tmp: str, port: int) -> None:
    import os

    from accelerate.utils import set_seed

    from conftest import REPO
    from infomax.config.pretrain import load_config
    from infomax.data.train_loader import build_train_data
    from infomax.runtime.distributed import make_accelerator
    from infomax.train.loop import build_optimizer, build_parts

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = load_config(str(REPO / "configs" / "synthetic_tiny.yaml"),
                      ["objective.queue_size=64", "monitor.knn_every=0", "monitor.online_probe=false",
                       "run.dist_timeout_min=37"])
    accelerator, _ = make_accelerator(cfg.run.seed, "no", cfg.run.dist_timeout_min)
    assert accelerator.num_processes == WORLD
    # The configured collective timeout reaches the process group (NCCL's default of 10 min could abort a job).
    assert dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout == timedelta(minutes=37)
    set_seed(cfg.run.seed + accelerator.process_index)  # as pretrain/main.py seeds each rank
    data = build_train_data(cfg, accelerator)
    parts = build_parts(cfg, data, accelerator)
    built = {k: v.clone() for k, v in parts.model.state_dict().items()}  # this rank's own seed's weights
    build_optimizer(cfg, parts, accelerator, len(data))
    torch.save({"built": built, "online": accelerator.unwrap_model(parts.model).state_dict(),
                "keys": parts.key_model.model.state_dict()}, f"{tmp}/rank{rank}.pt")
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


def test_momentum_key_model_is_rank_zeros_online_model_on_every_rank(tmp_path: Path) -> None:
    """Ranks seeded seed + rank build different networks; DDP's broadcast makes the online
    models equal, and the key model, copied after it, must be that same network on every rank at step 0
    (a copy taken before the wrap held each rank's own weights and filled the queue with their keys)."""
    port = free_port()
    spawn_ranks(_key_model_worker, tmp_path, port, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    weights = [k for k, v in ranks[0]["built"].items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.equal(ranks[0]["built"][k], ranks[1]["built"][k]) for k in weights)  # the seeds differ
    for r in ranks:
        assert r["keys"].keys() == ranks[0]["online"].keys()
        for k, v in ranks[0]["online"].items():
            assert torch.equal(r["online"][k], v) and torch.equal(r["keys"][k], v), k


class _Labelled(torch.utils.data.Dataset):
    """N grey 8x8 images whose class (of 3) sets their mean brightness, for the kNN monitor."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = self.y.view(-1, 1, 1, 1) / 3 + 0.2 * torch.rand(n, 1, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


BANK, QUERIES = 1100, 300  # 5 and 2 batches of the monitor's 256


def _monitor_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _knn_monitor_worker(rank: int, tmp: str, port: int) -> None:
    from accelerate import Accelerator

    from infomax.features.extract import knn_monitor

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    accelerator = Accelerator(cpu=True)
    encoder, seen = _monitor_encoder(), []
    encoder.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    top1, _ = knn_monitor(encoder, _Labelled(BANK, 0), _Labelled(QUERIES, 1), accelerator, k=5, temperature=0.1,
                          num_workers=0)
    torch.save({"top1": top1, "images": sum(seen)}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_knn_monitor_is_shared_by_the_ranks_and_scores_as_one_process(tmp_path: Path) -> None:
    """Rank 0 alone ran the monitor while the others waited in a collective; now each rank
    extracts its share of the batches of 256 (half of them, the last one padded)."""
    from accelerate import Accelerator

    from infomax.features.extract import knn_monitor

    port = free_port()
    spawn_ranks(_knn_monitor_worker, tmp_path, port, nprocs=WORLD)
    alone, _ = knn_monitor(_monitor_encoder(), _Labelled(BANK, 0), _Labelled(QUERIES, 1), Accelerator(cpu=True),
                           k=5, temperature=0.1, num_workers=0)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["top1"] for r in ranks] == [alone] * WORLD and alone > 0.5
    share = sum(math.ceil(math.ceil(n / 256) / WORLD) * 256 for n in (BANK, QUERIES))  # 3 + 1 batches of 256
    assert all(r["images"] <= share < BANK + QUERIES for r in ranks), ranks


def _critic_worker(rank: int, tmp: str, port: int) -> None:
    from accelerate import Accelerator

    from infomax.method.bounds import MINE
    from infomax.runtime.distributed import wrap_learned_critic

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    accelerator = Accelerator(cpu=True)

    class Critic(nn.Module):  # a learned critic's shape: a weight, a queue buffer and MINE's moving average
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))
            self.register_buffer("queue", torch.zeros(4))
            self.mine = MINE()

        def forward(self, S: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
            return self.mine(self.w * S, positives)

    critic = Critic()
    critic.queue.fill_(rank)  # a broadcast from rank 0 would overwrite rank 1's
    wrapped = wrap_learned_critic(critic, accelerator)
    S, positives = torch.load(f"{tmp}/scores.pt")
    rows = S.shape[0] // WORLD
    wrapped(S[rank * rows:(rank + 1) * rows], positives[rank * rows:(rank + 1) * rows]).backward()
    torch.save({"queue": critic.queue.clone(), "log_ema": critic.mine.log_ema.clone(), "grad": critic.w.grad.clone()},
               f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_learned_critic_is_not_sent_its_buffers_and_mine_follows_the_global_batch(tmp_path: Path) -> None:
    """DDP broadcast a learned critic's buffers from rank 0 before every forward (MoCo's queue: 32 MB
    a step, though every rank already holds the same keys). Now nothing is sent, and MINE's moving average
    follows the whole batch's E_q[e^S], so both ranks keep the one a single process would."""
    from infomax.method.bounds import MINE

    torch.manual_seed(0)
    S = torch.randn(8, 6)
    positives = torch.zeros(8, 6, dtype=torch.bool)
    positives[torch.arange(8), torch.arange(8) % 6] = True  # one positive, five negatives per row
    torch.save((S, positives), tmp_path / "scores.pt")
    port = free_port()
    spawn_ranks(_critic_worker, tmp_path, port, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [float(r["queue"][0]) for r in ranks] == list(range(WORLD))  # no rank was sent rank 0's buffer
    alone = MINE()
    alone(S, positives)
    assert all(torch.allclose(r["log_ema"], alone.log_ema) for r in ranks)
    assert torch.allclose(ranks[0]["grad"], ranks[1]["grad"])  # the gradient is still averaged


def _sharded_knn_worker(rank: int, tmp: str, port: int) -> None:
    from accelerate import Accelerator

    from infomax.features import knn
    from infomax.features.extract import extract_features

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    accelerator = Accelerator(cpu=True)
    encoder = _monitor_encoder()
    bank, bank_labels = extract_features(encoder, _Labelled(BANK, 0), accelerator, keep_shard=True)
    queries, _ = extract_features(encoder, _Labelled(QUERIES, 1), accelerator, shard=True)
    held, original = [], knn.similarities
    knn.similarities = lambda q, b: held.append(tuple(q.shape) + (b.shape[0],)) or original(q, b)
    preds = knn.sharded_knn_predict_many(bank, bank_labels, queries, [5, 20], 0.1, 10, chunk=64)
    torch.save({"preds": preds, "bank_rows": bank.shape[0], "blocks": held}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_eval_knn_keeps_the_bank_split_across_ranks_and_predicts_as_one_process(tmp_path: Path) -> None:
    """Every rank gathered all N x D train features (ImageNet: 10 GB a copy) and repeated one kNN.
    Now each rank keeps its share, scores the queries against it a chunk at a time and the ranks merge their
    top-k: the same predictions as one process, and no rank holds more than its shard and a chunk."""
    from accelerate import Accelerator

    from infomax.features.extract import extract_features
    from infomax.features.knn import knn_predict_many

    port = free_port()
    spawn_ranks(_sharded_knn_worker, tmp_path, port, nprocs=WORLD)
    accelerator = Accelerator(cpu=True)
    bank, labels = extract_features(_monitor_encoder(), _Labelled(BANK, 0), accelerator)
    queries, _ = extract_features(_monitor_encoder(), _Labelled(QUERIES, 1), accelerator)
    alone = knn_predict_many(bank, labels, queries, [5, 20], 0.1, 10, chunk=64)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, result in enumerate(ranks):
        assert all(torch.equal(result["preds"][k], alone[k]) for k in (5, 20))
        assert result["bank_rows"] == len(range(r, BANK, WORLD))  # its share, each image on one rank
        assert max(q for q, _, _ in result["blocks"]) == 64 and {n for _, _, n in result["blocks"]} == {result["bank_rows"]}


def _abort_once_worker(rank: int, tmp: str) -> None:
    """Rank 0 aborts on the first attempt (as gloo can in teardown on a loaded machine); then each rank copies
    the input the test wrote before spawning."""
    first = Path(tmp) / "attempts" / "first"
    if rank == 0 and not first.exists():
        first.touch()
        os.abort()
    (Path(tmp) / f"rank{rank}.txt").write_text((Path(tmp) / "input.txt").read_text())


def test_a_rank_killed_by_a_signal_is_retried_with_the_tests_inputs_kept(tmp_path: Path) -> None:
    """spawn_ranks retries once when a rank dies of a signal, clearing what the attempt wrote. It used to clear
    every file, the test's own inputs too, so the retry's ranks failed on a missing file (two CI runs lost
    test_a_learned_critic_is_not_sent_its_buffers_... that way)."""
    (tmp_path / "input.txt").write_text("scores")
    (tmp_path / "attempts").mkdir()
    spawn_ranks(_abort_once_worker, tmp_path, nprocs=WORLD)
    assert (tmp_path / "attempts" / "first").exists()  # the first attempt did abort
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)] == ["scores"] * WORLD


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not this one")


def _claim_worker(rank: int, tmp: str) -> None:
    from infomax.runtime.distributed import on_main_raised_everywhere
    from infomax.runtime.run_dir import RunDirError

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    seen, calls = [], []
    for failure in (None, RunDirError("runs/x is another run's dir; choose a new run.dir"), _Unpicklable("lock")):
        def work(failure=failure) -> None:
            calls.append(rank)
            if failure is not None:
                raise failure
        try:
            on_main_raised_everywhere(work, rank == 0)
            seen.append("ok")
        except Exception as e:  # noqa: BLE001
            seen.append(f"{type(e).__name__}: {e}")
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "calls": calls}))
    dist.barrier()
    dist.destroy_process_group()


def test_a_refusal_on_rank_0_stops_every_rank_not_rank_0_alone(tmp_path: Path) -> None:
    """The run dir is claimed by rank 0 alone: a refusal there (another run's dir, a lock held) raised on rank 0
    while the other ranks waited at the barrier until the process group's timeout."""
    spawn_ranks(_claim_worker, tmp_path, nprocs=WORLD)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert first["calls"] == [0, 0, 0] and second["calls"] == []  # the work runs on rank 0 only
    assert first["seen"][:2] == second["seen"][:2] == ["ok", "RunDirError: runs/x is another run's dir; choose a new run.dir"]
    assert first["seen"][2] == "_Unpicklable: lock" and second["seen"][2] == "RuntimeError: rank 0: _Unpicklable: lock"


def _stop_worker(rank: int, tmp: str) -> None:
    from infomax.runtime.distributed import agree_max
    from infomax.runtime.stop import StopFlag

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    for first, later in ((signal.SIGUSR2, signal.SIGINT), (signal.SIGTERM, None), (signal.SIGUSR2, signal.SIGTERM)):
        stop = StopFlag()
        if rank == 0:
            stop._handle(first, None)  # the preemption reaches rank 0 first; rank 1's signal comes later ...
        elif later is not None:
            stop._handle(later, None)  # ... or rank 1 has one of its own, the lesser cause
        stopped = stop.agreed(*agree_max("cpu", *stop.votes()))
        with (Path(tmp) / f"rank{rank}.json").open("a") as f:
            f.write(json.dumps([stopped, stop.signal_name]) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def test_a_preemption_on_one_rank_is_every_ranks_cause_so_every_rank_hands_the_job_to_the_requeue(
        tmp_path: Path) -> None:
    """A rank that learnt of the stop from the others used to read it as 'a signal on another rank': on rank 0 the job
    then ended instead of being requeued, and its own USR2, arriving later, was swallowed by the stop flag. SIGTERM,
    SLURM's preemption signal by default, is shared the same way (the job asks SLURM whether it was one)."""
    spawn_ranks(_stop_worker, tmp_path, nprocs=WORLD)
    seen = [[json.loads(line) for line in (tmp_path / f"rank{r}.json").read_text().splitlines()] for r in range(WORLD)]
    assert seen == [[[True, "SIGUSR2"], [True, "SIGTERM"], [True, "SIGUSR2"]]] * WORLD
