"""Baselines a reviewer accepts: AlexNet's budget and what ended its fit, stored results, and the
supervised same-encoder row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_eval import eval_report, eval_run, export_dir  # noqa: F401 (fixture)

from conftest import synthetic_views
from infomax.config.eval import EvalConfig, validate_eval
from infomax.config.pretrain import load_config
from infomax.data.datasets import FMNIST_DEFAULT_ROOT, open_dataset
from infomax.eval.classifier import FitOutcome, SGDSchedule, fit_classifier
from infomax.eval.rows import pretrain_epochs
from infomax.eval.stored_baselines import alexnet_protocol, data_fingerprint, find_stored, store_dir
from infomax.runtime.checkpoint import Progress

REPO = Path(__file__).resolve().parents[1]
ALEXNET = ["baselines.alexnet_supervised=true", "baselines.alexnet_global_batch_size=16", "random_init=false",
           "raw_pixels=false"]


def test_only_early_stopping_is_converged_and_the_label_says_what_stopped_it() -> None:
    """A fit that ran to its epoch cap was called "converged" on a flat last stretch of its curve; but our
    schedules decay the lr by their cap, which flattens any curve. Only the patience rule says converged now."""
    from infomax.eval.classifier import fit_label

    p = Progress()
    rising = FitOutcome(p, [(1, 0.5), (2, 0.6), (3, 0.7)], 1.0, False)
    flat = FitOutcome(p, [(1, 0.5), (2, 0.911), (3, 0.913), (4, 0.912)], 1.0, False)
    early = FitOutcome(p, [(1, 0.5), (2, 0.9)], 1.0, True)
    assert (rising.converged, flat.converged, early.converged) == (False, False, True)
    assert (flat.stopped, early.stopped, FitOutcome(p, [], 1.0, False, "step_cap").stopped) == (
        "epoch_cap", "early_stopping", "step_cap")
    assert (fit_label(flat.stopped), fit_label("step_cap"), fit_label(early.stopped)) == (
        ", at its epoch cap", ", at its step cap", ", early-stopped")


def test_patience_stops_the_fit_when_held_out_accuracy_stalls(tmp_path: Path) -> None:
    data = synthetic_views(64, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    schedule = SGDSchedule(lr=0.1, epochs=10, global_batch_size=16, eval_every=1, patience=2)
    outcome = fit_classifier(Accelerator(cpu=True), model, model, data, schedule, tmp_path, desc="t",
                             held_out=lambda m: next(scores))
    assert outcome.early_stopped and outcome.converged
    assert [s for s, _ in outcome.held_out] == [1, 2, 3, 4] and outcome.progress.global_step == 4


def test_a_finished_wall_time_budget_fit_takes_no_more_steps_when_rerun(tmp_path: Path) -> None:
    """The supervised-encoder row's fit ends on its clock; rerunning it (a second make demo) resumes the
    finished checkpoint and trains nothing more."""
    data = synthetic_views(64, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    schedule = SGDSchedule(lr=0.1, epochs=1000, global_batch_size=16, max_seconds=0.3)
    first = fit_classifier(Accelerator(cpu=True), model, model, data, schedule, tmp_path, desc="t")
    weights = model[1].weight.detach().clone()
    again = fit_classifier(Accelerator(cpu=True), model, model, data, schedule, tmp_path, desc="t")
    assert 0 < first.progress.global_step == again.progress.global_step < 1000 * 4
    assert torch.equal(model[1].weight, weights)


def test_a_wall_time_budget_fit_reports_the_steps_its_clock_allows(tmp_path: Path, monkeypatch, capsys) -> None:
    """Off a terminal the progress line's total (and so its ETA) follows the clock, not the epoch cap."""
    monkeypatch.setenv("INFOMAX_PROGRESS_SECONDS", "0")
    data = synthetic_views(64, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    schedule = SGDSchedule(lr=0.1, epochs=10**6, global_batch_size=16, max_seconds=2.0)
    outcome = fit_classifier(Accelerator(cpu=True), model, model, data, schedule, tmp_path, desc="t")
    steps = outcome.progress.global_step
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("t: step")][-1]
    total = int(last.split("/")[1].split()[0])
    assert steps >= 4 and steps / 2 <= total <= 2 * steps and total < schedule.total_steps(4), last


