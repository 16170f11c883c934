"""The online linear probe learns from labels without ever changing what the encoder learns."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator

from conftest import contrastive
from infomax.config.pretrain import ModelConfig
from infomax.method.models import MultiViewModel
from infomax.method.online_probe import OnlineProbe, probe_accuracy, probe_step
from infomax.train.engine import train_step


def test_encoder_update_is_identical_with_and_without_the_probe() -> None:
    torch.manual_seed(0)
    model = MultiViewModel(ModelConfig(arch="test_resnet", small_input=False, head_dims=[16, 8]), 1, 2)
    twin = copy.deepcopy(model)
    views = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    labels = torch.randint(0, 3, (8,))
    probe = OnlineProbe(model.feature_dim, 3)
    probe_before = copy.deepcopy(probe.state_dict())
    results = []
    for m, with_probe in ((model, True), (twin, False)):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        probe_arg = (probe, torch.optim.SGD(probe.parameters(), lr=0.5), labels) if with_probe else None
        for step in range(2):  # a gradient leaked by step 0's probe would show in step 1's update
            result = train_step(Accelerator(cpu=True), m, contrastive(0.2, dim=8), optimizer, views,
                                grad_clip=0.0, skip_nonfinite=False, step=step, probe=probe_arg)
        results.append(result)
    assert results[0].probe_loss is not None and results[1].probe_loss is None
    assert torch.equal(results[0].loss, results[1].loss)
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), copy.deepcopy(twin).parameters())]
    assert not any(moved), "labels reached the encoder through the probe"
    assert any(not torch.equal(a, probe.state_dict()[k]) for k, a in probe_before.items()), "the probe did not train"


def test_probe_learns_planted_classes_far_above_chance() -> None:
    g = torch.Generator().manual_seed(0)
    classes, dim = 8, 32
    centres = torch.randn(classes, dim, generator=g) * 3

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        return centres[y] + torch.randn(n, dim, generator=g), y

    probe = OnlineProbe(dim, classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2)
    for _ in range(100):
        probe_step(probe, optimizer, *sample(64))
    assert probe_accuracy(probe, *sample(500)) > 0.9  # chance is 1/8
    shuffled_x, shuffled_y = sample(500)
    assert probe_accuracy(probe, shuffled_x, shuffled_y[torch.randperm(500, generator=g)]) < 0.3
