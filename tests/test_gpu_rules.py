"""The GPU's rules held on a CPU (infomax/runtime/gpu_rehearsal.py): collectives take device tensors only, as under NCCL
(``nccl`` tests), and a training step makes the host wait at most once, counted as CUDA counts it
(``fake_cuda`` tests).

Each scenario runs our code on fake ``cuda`` tensors in a fake 2-rank process group, where a collective on
a host tensor fails as NCCL fails. The numerics of the same code are tested on gloo (test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import contrastive
from infomax.runtime.distributed import HostTensorInCollective, agree_max, gather, gather_with_grad
from infomax.runtime.gpu_rehearsal import CUDA, HostTensorToNccl, fake_cuda, fake_nccl, fake_nccl_accelerator


class _Labelled(torch.utils.data.Dataset):
    """N grey 8x8 images (host tensors, as a loader yields them) and labels of 3 classes."""

    def __init__(self, n: int) -> None:
        self.x, self.y = torch.rand(n, 1, 8, 8), torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _encoder() -> nn.Module:
    with torch.device(CUDA):  # Module.to('cuda') cannot swap fake parameters in: build on the device
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_nccl_rehearsal_refuses_host_tensors_in_ours_and_a_librarys_collectives() -> None:
    """The rehearsal itself: our gathers refuse a host tensor in one line; a library's collective (here
    torch's own all_gather, as Accelerate calls it) is refused by the dispatch check; device tensors pass;
    reads back to the host and blocking copies are counted."""
    with fake_nccl() as rules:
        device = torch.ones(3, 2, device="cuda")
        assert gather(device).shape == (6, 2) and gather_with_grad(device).shape == (6, 2)
        assert agree_max(CUDA, 1.0, device.sum()) == [0.0, 0.0]  # fake values read as 0
        with pytest.raises(HostTensorInCollective, match=r"host tensor\(s\) of shape \[\(3, 2\)\]"):
            gather(torch.ones(3, 2))
        with pytest.raises(HostTensorToNccl, match="allgather"):
            dist.all_gather([torch.empty(2), torch.empty(2)], torch.ones(2))
        assert rules.collectives["allgather_"] == 2 and rules.collectives["allreduce_"] == 1
        assert rules.host_reads == {"to_host": 1}  # agree_max's one copy back of its two values
        rules.reset()
        torch.ones(4).to("cuda")
        torch.tensor([1.0, 2.0], device="cuda")
        torch.zeros(2, device="cuda").copy_(torch.ones(2))
        torch.ones(4).pin_memory().to("cuda", non_blocking=True) if torch.cuda.is_available() else \
            torch.ones(4).to("cuda", non_blocking=True)
        assert rules.blocking_copies == [(4,), (2,), (2,)]


def test_nccl_eval_knn_of_the_imagenet_protocol_keeps_its_bank_on_the_device() -> None:
    """The imagenet protocol keeps each rank's share of the train features as a kNN bank and merges the ranks'
    top-k. The bank was kept on the host (``.cpu()``), so the merge all-gathered host tensors: NCCL raised after
    the 100-epoch probe, before the report. Now the share stays on the device; the queries (the test split,
    on the host) are sent a chunk at a time."""
    from infomax.eval.rows import knn_top1
    from infomax.features.extract import extract_features
    from infomax.features.knn import sharded_knn_predict_many

    with fake_nccl_accelerator() as (accelerator, rules):
        encoder = _encoder()
        bank, labels = extract_features(encoder, _Labelled(50), accelerator, batch_size=16, keep_shard=True)
        assert bank.device == CUDA and labels.device == CUDA and bank.shape == (25, 4)
        queries, query_labels = torch.rand(30, 4), torch.arange(30) % 3  # the test split's features, on the host
        top1 = knn_top1((bank, labels), (queries, query_labels), [5, 20], 0.1, 3, bank_sharded=True)
        assert set(top1) == {"5", "20"} and rules.collectives["allgather_"] == 2  # scores and labels, one chunk
        with pytest.raises(HostTensorInCollective):  # where the bank used to be
            sharded_knn_predict_many(bank.cpu(), labels.cpu(), queries, [5], 0.1, 3)


def test_fake_cuda_eval_knn_on_one_gpu_scores_host_queries_against_the_device_bank() -> None:
    """The imagenet protocol on one GPU: the bank (kept as a "shard" of one) is on the device, the test split's
    features on the host; each query chunk goes to the bank's device (it was scored on the host against a
    device bank: a device mismatch after the probe)."""
    from infomax.eval.rows import knn_top1

    with fake_cuda():
        bank, labels = torch.rand(40, 4, device="cuda"), torch.zeros(40, dtype=torch.long, device="cuda")
        top1 = knn_top1((bank, labels), (torch.rand(30, 4), torch.arange(30) % 3), [5, 20], 0.1, 3, bank_sharded=True)
    assert set(top1) == {"5", "20"}


def test_fake_cuda_eval_knn_sends_each_query_chunk_pinned(monkeypatch) -> None:
    """A non-blocking copy from pageable host memory still makes the host wait on CUDA: each query chunk goes
    through pinned memory (on a CUDA build; here pinning is recorded, since a CPU build has none)."""
    from infomax.features.knn import knn_predict_many, sharded_knn_predict_many

    pinned: list[tuple[int, ...]] = []
    monkeypatch.setattr("infomax.runtime.device.can_pin", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(tuple(self.shape)) or self)
    with fake_nccl():
        bank, labels = torch.rand(40, 4, device="cuda"), torch.zeros(40, dtype=torch.long, device="cuda")
        knn_predict_many(bank, labels, torch.rand(30, 4), [5], 0.1, 3, chunk=16)
        sharded_knn_predict_many(bank, labels, torch.rand(30, 4), [5], 0.1, 3, chunk=16)
    assert pinned == [(16, 4), (14, 4)] * 2


def test_nccl_knn_monitor_gathers_device_rows_without_asking_sizes() -> None:
    """The kNN monitor's feature pass: every rank's batch rows are gathered on the device, padded to the
    loader's batch size (a short last batch), with no exchange of sizes and no host read per batch."""
    from infomax.features.extract import knn_monitor

    with fake_nccl_accelerator() as (accelerator, rules):
        top1, probe = knn_monitor(_encoder(), _Labelled(40), _Labelled(20), accelerator, k=5, temperature=0.1,
                                  num_workers=0)
        assert probe is None and top1 == 0  # a fake accuracy reads 0
        # bank 20 and queries 10 per rank, one batch each of the monitor's 256: rows, labels and positions
        assert rules.collectives == {"allgather_": 6}
        assert rules.host_reads == {"to_host": 6}  # each batch's gathered rows, labels and positions, once