def test_warmup_and_adamw_for_a_short_budget(tmp_path: Path) -> None:
    schedule = SGDSchedule(lr=1.0, epochs=1, global_batch_size=16, warmup_steps=4, optimizer="adamw")
    assert [round(schedule.factor(s, 100), 3) for s in (0, 1, 3)] == [0.25, 0.5, round(0.5 * (1 + math.cos(0.03 * math.pi)), 3)]
    data = synthetic_views(32, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    before = model[1].weight.detach().clone()
    schedule = SGDSchedule(lr=1e-3, epochs=1, global_batch_size=16, max_steps=1, optimizer="adamw")
    outcome = fit_classifier(Accelerator(cpu=True), model, model, data, schedule, tmp_path, desc="t")
    state = torch.load(next(tmp_path.glob("step_*")) / "state.pt", weights_only=True)
    assert outcome.progress.global_step == 1 and "exp_avg_sq" in state["optimizer"]["state"][0]  # AdamW's moments
    # AdamW's first step moves every weight by about lr (sign of the gradient), whatever its scale
    assert (model[1].weight.detach() - before).abs().max().item() == pytest.approx(1e-3, rel=0.05)


@pytest.mark.slow
def test_stored_alexnet_is_used_and_mismatched_or_damaged_ones_are_not(export_dir: Path, tmp_path: Path,  # noqa: F811
                                                                       capsys) -> None:
    store = tmp_path / "store"
    eval_report(capsys, tmp_path / "b", "store_baselines=true", "weights=[]", "image_size=16", f"baselines.store={store}",
                *ALEXNET, "baselines.alexnet_epochs=3", "baselines.alexnet_patience=1")
    path = store / "synthetic-alexnet_supervised.json"
    stored = json.loads(path.read_text())
    for key in ("top1", "top5", "epochs", "steps", "wall_s", "stopped", "converged", "config", "git_revision", "data_sha256", "date"):
        assert key in stored

    def alexnet_row(*extra: str) -> tuple[dict, str]:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        report, _, err = eval_run(capsys, out, f"weights={export_dir}", f"baselines.store={store}", *ALEXNET,
                                  "baselines.alexnet_max_steps=2", *extra)
        return next(r for r in report["rows"] if r["kind"] == "alexnet_supervised"), err

    used, _ = alexnet_row()
    assert used["stored"] == str(path) and used["top1"] == stored["top1"] and "stored" in used["name"]
    assert used["epochs"] == stored["epochs"] and used["converged"] == stored["converged"]
    assert used["protocol"] == "supervised" and used["stored_protocol"] == stored["protocol"]
    other_protocol, _ = alexnet_row("center_crop_ratio=0.875")
    assert "stored" not in other_protocol and other_protocol["steps"] == 2
    path.write_text(json.dumps({**stored, "dataset": "fashion_mnist"}))  # another dataset's result
    assert "stored" not in alexnet_row()[0]
    path.write_text('{"kind": "alexnet_sup')  # damaged
    damaged, err = alexnet_row()
    assert "stored" not in damaged and f"stored baseline {path} is damaged" in err


@pytest.mark.skipif(not Path(FMNIST_DEFAULT_ROOT).is_dir(), reason="make setup installs dataset-fashion-mnist")
def test_the_demo_finds_the_stored_alexnet_and_calls_it_what_it_is() -> None:
    """A fresh clone's `make demo` reports the tracked `make baselines` result instead of training a
    budgeted AlexNet: the stored file must match the demo's dataset, protocol and data exactly."""
    cfg = load_config(str(REPO / "configs" / "probe_fmnist.yaml"), ["weights=[x]"], schema=EvalConfig,
                      check=validate_eval)
    train, test = (open_dataset(cfg.dataset, split, cfg.root) for split in ("train", "test"))
    found = find_stored(store_dir(cfg.baselines.store), "alexnet_supervised", cfg.dataset,
                        alexnet_protocol(28, cfg.center_crop_ratio), lambda: data_fingerprint(train, test))
    assert found is not None, "no stored AlexNet matches the demo: run `make baselines` and commit baselines/"
    assert found["stored_path"].startswith(str(REPO / "baselines"))
    # patience never fired: the 10-epoch cap ended it, so it is not called converged
    assert (found["stopped"], found["converged"]) == ("epoch_cap", False)
    assert all(key in found["config"] for key in ("store_baselines: true", "alexnet_patience: 3"))


@pytest.mark.skipif(not Path(FMNIST_DEFAULT_ROOT).is_dir(), reason="make setup installs dataset-fashion-mnist")
def test_the_demo_finds_the_stored_supervised_encoder() -> None:
    """`make baselines-encoder` stores the demo encoder's supervised row: a fresh clone's `make demo` must find it
    from what its export will record (architecture, input, epochs), without training."""
    from infomax.data.datasets import FashionMNIST
    from infomax.eval.rows import supervised_encoder_protocol
    from infomax.method.models import width_kwargs

    demo = load_config(str(REPO / "configs" / "fmnist_cpu.yaml"))
    m = demo.model
    meta = {"architecture": m.arch, "timm_kwargs": width_kwargs(m.arch, m.width), "in_chans": 1,  # as exported
            "input_size": [1, demo.data.views[0].size, demo.data.views[0].size], "small_input": m.small_input,
            "stem_stride": m.stem_stride, "input_transform": "normalise", "mean": list(FashionMNIST.mean),
            "std": list(FashionMNIST.std), "summary": {"epochs_trained": float(demo.optim.epochs)}}
    cfg = load_config(str(REPO / "configs" / "probe_fmnist.yaml"), ["weights=[x]"], schema=EvalConfig,
                      check=validate_eval)
    train, test = (open_dataset(cfg.dataset, split, cfg.root) for split in ("train", "test"))
    found = find_stored(store_dir(cfg.baselines.store), "supervised_encoder", cfg.dataset,
                        supervised_encoder_protocol(meta, cfg), lambda: data_fingerprint(train, test))
    assert found is not None, "no stored supervised encoder matches the demo: run `make baselines-encoder`, commit baselines/"
    assert found["budget_epochs"] == demo.optim.epochs and found["stored_path"].startswith(str(REPO / "baselines"))


def test_supervised_encoder_budget_defaults_to_the_pretraining_epochs() -> None:
    assert pretrain_epochs({"summary": {"epochs_trained": 2.4, "pretrain_seconds": 300.0}}) == 2.4
    assert pretrain_epochs({"summary": {"steps": 7}}) == 0  # eval/main.py then says which key to set


@pytest.mark.slow
def test_supervised_encoder_row_trains_our_architecture_for_the_epoch_budget(export_dir: Path, tmp_path: Path,  # noqa: F811
                                                                             capsys) -> None:
    out = tmp_path / "report"
    report = eval_report(capsys, out, f"weights={export_dir}", "random_init=false", "raw_pixels=false",
                         "baselines.supervised_encoder=true", "baselines.supervised_encoder_epochs=1.5",
                         "baselines.supervised_encoder_global_batch_size=16",
                         "baselines.supervised_encoder_weight_decay=0.0123")
    row = next(r for r in report["rows"] if r["kind"] == "supervised_encoder")
    state = torch.load(next(out.glob("checkpoints/supervised_*/step_*/state.pt")), weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.0123  # its own, not AlexNet's
    steps_per_epoch = report["train_images"] // 16
    assert row["steps"] == round(1.5 * steps_per_epoch) and row["budget_epochs"] == 1.5 and row["wall_s"] > 0
    assert row["name"] == f"supervised test_resnet (1.5 epochs, {row['wall_s']:.0f} s)"  # both budget and time
    assert 0 <= row["top1"] <= 1 and row["feature_dim"] == report["rows"][0]["feature_dim"]
    assert row["augment"] == "batch"  # same-size images: crops drawn per batch on the device, no loader workers


@pytest.mark.slow
def test_stored_supervised_encoder_is_used_only_for_the_same_recipe(export_dir: Path, tmp_path: Path,  # noqa: F811
                                                                     capsys) -> None:
    """`make baselines` stores the demo encoder's supervised row, so `make demo` need not spend its fit's minutes;
    another epoch budget (or architecture, or probe) is another recipe and trains here."""
    store = tmp_path / "store"
    row_args = ["random_init=false", "raw_pixels=false", "baselines.supervised_encoder=true",
                "baselines.supervised_encoder_epochs=1", "baselines.supervised_encoder_global_batch_size=16",
                f"baselines.store={store}"]

    def supervised_row(*extra: str) -> tuple[dict, str]:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        report, stdout, _ = eval_run(capsys, out, f"weights={export_dir}", *row_args, *extra)
        return next(r for r in report["rows"] if r["kind"] == "supervised_encoder"), stdout

    trained, _ = supervised_row("store_baselines=true")
    path, = store.glob("synthetic-supervised_encoder-*.json")
    used, stdout = supervised_row()
    assert used["stored"] == str(path) and "stored" in used["name"] and f"using the stored result {path}" in stdout
    assert (used["top1"], used["knn"], used["steps"]) == (trained["top1"], trained["knn"], trained["steps"])
    assert "expected: eval ends" not in stdout or "supervised fit" not in stdout  # no fit left to wait for
    other, _ = supervised_row("baselines.supervised_encoder_epochs=2")
    assert "stored" not in other and other["budget_epochs"] == 2
