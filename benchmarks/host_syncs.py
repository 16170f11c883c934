"""Host syncs of one training step, counted as CUDA counts them, on a CPU-only machine.

Runs pretraining's step (views drawn per batch with every colour step, the model, MoCo's momentum keys and
queue, the objective, the step's agreement) on fake ``cuda`` tensors in a fake 2-rank NCCL group
(infomax/runtime/gpu_rehearsal.py), and counts each read back to the host and each blocking host-to-device copy. Then
the same for torch's SyncBatchNorm (model.sync_bn on GPUs), which we do not own. The backward pass cannot
run on fake ``cuda`` tensors on a CPU build, so it is not counted.

    .venv/bin/python benchmarks/host_syncs.py [--arch resnet50 --size 224 --batch 8]
"""

from __future__ import annotations

import argparse

import torch

from infomax.config.pretrain import ModelConfig, ObjectiveConfig, ViewConfig
from infomax.data.batch_views import BatchViews
from infomax.method.models import MultiViewModel
from infomax.method.momentum import MomentumKeys
from infomax.method.objectives import build_objective
from infomax.runtime.distributed import sync_batchnorm
from infomax.runtime.gpu_rehearsal import CUDA, fake_nccl, fake_nccl_accelerator
from infomax.train.engine import train_step


def step_syncs(arch: str, size: int, batch: int) -> tuple[int, int]:
    """(reads back, blocking copies) of the third step (the queue full of keys), SimCLR-style recipe."""
    recipe = ViewConfig(size=size, jitter_p=0.8, hue=0.1, grayscale_p=0.2, blur_p=0.5, solarize_p=0.2)
    with fake_nccl_accelerator() as (accelerator, rules):
        views_of = BatchViews([recipe, recipe], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), seed=0)
        with torch.device(CUDA):
            model = MultiViewModel(ModelConfig(arch=arch, small_input=size <= 64), 3, 2)
            objective = build_objective(ObjectiveConfig(queue_size=4 * batch), 2, 128)
        key_model, optimizer = MomentumKeys(model, 0.99), torch.optim.SGD(model.parameters(), lr=0.1)
        accelerator.backward = lambda loss: None  # no backward on fake cuda tensors
        images = torch.randint(0, 256, (batch, 3, size + size // 7, size + size // 7), dtype=torch.uint8)
        images = images.to(CUDA, non_blocking=True)
        for step in range(3):
            rules.reset()
            train_step(accelerator, model, objective, optimizer, views_of(images, 0, step), grad_clip=1.0,
                       skip_nonfinite=False, step=step, key_model=key_model)
        return sum(rules.host_reads.values()), len(rules.blocking_copies)


def sync_batchnorm_syncs(arch: str, size: int) -> tuple[int, int]:
    """(SyncBatchNorm layers, reads back in one forward pass)."""
    import timm

    with fake_nccl() as rules:
        with torch.device(CUDA):
            net = sync_batchnorm(timm.create_model(arch, num_classes=0), "cuda")
        rules.reset()
        net(torch.randn(2, 3, size, size, device="cuda"))
        return sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()), sum(rules.host_reads.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    reads, copies = step_syncs(args.arch, args.size, args.batch)
    print(f"training step ({args.arch}, {args.size} px, 2 views, queue, 2 fake NCCL ranks, no sync_bn): "
          f"{reads} read(s) back, {copies} blocking copies")
    layers, bn_reads = sync_batchnorm_syncs(args.arch, args.size)
    print(f"torch SyncBatchNorm ({args.arch}): {layers} layers, {bn_reads} reads back per forward pass "
          f"({bn_reads / max(layers, 1):g} a layer)")


if __name__ == "__main__":
    main()