@pytest.mark.parametrize("world, rank", [(2, 0), (4, 2)], ids=["one-machine", "two-machines-second-node"])
def test_nccl_pretraining_step_with_the_queue_gathers_and_agrees_on_the_device(world: int, rank: int) -> None:
    """A pretraining step with MoCo's momentum keys and queue, minus the backward pass (which a CPU build
    cannot run on fake ``cuda`` tensors): forward, the gathered keys, the step's one agreement, the queue's
    push and the EMA update make only device collectives and exactly one host read, the agreement's. Also
    as the first rank of the second of two 2-GPU machines (the two-machine run's collectives)."""
    from infomax.config.pretrain import ModelConfig
    from infomax.method.models import MultiViewModel
    from infomax.method.momentum import MomentumKeys

    with fake_nccl(world, rank) as rules:
        with torch.device(CUDA):
            model = MultiViewModel(ModelConfig(arch="resnet18", small_input=True, width=0.25, head_dims=[32, 16]), 1, 2)
            objective = contrastive(0.2, dim=16, queue_size=32)
        key_model = MomentumKeys(model, 0.99)
        views = [torch.rand(4, 1, 16, 16, device="cuda") for _ in range(2)]
        rules.reset()
        for step in range(2):  # the second scores against the filled queue
            z, keys = model(views), key_model(views, step)
            loss, diag = objective(z, keys)
            nonfinite, = agree_max(CUDA, ~torch.isfinite(loss.detach()))
            objective.after_step()
            key_model.update(model)
            assert nonfinite == 0 and diag["mi"].device == CUDA
        assert rules.collectives["allgather_"] > 0 and rules.collectives["allreduce_"] == 2
        assert rules.host_reads == {"to_host": 2}, rules.host_reads  # one a step


