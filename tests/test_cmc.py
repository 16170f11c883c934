"""CMC: core and full view graphs, and the Lab split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, contrastive, pretrain_in_process
from infomax.data.colour import LAB_MEAN, LAB_STD, lab_to_rgb, rgb_to_lab, split_lab
from infomax.method.objectives import view_pairs


def naive_loss(z: list[torch.Tensor], pairs: list[tuple[int, int]], t: float) -> torch.Tensor:
    """Per-pair loop, written out: mean over pairs of cross-entropy(view-a queries vs view-c keys)."""
    losses = []
    for a, c in pairs:
        logits = F.normalize(z[a], dim=1) @ F.normalize(z[c], dim=1).T / t
        losses.append(F.cross_entropy(logits, torch.arange(len(logits))))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("graph, expected_pairs", [
    ("core", [(0, 1), (1, 0), (0, 2), (2, 0)]),
    ("full", [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]),
])
def test_three_view_loss_equals_the_naive_per_pair_loop(graph: str, expected_pairs) -> None:
    assert view_pairs(3, graph) == expected_pairs
    z = [torch.randn(8, 5, dtype=torch.float64) for _ in range(3)]
    loss, diag = contrastive(0.2, "infonce", num_views=3, graph=graph)(z)
    assert torch.allclose(loss, naive_loss(z, expected_pairs, 0.2))
    assert {f"mi_{a}_{c}" for a, c in expected_pairs} <= set(diag)  # per-pair diagnostics


def test_lab_split_gives_one_and_two_channels_and_inverts_to_rgb() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rgb = torch.rand(4, 3, 8, 8)
    normalised = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    L, ab = split_lab([normalised], mean, std)
    assert L.shape == (4, 1, 8, 8) and ab.shape == (4, 2, 8, 8)
    assert L.min() >= -1 and L.max() <= 1 and ab.abs().max() <= 1
    lab = torch.cat([L, ab], dim=1) * torch.tensor(LAB_STD).view(1, 3, 1, 1) + torch.tensor(LAB_MEAN).view(1, 3, 1, 1)
    assert (lab_to_rgb(lab) - rgb).abs().max() < 1e-4
    white = rgb_to_lab(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(white, torch.tensor([100.0, 0.0, 0.0]), atol=1e-3)


def test_lab_views_use_cmc_normalisation() -> None:
    # Pure red is Lab (53.24, 80.09, 67.20); CMC normalises with mean (50, 6.025, -6.6895) and
    # std (50, 92.2075, 101.1675), not ab / 110.
    L, ab = split_lab([torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    expected = torch.tensor([(53.24 - 50) / 50, (80.09 - 6.025) / 92.2075, (67.20 + 6.6895) / 101.1675])
    assert torch.allclose(torch.cat([L, ab], dim=1).flatten(), expected, atol=1e-3)


@pytest.mark.slow
def test_cmc_lab_config_pretrains_one_encoder_per_channel_group(run_dir: Path, capsys) -> None:
    out = pretrain_in_process(capsys, f"run.dir={run_dir}", "run.max_steps=4",
                              config=REPO / "configs" / "cmc_lab_synthetic.yaml").stdout
    assert "finished: step 4/4" in out
    meta = json.loads((run_dir / "export" / "config.json").read_text())
    assert meta["in_chans"] == 1 and meta["input_transform"] == "lab_L"
    # CMC's linear evaluation: the ab encoder is exported beside the L encoder, and timm loads both
    (ab,) = meta["view_encoders"]
    assert ab["in_chans"] == 2 and ab["input_transform"] == "lab_ab" and ab["file"] == "encoder_view1.safetensors"
    import timm

    from infomax.export.encoder import load_encoder, load_view_encoders

    L, _ = load_encoder(run_dir / "export")
    ((_, ab_encoder),) = load_view_encoders(run_dir / "export", meta)
    timm_ab = timm.create_model(meta["architecture"], pretrained=True, num_classes=0, in_chans=2,
                                pretrained_cfg_overlay=dict(file=str(run_dir / "export" / ab["file"])))
    assert all(torch.equal(a, b) for a, b in zip(timm_ab.state_dict().values(), ab_encoder.state_dict().values()))
    first = lambda m: next(iter(m.state_dict().values()))  # noqa: E731 - the stem's first conv weight
    assert first(L).shape[1] == 1 and first(ab_encoder).shape[1] == 2  # the L and the ab encoder
    # The eval stage scores the concatenation (CMC's protocol) and the L encoder alone, each with its feature_dim
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "main.py"), f"weights={run_dir / 'export'}",
                           "dataset=synthetic", "synthetic_size=96", "synthetic_image_size=16", "num_workers=0",
                           "probe_steps=10", "knn_k=[5]", "raw_pixels=false", "baselines.alexnet_supervised=false",
                           "baselines.supervised_encoder=false", f"out={run_dir / 'eval'}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((run_dir / "eval" / "report.json").read_text())["rows"]
    f = meta["num_features"]
    assert [(r["name"].split(" (")[1], r["kind"], r["feature_dim"]) for r in rows] == [
        ("L + ab concatenated)", "ours", f + ab["num_features"]), ("L only)", "ours", f),
        ("concatenated)", "random_init", f + ab["num_features"])]
