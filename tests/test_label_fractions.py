"""Label-fraction scores: the probe and kNN fitted on 1 % / 10 % of the training labels, each class in proportion,
drawn by the eval's seed, scored on the whole scored split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infomax.config.eval import EvalConfig, validate_eval
from infomax.config.pretrain import ConfigError, load_config
from infomax.eval.label_fractions import fraction_indices, label_fraction_scores
from infomax.eval.probe import ProbeResult
from infomax.export.encoder import export_encoder
from infomax.method.models import create_encoder

FAST = ["dataset=synthetic", "synthetic_size=96", "synthetic_image_size=16", "num_workers=0", "probe_steps=20",
        "knn_k=[5]", "baselines.alexnet_supervised=false", "baselines.supervised_encoder=false",
        "precision=no"]  # in-process: an earlier test's Accelerator may have fixed this process's precision


def test_a_label_fraction_holds_each_class_in_proportion_drawn_by_the_seed() -> None:
    labels = torch.cat([torch.arange(400) % 4, torch.full((40,), 4)])  # periodic labels and a small class
    idx = fraction_indices(labels, 0.1, seed=0)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)
    assert torch.bincount(labels[idx]).tolist() == [10, 10, 10, 10, 4]
    assert torch.equal(idx, fraction_indices(labels, 0.1, seed=0))  # every row of a report: the same images
    assert not torch.equal(idx, fraction_indices(labels, 0.1, seed=1))
    assert not torch.equal(idx[labels[idx] == 0], torch.arange(0, 40, 4))  # drawn, not the first of each class
    assert torch.bincount(labels[fraction_indices(labels, 0.001, seed=0)]).tolist() == [1] * 5  # one at least


def test_label_fraction_scores_fit_on_the_subset_and_score_the_whole_split() -> None:
    train = (torch.randn(200, 3), torch.arange(200) % 5)
    test = (torch.randn(30, 3), torch.arange(30) % 5)
    fitted = []

    def probe(fit, scored) -> ProbeResult:
        fitted.append((len(fit[1]), len(scored[1]), torch.bincount(fit[1]).tolist()))
        return ProbeResult(top1=0.5, top5=0.9, weight_decay=0.0, val_top1={})

    scores = label_fraction_scores(train, test, [0.01, 0.1], 0, probe, lambda fit, scored: {"5": len(fit[1]) / 100})
    assert fitted == [(5, 30, [1] * 5), (20, 30, [4] * 5)]
    assert scores == {"1%": {"images": 5, "top1": 0.5, "top5": 0.9, "knn": {"5": 0.05}},
                      "10%": {"images": 20, "top1": 0.5, "top5": 0.9, "knn": {"5": 0.2}}}


def test_the_report_gives_each_self_supervised_row_its_label_fraction_columns(tmp_path: Path) -> None:
    from infomax.eval.main import evaluate

    torch.manual_seed(0)
    export_encoder(create_encoder("test_resnet", 3, small_input=True), tmp_path / "run" / "export",
                   arch="test_resnet", in_chans=3, input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, small_input=True,
                   summary={"steps": 1})
    cfg = load_config(None, [*FAST, f"weights=[{tmp_path / 'run' / 'export'}]", f"out={tmp_path / 'r'}",
                             "label_fractions=[0.25,0.5]"], schema=EvalConfig, check=validate_eval)
    rows = evaluate(cfg)
    assert [r["kind"] for r in rows] == ["ours", "random_init", "raw_pixels"]
    train_images = 96  # synthetic_size: the train split
    for row in rows:
        assert [(f, s["images"]) for f, s in row["label_fractions"].items()] == [
            ("25%", train_images // 4), ("50%", train_images // 2)]
        assert all(0 <= s["top1"] <= s["top5"] <= 1 and set(s["knn"]) == {"5"} for s in row["label_fractions"].values())
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| Δ vs supervised, same arch | Δ vs AlexNet | 25% labels: top-1 / kNN k=5 | 50% labels: top-1 / kNN k=5 |" in md
    assert "Label fractions (25%, 50%): the probe and kNN fitted on that share" in md
    raw = rows[2]["label_fractions"]["25%"]
    assert f"| {100 * raw['top1']:.2f} / {100 * raw['knn']['5']:.2f} |" in md.split("| raw pixels |")[1].splitlines()[0]


def test_label_fractions_need_the_fast_protocol() -> None:
    with pytest.raises(ConfigError, match="label fractions are scored by the fast protocol"):
        load_config(None, [*FAST, "weights=[x]", "protocol=imagenet", "label_fractions=[0.1]"], schema=EvalConfig,
                    check=validate_eval)
    with pytest.raises(ConfigError, match="label_fractions"):
        load_config(None, [*FAST, "weights=[x]", "label_fractions=[1.5]"], schema=EvalConfig, check=validate_eval)


def test_the_supervised_reference_of_a_fraction_is_trained_on_that_fraction_alone(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """The same architecture trained with labels sees only the fraction's images (as many steps as the full-label
    fit), and its probe and kNN are fitted on the same fraction: a fit on every label would not be a 50% row."""
    import infomax.eval.rows
    from infomax.eval.main import evaluate

    fits = []
    real_fit = infomax.eval.rows.fit_classifier

    def recording_fit(accelerator, model, trainable, train_set, schedule, *args, **kwargs):
        fits.append((kwargs["desc"], len(train_set), schedule.max_steps))
        return real_fit(accelerator, model, trainable, train_set, schedule, *args, **kwargs)

    monkeypatch.setattr(infomax.eval.rows, "fit_classifier", recording_fit)
    torch.manual_seed(0)
    export_encoder(create_encoder("test_resnet", 3, small_input=True), tmp_path / "run" / "export",
                   arch="test_resnet", in_chans=3, input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, small_input=True,
                   summary={"steps": 1})

    def evaluate_with(*overrides: str) -> list[dict]:
        return evaluate(load_config(None, [
            *FAST, f"weights=[{tmp_path / 'run' / 'export'}]", f"out={tmp_path / 'r'}", "label_fractions=[0.1,0.5]",
            "random_init=false", "raw_pixels=false", "baselines.supervised_encoder=true",
            "baselines.supervised_encoder_epochs=1", "baselines.supervised_encoder_global_batch_size=16",
            f"baselines.store={tmp_path / 'store'}", *overrides], schema=EvalConfig, check=validate_eval))

    ours, supervised = evaluate_with("store_baselines=true")
    # every label, then each fraction alone: 1 of each of the 8 classes' 12 images (a batch of 8), then half
    assert [(size, steps) for _, size, steps in fits] == [(96, 6), (8, 6), (48, 6)]
    assert fits[2][0].startswith("supervised_50pct_test_resnet")
    assert supervised["label_fractions"]["50%"]["images"] == ours["label_fractions"]["50%"]["images"] == 48
    assert 0 <= supervised["label_fractions"]["50%"]["top1"] <= 1 and supervised["label_fractions"]["10%"]["seed"] == 0
    # the fair reference, beside AlexNet's: the same architecture trained with labels
    assert ours["delta_vs_supervised"] == pytest.approx(ours["top1"] - supervised["top1"])
    assert supervised["delta_vs_supervised"] is None
    assert f"| {100 * ours['delta_vs_supervised']:+.2f} | – |" in (tmp_path / "r" / "report.md").read_text()
    # the stored row's fractions are shown under the seed that drew their images, not another's
    fits.clear()
    assert evaluate_with()[1]["label_fractions"] == supervised["label_fractions"] and fits == []
    assert evaluate_with("seed=1")[1]["label_fractions"] == {}