@pytest.mark.parametrize("lab", [False, True], ids=["rgb", "cmc-lab"])
def test_fake_cuda_training_step_makes_at_most_one_host_sync(lab: bool, monkeypatch) -> None:
    """One whole pretraining step (engine.train_step) on 2 fake-NCCL ranks: the views drawn per batch with
    every colour step (jitter in a random order, gamma, tone curve, grayscale, blur, solarize), CMC's Lab split,
    the model, MoCo's momentum keys and queue, the objective's diagnostics and the step's agreement. Every
    blocking host-to-device copy and every read back is counted: the agreement's one copy back is the only
    sync. The batch colour steps made ~80 blocking copies a step (each draw sent with ``.to(device)``,
    torchvision's Normalize sending its mean and std). A CPU build cannot run backward on fake ``cuda``
    tensors, so the step's backward is left out here (its gradients never leave the device)."""
    from infomax.config.pretrain import ModelConfig, ViewConfig
    from infomax.data.batch_views import BatchViews
    from infomax.data.colour import split_lab
    from infomax.method.models import MultiViewModel
    from infomax.method.momentum import MomentumKeys
    from infomax.train.engine import train_step

    recipe = ViewConfig(size=16, jitter_p=0.8, hue=0.1, gamma=0.2, tone=0.3, grayscale_p=0.3, blur_p=0.5,
                        solarize_p=0.3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    with fake_nccl_accelerator() as (accelerator, rules):
        views_of = BatchViews([recipe] if lab else [recipe, recipe], mean, std, seed=0)  # Lab: L and ab of one
        with torch.device(CUDA):
            cfg = ModelConfig(arch="resnet18", small_input=True, width=0.25, head_dims=[32, 16], encoder_per_view=lab)
            model = MultiViewModel(cfg, [1, 2] if lab else 3, 2)
            objective = contrastive(0.2, dim=16, queue_size=32)
        key_model = MomentumKeys(model, 0.99)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monkeypatch.setattr(accelerator, "backward", lambda loss: None)  # see the docstring
        images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8).to(CUDA, non_blocking=True)  # pinned
        for step in range(3):  # from the second step on, the queue holds keys
            rules.reset()
            views = views_of(images, epoch=0, batch=step)
            views = split_lab(views, mean, std) if lab else views
            result = train_step(accelerator, model, objective, optimizer, views, grad_clip=1.0,
                                skip_nonfinite=False, step=step, key_model=key_model)
            assert rules.blocking_copies == [], (step, rules.blocking_copies)
            assert rules.host_reads == {"to_host": 1}, (step, rules.host_reads)
            assert result.loss.device == CUDA and rules.collectives["allreduce_"] == 1


def test_fake_cuda_torchs_sync_batchnorm_reads_back_three_times_a_layer() -> None:
    """Outside our bound, and measured so a reader knows it: torch's SyncBatchNorm (model.sync_bn on GPUs)
    drops the statistics of ranks with empty inputs by three boolean masks in every forward, each a read back
    to the host (a known torch behaviour, github.com/pytorch/pytorch/issues/78549; skipped only under CUDA-graph capture). ResNet-18: 20 layers, 60 syncs
    a forward pass; benchmarks/results/host_syncs.md has ResNet-50's. If torch removes them, this fails."""
    import timm

    from infomax.runtime.distributed import sync_batchnorm

    with fake_nccl() as rules:
        with torch.device(CUDA):
            net = sync_batchnorm(timm.create_model("resnet18", num_classes=0), "cuda")
        layers = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
        rules.reset()
        net(torch.randn(4, 3, 32, 32, device="cuda"))
    assert layers == 20 and rules.host_reads == {"boolean_index": 3 * layers} and rules.blocking_copies == []
    assert rules.collectives == {"_allgather_base_": layers}


def test_nccl_checkpoint_agreement_on_resume_sends_host_data_only_as_objects(tmp_path) -> None:
    """Resume's agreement (rank 0 chooses the checkpoint, every rank reports the step it read) and the save's
    RNG states cross ranks as pickled objects (``broadcast_object_list``, ``gather_object``), which torch
    sends on the device under NCCL: no host tensor reaches a collective."""
    from infomax.train.resumable import Resumable

    with fake_nccl_accelerator() as (accelerator, rules):
        resumable = Resumable(accelerator, tmp_path, keep=2)
        assert resumable.resume("start afresh") is None
        resumable.progress.global_step = 5
        resumable.save({"note": "host data"})
        state, path = resumable.resume("start afresh")
        assert state["note"] == "host data" and path.name == "step_00000005"
    assert rules.collectives["broadcast_object_list"] == 2 and rules.collectives["all_gather_object"] == 2


