"""Checks that need a CUDA device; run by benchmarks/gpu_check.sh (deselected by `make test`)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from conftest import contrastive
from infomax.config.pretrain import ModelConfig
from infomax.method.models import MultiViewModel
from infomax.train.engine import train_step

pytestmark = pytest.mark.gpu


def test_bf16_channels_last_step_on_cuda_keeps_fp32_logits_and_learns() -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    accelerator = Accelerator(mixed_precision="bf16")
    model = MultiViewModel(ModelConfig(arch="resnet18", small_input=True, channels_last=True), 3, 2)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = contrastive(0.1)
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32, device="cuda")
    views = [x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x)]
    losses = []
    for step in range(30):
        r = train_step(accelerator, model, objective, optimizer, views, grad_clip=1.0, skip_nonfinite=False,
                       step=step, channels_last=True)
        assert r.loss.dtype == torch.float32
        losses.append(r.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_deterministic_run_on_cuda_stops_in_one_line(tmp_path) -> None:
    """On CUDA AdaptiveAvgPool2d's backward has no deterministic kernel: refused before the run dir is claimed."""
    from conftest import run_main

    proc = run_main(f"run.dir={tmp_path / 'run'}", "run.deterministic=true", "monitor.knn_every=0", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "supported on CPU only" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
