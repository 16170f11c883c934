"""The eval stage (fast protocol): probe honesty, the encoder-unchanged check, reports, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from eval.features import EncoderChanged, assert_unchanged, fingerprint
from eval.probe import linear_probe
from pretrain.export import export_encoder
from pretrain.models import create_encoder


def planted(n: int, classes: int = 10, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, dim, generator=g)
    return x, (x @ w).argmax(1)


def test_probe_finds_planted_linear_structure_and_is_at_chance_on_shuffled_labels() -> None:
    (x, y), (xt, yt) = planted(4000), planted(1000, seed=1)
    assert linear_probe(x, y, xt, yt).top1 > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    majority = torch.bincount(yt).max().item() / len(yt)  # chance: always guessing the commonest class
    assert linear_probe(x, shuffled, xt, yt).top1 < majority + 0.03


def test_encoder_changed_check_fails_when_a_weight_moves() -> None:
    encoder = create_encoder("test_resnet", 3, small_input=True)
    before = fingerprint(encoder)
    assert_unchanged(encoder, before, "x")
    with torch.no_grad():
        next(encoder.parameters())[0].flatten()[0] += 1e-6
    with pytest.raises(EncoderChanged, match="changed during evaluation"):
        assert_unchanged(encoder, before, "x")


def run_eval(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "eval" / "main.py"), "dataset=synthetic", "synthetic_size=96",
           "synthetic_image_size=16", "num_workers=0", "probe_steps=20", "knn_k=[5]", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    encoder = create_encoder("test_resnet", 3, small_input=True)
    export_encoder(encoder, tmp_path / "run" / "export", arch="test_resnet", in_chans=3, input_size=16,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), small_input=True, summary={})
    return tmp_path / "run" / "export"


@pytest.mark.slow
def test_eval_writes_report_with_every_requested_row(export_dir: Path, tmp_path: Path) -> None:
    proc = run_eval(f"weights={export_dir}", f"out={tmp_path / 'report'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["kind"] for r in report["rows"]] == ["ours", "random_init", "raw_pixels"]
    for row in report["rows"]:
        assert 0 <= row["top1"] <= row["top5"] <= 1 and set(row["knn"]) == {"5"}
    assert report["rows"][0]["weights_sha256"] and report["protocol"] == "fast-v1"
    assert "| run | ours | fast |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| encoder | kind |" in proc.stdout  # the terminal ends with the table


@pytest.mark.slow
@pytest.mark.parametrize("damage, needle", [
    ("missing", "no export found"),
    ("hash", "does not match the sha256"),
    ("arch", "do not match the architecture"),
    ("channels", "expects 1-channel images"),
])
def test_bad_exports_fail_with_one_line(export_dir: Path, damage: str, needle: str) -> None:
    meta_path = export_dir / "config.json"
    meta = json.loads(meta_path.read_text())
    if damage == "missing":
        export_dir = export_dir.parent / "nope"
    elif damage == "hash":
        meta["sha256"] = "0" * 64
    elif damage == "arch":
        meta["architecture"] = "resnet18"
    if damage != "channels":
        meta_path.write_text(json.dumps(meta))
    else:  # a valid grayscale export, evaluated on RGB data
        export_encoder(create_encoder("test_resnet", 1, small_input=True), export_dir, arch="test_resnet", in_chans=1,
                       input_size=16, mean=(0.5,), std=(0.25,), small_input=True, summary={})
    proc = run_eval(f"weights={export_dir}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