def test_nccl_cmc_export_is_scored_on_the_device_with_its_views_concatenated(tmp_path) -> None:
    """A CMC export (an L encoder, its ab encoder beside it) as the imagenet protocol scores it: both encoders
    loaded from the export onto the device, each reading its own Lab channels of the loaded RGB batches, the
    concatenated features kept as this rank's kNN bank on the device and scored across ranks there; the
    batches reach the device without making the host wait."""
    from infomax.eval.rows import all_views, knn_top1
    from infomax.export.encoder import export_encoder, load_encoder, load_view_encoders
    from infomax.features.extract import extract_features
    from infomax.method.models import create_encoder

    encoders = [(create_encoder("resnet18", chans, True, 1, {"channels": (8, 8, 8, 8)}), chans, transform)
                for chans, transform in ((1, "lab_L"), (2, "lab_ab"))]
    export_encoder(encoders[0][0], tmp_path, arch="resnet18", in_chans=1, input_size=16, mean=[0.5] * 3,
                   std=[0.25] * 3, small_input=True, timm_kwargs={"channels": (8, 8, 8, 8)}, summary={},
                   input_transform="lab_L", view_encoders=encoders[1:])
    images = _Labelled(40)
    images.x = torch.rand(40, 3, 16, 16)  # RGB: the eval splits each batch into L and ab itself
    with fake_nccl_accelerator() as (accelerator, rules):
        encoder, meta = load_encoder(tmp_path)
        model, _ = all_views(encoder, meta, load_view_encoders(tmp_path, meta))
        model = model.to(accelerator.device).eval()
        rules.reset()
        bank, labels = extract_features(model, images, accelerator, batch_size=8, keep_shard=True)
        assert bank.device == CUDA and bank.shape == (20, 16)  # 8 L features + 8 ab features
        top1 = knn_top1((bank, labels), (torch.rand(30, 16), torch.arange(30) % 3), [5], 0.1, 3, bank_sharded=True)
    assert set(top1) == {"5"} and rules.collectives["allgather_"] == 2 and rules.blocking_copies == []


def test_nccl_imagenet_protocol_row_runs_with_its_fit_outcome_given(tmp_path, monkeypatch) -> None:
    """A whole ``imagenet`` row of the eval (``Rows.encoder_row``) under NCCL's rule: the train split's features
    kept as each rank's device shard, the probe's fit, the test split's logits and top-1/top-5, the sharded kNN.
    With the bank kept on the host, as before, it fails where NCCL failed after the 100-epoch probe.

    Two parts are given, not run: the fit's backward pass cannot run on fake ``cuda`` tensors (see
    infomax/runtime/gpu_rehearsal.py), so the fit returns its outcome untrained (its collectives are DDP's, checked
    on gloo by test_eval.py's two-process case); and the check that the row never trained the encoder hashes the
    weights on the host, on purpose, twice a row, where fake tensors hold no bytes."""
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config
    from infomax.data.datasets import open_dataset
    from infomax.eval import rows as rows_module
    from infomax.eval.classifier import FitOutcome
    from infomax.method.models import create_encoder
    from infomax.runtime.checkpoint import Progress

    fits = []

    def fit_outcome(accelerator, model, trainable, train_set, schedule, directory, **kwargs) -> FitOutcome:
        with torch.device(CUDA):  # the fit's prepare() puts the head on the device, as a fake one cannot be moved
            placed = nn.Linear(trainable.in_features, trainable.out_features)
        trainable.weight, trainable.bias = placed.weight, placed.bias
        fits.append(len(train_set))
        return FitOutcome(Progress(epoch=schedule.epochs), [], 0.0, False)

    monkeypatch.setattr(rows_module, "fit_classifier", fit_outcome)
    monkeypatch.setattr(rows_module, "fingerprint", lambda encoder: "unchanged")
    monkeypatch.setattr(rows_module, "assert_unchanged", lambda encoder, expected, name: None)
    synthetic = {"synthetic_size": 48, "synthetic_image_size": 16}
    cfg = load_config(None, ["weights=[x]", "protocol=imagenet", "dataset=synthetic", "num_workers=0", "knn_k=[5]",
                             "channels_last=false",  # Module.to cannot re-lay fake parameters
                             "batch_size_per_process=8", *(f"{k}={v}" for k, v in synthetic.items())],
                      schema=EvalConfig, check=validate_eval)
    meta = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3, "sha256": "0" * 64}
    with fake_nccl_accelerator() as (accelerator, rules):
        train, test = (open_dataset("synthetic", split, **synthetic) for split in ("train", "test"))
        with torch.device(CUDA):
            encoder = create_encoder("test_resnet", 3, small_input=True)
        encoder.to = lambda *args, **kwargs: encoder  # already there; Module.to cannot swap fake parameters
        row = rows_module.Rows(cfg, accelerator, train, test, 16, tmp_path, "key").encoder_row(
            "ours", "ours", encoder, meta, sha=None)
    assert fits == [len(train)] and row["protocol"] == "imagenet" and set(row["knn"]) == {"5"}
    assert rules.collectives["allgather_"] > 0
