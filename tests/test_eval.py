"""The eval stage: probe honesty, the encoder-unchanged check, both protocols, the AlexNet
baselines, several processes, reports and bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration
from PIL import Image

from conftest import ALL_CORES, REPO, in_process, synthetic_views
from infomax.config.pretrain import ConfigError, ViewConfig
from infomax.data import MultiViewDataset
from infomax.data.batch_views import BatchViews
from infomax.data.datasets import open_dataset, stratified_subset
from infomax.eval.classifier import FrozenEncoder, LinearProbeModel, SGDSchedule, fit_classifier
from infomax.eval.features import EncoderChanged, assert_unchanged, fingerprint
from infomax.eval.probe import choose_weight_decay, fit_linear, linear_probe, loss_and_grad
from infomax.export.encoder import export_encoder
from infomax.features.extract import ImageListDataset
from infomax.features.knn import knn_predict_many
from infomax.method.models import create_encoder
from infomax.runtime.hardware import choose_precision
from infomax.runtime.stop import StopFlag

FAST = ["dataset=synthetic", "synthetic_size=96", "synthetic_image_size=16", "num_workers=0", "probe_steps=20",
        "knn_k=[5]", "baselines.alexnet_supervised=false",
        "baselines.supervised_encoder=false"]


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


def test_weight_decay_grid_extends_at_its_edge_and_flags_what_stays_there() -> None:
    def peak_at(best: float):  # held-out accuracy that falls off with the distance in decades from ``best``
        return lambda wd: 1.0 - abs(math.log10(max(wd, 1e-12)) - math.log10(best))

    wd, tried, at_edge = choose_weight_decay(peak_at(1e-3), (1e-6, 1e-5))  # best beyond the top: two decades up
    assert sorted(tried) == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3]) and wd == pytest.approx(1e-3) and at_edge
    wd, tried, at_edge = choose_weight_decay(peak_at(1e-9), (1e-6, 1e-5))  # and down
    assert sorted(tried) == pytest.approx([1e-8, 1e-7, 1e-6, 1e-5]) and wd == pytest.approx(1e-8) and at_edge
    wd, tried, at_edge = choose_weight_decay(peak_at(1e-5), (1e-6, 1e-5, 1e-4))  # inside: nothing added
    assert sorted(tried) == [1e-6, 1e-5, 1e-4] and wd == 1e-5 and not at_edge
    wd, tried, at_edge = choose_weight_decay(peak_at(1e-6), (1e-8, 1e-7))  # found one decade up
    assert wd == pytest.approx(1e-6) and not at_edge and sorted(tried) == pytest.approx([1e-8, 1e-7, 1e-6, 1e-5])



def test_fused_probe_loss_and_gradient_match_autograd() -> None:
    x, y = planted(50, classes=4, dim=6)
    model = torch.nn.Linear(6, 4)
    loss = loss_and_grad(model, x, y, weight_decay=0.3, chunk=7)  # 7 blocks, the last one short
    fused = model.weight.grad.clone(), model.bias.grad.clone()
    model.zero_grad()
    expected = torch.nn.functional.cross_entropy(model(x), y) + 0.3 * model.weight.pow(2).sum() / 2
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(fused, (model.weight.grad, model.bias.grad))


def test_probe_fits_follow_the_weight_decay_path_and_end_nearer_the_optimum() -> None:
    """Warm starts along the path: the same 5 L-BFGS iterations leave the final fit far nearer its
    optimum (gradient 8x smaller here) than a fit from zero at the chosen weight decay."""
    (x, y), (xt, yt) = planted(3000, dim=64), planted(500, seed=1, dim=64)
    result = linear_probe(x, y, xt, yt, (1e-2, 1e-3, 1e-4), steps=5)
    standardised = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    cold = fit_linear(standardised, y, 10, result.weight_decay, steps=5)
    loss_and_grad(cold, standardised, y, result.weight_decay)
    assert 0 < result.grad_max < cold.weight.grad.abs().max().item() / 3


def test_knn_of_several_k_in_one_pass_votes_as_each_k_alone() -> None:
    bank, labels = planted(300, classes=5, dim=8)
    queries, _ = planted(70, classes=5, dim=8, seed=1)

    def alone(k: int) -> torch.Tensor:  # Wu et al.'s weighted vote, written out for one k
        sim, idx = (F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T).topk(k, dim=1)
        votes = torch.zeros(len(queries), 5).scatter_add_(1, labels[idx], (sim / 0.07).exp())
        return votes.argmax(1)

    many = knn_predict_many(bank, labels, queries, [1, 20, 200, 500], 0.07, 5, chunk=32)
    for k in (1, 20, 200):
        assert torch.equal(many[k], alone(k))
    assert torch.equal(many[500], alone(300))  # more neighbours than the bank holds: the whole bank
    assert knn_predict_many(bank, labels, queries, [], 0.07, 5) == {}


def test_channels_last_extraction_keeps_the_weights_and_the_features() -> None:
    from types import SimpleNamespace

    from infomax.eval.rows import Rows

    encoder = create_encoder("test_resnet", 1, True, 2).eval()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    before, expected = fingerprint(encoder), encoder(x)
    for on in (False, True):
        Rows.memory_format(SimpleNamespace(cfg=SimpleNamespace(channels_last=on)), encoder)
        conv = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == on
        assert fingerprint(encoder) == before
        torch.testing.assert_close(encoder(x), expected, rtol=1e-4, atol=1e-5)


def test_encoder_changed_check_fails_when_a_weight_moves() -> None:
    encoder = create_encoder("test_resnet", 3, small_input=True)
    before = fingerprint(encoder)
    assert_unchanged(encoder, before, "x")
    with torch.no_grad():
        next(encoder.parameters())[0].flatten()[0] += 1e-6
    with pytest.raises(EncoderChanged, match="changed during evaluation"):
        assert_unchanged(encoder, before, "x")


class StopAfter(StopFlag):
    """A stop flag that trips after ``n`` reads, like a SIGTERM arriving mid-epoch."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.signal_name = n, "SIGTERM"

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n < 0


@pytest.mark.parametrize("on_device", [False, True], ids=["loader_transforms", "batch_views"])
def test_sgd_probe_stopped_and_resumed_ends_on_the_same_head(tmp_path: Path, on_device: bool) -> None:
    """The imagenet protocol's loop: frozen encoder + BN, checkpoint on stop, exact resume, with the crops
    drawn per image in the loader or per batch on the device (``BatchViews``, the eval's path for
    same-size images)."""
    encoder = create_encoder("test_resnet", 3, small_input=True)
    before = fingerprint(encoder)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    schedule = SGDSchedule(lr=1.0, epochs=3, global_batch_size=16, milestones=(2,), checkpoint_every=100)
    images = open_dataset("synthetic", "train", synthetic_size=64, synthetic_image_size=16)
    views = BatchViews([ViewConfig(size=16, jitter_p=0.0, grayscale_p=0.0)], images.mean, images.std, seed=0)
    drawn: list[torch.Tensor] = []

    def augment(x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16)  # the loader only collated the images
        drawn.append(views(x, epoch, step)[0])
        return drawn[-1]

    def fit(ckpt_dir: Path, stop: StopAfter | None) -> tuple[torch.nn.Linear, object]:
        torch.manual_seed(0)
        head = torch.nn.Linear(encoder.num_features, 8)
        data = MultiViewDataset(images, [], seed=0) if on_device else synthetic_views(64, 16)
        model = torch.nn.Sequential(FrozenEncoder(encoder), head)
        return head, fit_classifier(accelerator, model, head, data, schedule, ckpt_dir, desc="t", stop=stop,
                                    augment=augment if on_device else None)

    straight, outcome = fit(tmp_path / "a", None)
    assert outcome.progress.global_step == 12 and outcome.progress.epoch == 3
    _, stopped = fit(tmp_path / "b", StopAfter(5))
    assert stopped is None and (tmp_path / "b" / "step_00000006").is_dir()
    resumed, outcome = fit(tmp_path / "b", None)
    assert outcome.progress.global_step == 12
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    assert fingerprint(encoder) == before  # the frozen encoder and its BN statistics did not move
    if on_device:  # 12 + 6 + 6 steps; the resumed fit redrew the stopped one's last 6 batches as the first run drew them
        assert len(drawn) == 24 and all(torch.equal(a, b) for a, b in zip(drawn[18:], drawn[6:12]))


def test_linear_probe_head_stays_fp32_under_bf16_autocast() -> None:
    """MoCo's linear probe trains its head in fp32; a bf16 launch may only lower the frozen encoder."""
    torch.manual_seed(0)
    encoder = create_encoder("test_resnet", 3, small_input=True)
    model = LinearProbeModel(encoder, torch.nn.Linear(encoder.num_features, 8))
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        features = model.frozen(x)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, model.head(features.float()), rtol=0, atol=0)  # the same fp32 matmul, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(encoder.num_features, 8)(features).dtype == torch.bfloat16  # what the head escaped


def test_linear_probe_uses_every_image_each_epoch(tmp_path: Path) -> None:
    """No drop_last for the probe: 40 images in batches of 16 are 3 steps per epoch, the last one of 8."""
    encoder = create_encoder("test_resnet", 3, small_input=True)
    head = torch.nn.Linear(encoder.num_features, 8)
    seen: list[int] = []
    head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    data = synthetic_views(40, 16)
    outcome = fit_classifier(Accelerator(cpu=True), LinearProbeModel(encoder, head), head, data,
                             SGDSchedule(lr=0.1, epochs=2, global_batch_size=16), tmp_path / "ck", desc="t", drop_last=False)
    assert outcome.progress.global_step == 6 and outcome.progress.epoch == 2
    assert seen == [16, 16, 8] * 2


def run_eval(*overrides: str, launcher: list[str] | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(REPO / "eval" / "main.py"), *FAST, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)


def eval_in_process(capsys: pytest.CaptureFixture, *overrides: str) -> tuple[int, str, str]:
    """``eval/main.py`` run in this process (conftest's ``in_process``): (exit code, stdout, stderr)."""
    from infomax.eval.main import main

    return in_process(capsys, main, [*FAST, *overrides])


def eval_run(capsys: pytest.CaptureFixture, out: Path, *overrides: str) -> tuple[dict, str, str]:
    """:func:`eval_in_process` writing to ``out``, which must succeed: (its report.json, stdout, stderr)."""
    code, stdout, err = eval_in_process(capsys, f"out={out}", *overrides)
    assert code == 0, err[-3000:]
    return json.loads((out / "report.json").read_text()), stdout, err


def eval_report(capsys: pytest.CaptureFixture, out: Path, *overrides: str) -> dict:
    """:func:`eval_run`'s report.json."""
    return eval_run(capsys, out, *overrides)[0]


def report_of(proc: subprocess.CompletedProcess, out: Path) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    encoder = create_encoder("test_resnet", 3, small_input=True)
    export_encoder(encoder, tmp_path / "run" / "export", arch="test_resnet", in_chans=3, input_size=16,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), small_input=True, summary={"steps": 7})
    return tmp_path / "run" / "export"


@pytest.mark.slow
def test_eval_writes_report_with_every_requested_row(export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_eval(f"weights={export_dir}", f"out={out}", "baselines.alexnet_supervised=true",
                    "baselines.alexnet_max_steps=2", "baselines.alexnet_global_batch_size=16", "baselines.published=true")
    report = report_of(proc, out)
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds == ["ours", "random_init", "raw_pixels", "alexnet_supervised"] + ["published"] * 6
    assert report["precision"] == choose_precision("auto").mode and "native bf16: " in report["machine"]
    assert f"Precision: {report['precision']} (" in (out / "report.md").read_text()
    for row in report["rows"][:3]:
        assert 0 <= row["top1"] <= row["top5"] <= 1 and set(row["knn"]) == {"5"} and row["scored"] == 24
        assert row["probe_grad_max"] > 0  # how far the probe's final fit is from its optimum
    alexnet = report["rows"][3]
    assert report["alexnet_reference_top1"] == alexnet["top1"] and alexnet["name"].startswith("AlexNet supervised (2 "
                                                                                              "steps, ")
    assert alexnet["steps"] == 2 and alexnet["wall_s"] > 0 and alexnet["epochs"] > 0 and "converged" in alexnet
    assert len(alexnet["held_out_top1"]) == 2  # 10 checks over a 2-step budget: after each step
    assert report["rows"][0]["delta_vs_alexnet"] == pytest.approx(report["rows"][0]["top1"] - alexnet["top1"])
    quoted = {r["name"]: r["top1"] for r in report["rows"] if r["kind"] == "published"}
    assert quoted["AlexNet supervised (as cited by CMC)"] == 0.593 and quoted["AMDIM"] == 0.681
    assert report["rows"][0]["weights_sha256"] and report["protocol"] == "fast-v2"
    md = (out / "report.md").read_text()
    assert "| run | ours | fast |" in md and "Δ vs AlexNet" in md and "Quoted, not measured here" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| encoder | kind |" in proc.stdout  # the terminal ends with the table
    assert "| run | ours | fast |" in (export_dir / "README.md").read_text()  # the model card shows the scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb" / "eval")).Reload()  # its own run, at the export's step
    assert [e.step for e in events.Scalars(f"eval/{report['rows'][0]['name']}/top1")] == [7]


@pytest.mark.slow
def test_unreadable_scored_images_are_skipped_and_counted_not_replaced(export_dir: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """24 readable and 3 undecodable images in val/: each row scores the 24 (a neighbour used to stand in for each
    broken one, scoring 27), and one line counts what was skipped."""
    from test_data import make_imagefolder

    make_imagefolder(tmp_path / "data", good_per_class=12, corrupt=3)
    (tmp_path / "data" / "val").symlink_to(tmp_path / "data" / "train")
    out = tmp_path / "report"
    report, stdout, _ = eval_run(capsys, out, f"weights={export_dir}", "dataset=imagefolder",
                                 f"root={tmp_path / 'data'}", "raw_pixels=false", "random_init=false", "knn_k=[5]")
    (row,) = report["rows"]
    assert row["scored"] == 24 and row["knn"]["5"] >= 0
    assert "eval: 3 unreadable image(s) of the test split skipped: scored on the other 24" in stdout


@pytest.mark.slow
def test_imagenet_protocol_runs_and_reports_sgd_rows(export_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    sgd = ["protocol=imagenet", "sgd.epochs=12", "sgd.milestones=[9]", "sgd.global_batch_size=32", "sgd.lr=10",
           "sgd.crop_scale_min=0.5"]
    report = eval_report(capsys, out, f"weights={export_dir}", "raw_pixels=false", *sgd)
    assert [r["protocol"] for r in report["rows"]] == ["imagenet", "imagenet"]
    assert all(r["trained"] == "12 epochs" and r["scored"] == 24 for r in report["rows"])
    assert report["rows"][0]["top1"] >= 0.3  # it learned: 8 balanced classes, chance is 1/8
    assert report["protocol"] == "imagenet-v1" and len(list((out / "checkpoints").iterdir())) == 2


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["fast", "imagenet"])
def test_two_processes_score_the_same_as_one(export_dir: Path, tmp_path: Path, protocol: str) -> None:
    """No duplicates from padding and no drops: 90 train / 22 test images over 2 ranks, batch 16. The imagenet
    protocol's kNN keeps the train features split across the ranks and scores the same."""
    args = [f"weights={export_dir}", "synthetic_size=90", "batch_size_per_process=16", "random_init=false", "raw_pixels=false",
            f"protocol={protocol}", "sgd.epochs=2", "sgd.milestones=[1]", "sgd.global_batch_size=16"]
    one = report_of(run_eval(*args, f"out={tmp_path / 'one'}"), tmp_path / "one")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_eval(*args, f"out={tmp_path / 'two'}", launcher=launcher)
    two = report_of(proc, tmp_path / "two")
    assert two["processes"] == 2 and one["processes"] == 1
    (a,), (b,) = one["rows"], two["rows"]
    assert a["scored"] == b["scored"] == 22
    assert b["knn"] == a["knn"]
    if protocol == "fast":  # the SGD fit's order of summation differs between 1 and 2 ranks; the L-BFGS probe's does not
        assert b["top1"] == a["top1"]
    assert proc.stdout.count("| encoder | kind |") == 1  # rank 0 reports, rank 1 does not


def test_each_export_is_scored_at_its_own_size_and_normalisation(tmp_path: Path, monkeypatch) -> None:
    """weights=[a,b], a 16 px export and a 24 px one with another mean/std: each split of each export is
    read at that export's own size and normalisation, and each row says its input size."""
    import infomax.eval.rows
    import infomax.features.extract
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config
    from infomax.eval.main import evaluate

    torch.manual_seed(0)
    encoder = create_encoder("test_resnet", 3, small_input=True)
    recipes = {"a": (16, (0.5,) * 3, (0.25,) * 3), "b": (24, (0.3, 0.4, 0.5), (0.2, 0.3, 0.4))}
    for name, (size, mean, std) in recipes.items():
        export_encoder(encoder, tmp_path / name / "export", arch="test_resnet", in_chans=3, input_size=size,
                       mean=mean, std=std, small_input=True, summary={"steps": 1})
    seen = []

    class Recording(infomax.features.extract.ImageListDataset):
        def __init__(self, base, size, crop_ratio=1.0, mean=None, std=None) -> None:
            seen.append((size, tuple(mean), tuple(std)))
            super().__init__(base, size, crop_ratio, mean, std)

    monkeypatch.setattr(infomax.features.extract, "ImageListDataset", Recording)
    monkeypatch.setattr(infomax.eval.rows, "ImageListDataset", Recording)  # its own name, bound when a test imported it
    cfg = load_config(None, [*FAST, f"weights=[{tmp_path / 'a' / 'export'},{tmp_path / 'b' / 'export'}]",
                             f"out={tmp_path / 'ab'}", "random_init=false", "raw_pixels=false",
                             "precision=no"],  # in-process: earlier tests' Accelerator fixed this process's precision
                      schema=EvalConfig, check=validate_eval)
    rows = evaluate(cfg)
    assert seen == [recipes["a"]] * 2 + [recipes["b"]] * 2  # train and test split of each
    assert [r["input_size"] for r in rows] == [16, 24]
    assert "| a | ours | fast | 16 | 96 |" in (tmp_path / "ab" / "report.md").read_text()  # input px, features


@pytest.mark.parametrize("size, overrides, kinds", [
    (48, ["random_init=true", "raw_pixels=true"], ["ours", "random_init"]),  # 3 x 48 x 48 pixels: too many to probe
    (16, ["random_init=false", "raw_pixels=true"], ["ours", "raw_pixels"]),
], ids=["raw_pixels_too_large", "no_random_init"])
def test_the_progress_counts_the_rows_the_report_holds(tmp_path: Path, capsys, size: int, overrides: list[str],
                                                       kinds: list[str]) -> None:
    """The n of "n rows to compute", the rows printed and the rows left in each expected line all come from the
    rows actually run: a config that selects some rows (raw pixels asked for but skipped on large images,
    published figures quoted, not computed) is counted as the report holds them."""
    import re

    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config
    from infomax.eval.main import evaluate

    torch.manual_seed(0)
    export = tmp_path / "run" / "export"
    export_encoder(create_encoder("test_resnet", 3, small_input=True), export, arch="test_resnet", in_chans=3,
                   input_size=size, mean=(0.5,) * 3, std=(0.25,) * 3, small_input=True, summary={"steps": 1})
    cfg = load_config(None, [*FAST, f"weights=[{export}]", f"out={tmp_path / 'report'}", *overrides,
                             "baselines.published=true", "precision=no"], schema=EvalConfig, check=validate_eval)
    rows = evaluate(cfg)
    stdout = capsys.readouterr().out
    computed = [r for r in rows if r["kind"] != "published"]
    assert [r["kind"] for r in computed] == kinds and len(rows) > len(computed)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["rows"] == rows
    (n, names), = ((int(m), names) for m, names in re.findall(r"^eval: .*, (\d+) rows to compute on .*: (.*)$", stdout,
                                                               re.M))
    assert n == len(computed) and len(names.split(", ")) == n
    assert re.findall(r"^eval: (.*): top-1 ", stdout, re.M) == [r["name"] for r in computed]
    left = [int(m) for m in re.findall(r"^expected: eval ends in about .* \((\d+) row\(s\) to score", stdout, re.M)]
    assert left == list(range(n - 1, 0, -1))


def train_supervised(encoder: torch.nn.Module, images, steps: int, size: int) -> None:
    """Labelled steps of 64 images: an encoder that has certainly learned the classes."""
    head = torch.nn.Linear(encoder.num_features, images.num_classes)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], 3e-3)
    loader = torch.utils.data.DataLoader(ImageListDataset(images, size), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    encoder.train()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(head(encoder(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                return


@pytest.mark.slow
def test_learned_encoder_beats_random_init_end_to_end(tmp_path: Path) -> None:
    """Real Fashion-MNIST through the whole stage: an encoder that learned the classes must score
    clearly above the random-init row, and the AlexNet trained here must beat chance."""
    torch.manual_seed(0)
    encoder = create_encoder("test_resnet", 1, small_input=True)
    train_supervised(encoder, stratified_subset(open_dataset("fashion_mnist", "train"), 2000), steps=100, size=28)
    export = tmp_path / "learned" / "export"
    export_encoder(encoder, export, arch="test_resnet", in_chans=1, input_size=28, mean=(0.2860,), std=(0.3530,),
                   small_input=True, summary={})
    out = tmp_path / "report"
    report = report_of(run_eval(f"weights={export}", f"out={out}", "dataset=fashion_mnist", "limit_train=2000",
                                "limit_test=500", "raw_pixels=false", "baselines.alexnet_supervised=true",
                                "baselines.alexnet_max_steps=100", "baselines.alexnet_global_batch_size=32",
                                "baselines.alexnet_epochs=5", "baselines.alexnet_lr=0.03",
                                "baselines.alexnet_crop_scale_min=1.0", "baselines.alexnet_held_out=200",
                                "baselines.alexnet_eval_every=50", env=ALL_CORES), out)
    ours, random_init, alexnet = report["rows"]
    assert ours["top1"] > 0.8 and ours["top1"] > random_init["top1"] + 0.08, report["rows"]
    assert alexnet["kind"] == "alexnet_supervised" and alexnet["top1"] > 0.2  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_alexnet_conv_probes_from_a_weights_file(export_dir: Path, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)  # random init, saved like torchvision's file
    out = tmp_path / "report"
    report = eval_report(capsys, out, f"weights={export_dir}", "random_init=false", "raw_pixels=false",
                         f"baselines.alexnet_weights={weights}", "baselines.alexnet_probe_size=64")
    conv = [r for r in report["rows"] if r["kind"] == "alexnet_conv"]
    assert [r["name"] for r in conv] == [f"AlexNet conv{i} (alexnet.pth)" for i in range(1, 6)]
    assert [r["feature_dim"] for r in conv] == [9216, 9408, 9600, 9216, 9216]
    assert all(0 <= r["top1"] <= 1 and r["scored"] == 24 for r in conv)


@pytest.mark.slow
@pytest.mark.parametrize("damage, needle", [
    ("missing", "no export found"),
    ("hash", "does not match the sha256"),
    ("arch", "do not match the architecture"),
    ("channels", "expects 1-channel images"),
    ("alexnet_missing", "is not a file"),
    ("alexnet_wrong", "is not a torchvision AlexNet state dict"),
    ("empty_split", "no images"),
    ("no_sha", "lacks sha256"),
    ("bad_json", "is not valid JSON"),
    ("no_weights", "encoder.safetensors is missing"),
    ("missing_inside", "no export found at"),
    ("out_unwritable", "is not a writable directory"),
    ("holdout_other", "was pretrained with data.holdout=24, so holdout=12 would not score the images it was held out "
                      "of"),
    ("holdout_none", "was pretrained on every train image (data.holdout=0)"),
    ("batch_zero", "'batch_size_per_process': must be >= 1"),  # used to be DataLoader's ValueError, mid-eval
    ("workers_negative", "'num_workers': must be >= 0"),
])
def test_bad_input_fails_with_one_line(export_dir: Path, tmp_path: Path, damage: str, needle: str, capsys) -> None:
    meta_path = export_dir / "config.json"
    meta = json.loads(meta_path.read_text())
    extra: list[str] = []
    if damage == "missing":
        export_dir = export_dir.parent / "nope"
    elif damage == "hash":
        meta["sha256"] = "0" * 64
    elif damage == "arch":
        meta["architecture"] = "resnet18"
    elif damage == "channels":  # a valid grayscale export, evaluated on RGB data
        export_encoder(create_encoder("test_resnet", 1, small_input=True), export_dir, arch="test_resnet", in_chans=1,
                       input_size=16, mean=(0.5,), std=(0.25,), small_input=True, summary={})
    elif damage.startswith("alexnet"):
        path = tmp_path / "alexnet.pth"
        if damage == "alexnet_wrong":
            torch.save(torchvision.models.vgg11().state_dict(), path)
        extra = [f"baselines.alexnet_weights={path}"]
    elif damage == "empty_split":  # a val/ folder with its class folders but no images
        for split in ("train", "val"):
            for cls in ("cat", "dog"):
                (tmp_path / "data" / split / cls).mkdir(parents=True)
        for cls in ("cat", "dog"):
            Image.new("RGB", (16, 16)).save(tmp_path / "data" / "train" / cls / "a.png")
        extra = ["dataset=imagefolder", f"root={tmp_path / 'data'}"]
    elif damage == "no_sha":
        del meta["sha256"]
    elif damage == "bad_json":
        meta_path.write_text("{not json")
    elif damage == "no_weights":
        (export_dir / "encoder.safetensors").unlink()
    elif damage == "missing_inside":  # used to score the parent export under this name, with rc 0
        export_dir = export_dir / "nope"
    elif damage == "out_unwritable":  # used to compute every row, then fail on report.json
        (tmp_path / "taken").write_text("")  # a file: unwritable even for root, whom chmod would not stop
        extra = [f"out={tmp_path / 'taken' / 'report'}"]
    elif damage == "batch_zero":
        extra = ["batch_size_per_process=0"]
    elif damage == "workers_negative":
        extra = ["num_workers=-1"]
    elif damage.startswith("holdout"):  # a validation split the encoder was not held out of
        meta["summary"]["holdout"] = 24 if damage == "holdout_other" else 0
        extra = ["holdout=12"]
    if damage in ("hash", "arch", "no_sha") or damage.startswith("holdout"):
        meta_path.write_text(json.dumps(meta))
    code, out, err = eval_in_process(capsys, f"weights={export_dir}", *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err[-2000:]
    if damage.startswith("missing"):
        assert f"'{export_dir}'" in lines[0]  # the path the user gave, not its parent
    if damage == "arch":  # the keys at fault, not torch's first line alone ("Error(s) in loading state_dict ...:")
        assert "key(s) in state_dict" in lines[0] or "size mismatch" in lines[0], lines[0]
    assert "rows to compute" not in out  # found before any work
    if damage == "missing":  # once through the script itself: no warning or traceback beside the line, exit 2
        proc = run_eval(f"weights={export_dir}", *extra)
        assert (proc.returncode, proc.stderr.strip()) == (2, lines[0])


@pytest.mark.slow
def test_holdout_scores_the_validation_images_the_pretraining_never_saw(tmp_path: Path, capsys) -> None:
    """data.holdout=N and eval holdout=N name the same N train images: the pretraining's loader and kNN bank
    never see them, its kNN queries are drawn from them, and the eval fits on the rest and scores them."""
    from infomax.config.pretrain import load_config
    from infomax.data.datasets import holdout_split, open_dataset
    from infomax.data.train_loader import build_knn_sets, training_and_validation

    cfg = load_config(str(REPO / "configs" / "synthetic_tiny.yaml"), ["data.holdout=24", "data.synthetic_size=96",
                                                                      "monitor.knn_queries=8"])
    full = open_dataset("synthetic", "train", synthetic_size=96, seed=cfg.run.seed)
    rest, validation = holdout_split(full, 24)
    train, held = training_and_validation(cfg)  # the pretraining's own split, opened once
    bank, queries = build_knn_sets(cfg, train, held)
    assert held.indices == validation.indices and train.indices == rest.indices and len(train) == 72 and len(validation.indices) == 24
    assert not set(validation.indices) & set(train.indices)
    assert {bank.base.indices[i] for i in bank.indices}.isdisjoint(validation.indices)
    assert {queries.base.indices[i] for i in queries.indices} <= set(validation.indices)
    assert holdout_split(full, 24)[1].indices == validation.indices  # fixed: the eval finds the same ones

    torch.manual_seed(0)
    export = tmp_path / "run" / "export"
    export_encoder(create_encoder("test_resnet", 3, small_input=True), export, arch="test_resnet", in_chans=3,
                   input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), small_input=True,
                   summary={"steps": 7, "holdout": 24})
    out = tmp_path / "report"
    report = eval_report(capsys, out, f"weights={export}", "holdout=24", "raw_pixels=false")
    assert report["scored_on"] == "validation split (24 train images held out)"
    assert (report["train_images"], report["test_images"]) == (72, 24)
    assert all(r["scored"] == 24 for r in report["rows"])
    assert "Scored on the validation split (24 train images held out): 24 images" in (out / "report.md").read_text()
    # the held-out images hold every class (they held whole classes the fit never saw: 0.00 on every row)
    assert min(min(r["top1"], *r["knn"].values()) for r in report["rows"]) > 0, report["rows"]


def test_report_warns_about_a_weight_decay_at_the_edge(tmp_path: Path) -> None:
    from infomax.eval.report import write_report

    row = {"name": "ours", "kind": "ours", "protocol": "fast", "top1": 0.5, "top5": 0.9, "knn": {"5": 0.4},
           "delta_vs_alexnet": None, "weight_decay": 1e-3, "weight_decay_at_edge": True,
           "weight_decays_tried": [1e-6, 1e-5, 1e-4, 1e-3]}
    meta = {"dataset": "synthetic", "protocol": "fast-v2", "protocol_description": "p", "config": "c: 1\n",
            "precision": "no", "precision_reason": "run.precision=no", "machine": "a CPU"}
    write_report(tmp_path, [row, {**row, "name": "raw", "weight_decay_at_edge": False}], meta, [5])
    md = (tmp_path / "report.md").read_text()
    assert "- `ours`: weight decay 0.001 is at the edge of the grid tried (1e-06, 1e-05, 0.0001, 0.001)" in md
    assert "`raw`: weight decay" not in md


def test_eval_prints_each_row_and_the_time_left_from_the_rows_so_far(monkeypatch) -> None:
    """After each scored row: its score and seconds, and the rows left at the mean cost so far plus the
    supervised fits still ahead; a supervised row's own fit is not counted as scoring time; a stored row
    is printed but not timed."""
    import infomax.eval.progress

    clock_times = iter([0.0, 40.0, 100.0, 100.5, 300.0])
    monkeypatch.setattr(infomax.eval.progress.time, "perf_counter", lambda: next(clock_times))
    lines: list[str] = []
    clock = infomax.eval.progress.RowClock(3, [120.0], lines.append)
    scored = {"kind": "ours", "probe_seconds": 1.0, "top1": 0.9, "knn": {"20": 0.8, "200": 0.7}}
    clock.done({**scored, "name": "ours"})  # 40 s
    clock.done({**scored, "name": "random init", "kind": "random_init"})  # 60 s
    clock.done({"name": "AlexNet (stored)", "kind": "alexnet_supervised", "protocol": "supervised", "top1": 0.91})
    clock.done({**scored, "name": "supervised", "kind": "supervised_encoder", "wall_s": 150.0})  # 199.5 s, 150 fitting
    assert lines[0] == "eval: ours: top-1 90.00%, kNN k=20 80.00% (40 s)"
    assert lines[1] == "expected: eval ends in about 3 min 20 s (2 row(s) to score at 40 s each, and 1 supervised fit(s) of about 2 min 00 s)"
    assert lines[3] == "expected: eval ends in about 2 min 50 s (1 row(s) to score at 50 s each, and 1 supervised fit(s) of about 2 min 00 s)"
    assert lines[4] == "eval: AlexNet (stored): top-1 91.00% (0 s)" and lines[5].startswith("eval: supervised: top-1")
    assert len(lines) == 6  # nothing left to expect after the last row


def test_sgd_fits_draw_same_size_images_per_batch_and_others_per_image(tmp_path: Path) -> None:
    """Rows.train_input: same-size images (Fashion-MNIST, synthetic) are collated as uint8 and cropped per
    batch on the device, with no loader workers; other images (an image folder) get the torchvision
    transform per image in the configured workers. Both give normalised crops of the fit's size."""
    from infomax.config.eval import EvalConfig
    from infomax.data.datasets import Subset
    from infomax.eval.rows import Rows

    images = open_dataset("synthetic", "train", synthetic_size=8, synthetic_image_size=16)
    mixed = Subset(images, list(range(8)))
    mixed.same_size = False  # as an ImageFolder of JPEGs
    rows = Rows(EvalConfig(num_workers=3), Accelerator(cpu=True), images, images, 16, tmp_path, "key")
    data, augment, workers = rows.train_input(images, 12, 0.5)
    assert workers == 0 and data[0]["views"][0].dtype == torch.uint8
    crops = augment(torch.stack([data[i]["views"][0] for i in range(8)]), 0, 0)
    assert crops.shape == (8, 3, 12, 12) and crops.dtype == torch.float32 and crops.min() < 0 < crops.max()
    assert torch.equal(crops, augment(torch.stack([data[i]["views"][0] for i in range(8)]), 0, 0))  # (epoch, step) seed it
    data, augment, workers = rows.train_input(mixed, 12, 0.5)
    assert augment is None and workers == 3
    view = data[0]["views"][0]
    assert view.shape == (3, 12, 12) and view.dtype == torch.float32


def test_probe_seconds_are_one_timed_pass_scaled_to_the_rows_and_the_passes_of_every_fit(monkeypatch) -> None:
    """One loss-and-gradient pass on at most 8192 rows, its median of three after a warm-up, scaled to n
    rows and to L-BFGS's most passes (1.25 x steps) in each fit."""
    import infomax.eval.progress

    ticks = iter([0.0, 9.0, 10.0, 10.01, 11.0, 11.03, 12.0, 12.01])  # warm-up 9 s, then 0.01, 0.03, 0.01
    monkeypatch.setattr(infomax.eval.progress.time, "perf_counter", lambda: next(ticks))
    seconds = infomax.eval.progress.probe_seconds(16384, 8, 10, fits=5, steps=100)
    assert seconds == pytest.approx(0.01 * 2 * 1.25 * 100 * 5)


def test_knn_seconds_are_one_timed_chunk_of_queries_scaled_to_all_of_them(monkeypatch) -> None:
    """One chunk of 1024 queries against the whole bank, its median of three after a warm-up, scaled to the
    queries; no neighbour counts, no kNN."""
    import infomax.eval.progress

    ticks = iter([0.0, 9.0, 10.0, 10.02, 11.0, 11.05, 12.0, 12.02])  # warm-up 9 s, then 0.02, 0.05, 0.02
    monkeypatch.setattr(infomax.eval.progress.time, "perf_counter", lambda: next(ticks))
    assert infomax.eval.progress.knn_seconds(300, 4096, 8, [20, 200], 10) == pytest.approx(0.02 * 4096 / 1024)
    assert infomax.eval.progress.knn_seconds(300, 4096, 8, [], 10) == 0.0


def _planned_export(views: int = 1, **summary) -> dict:
    """config.json of an export still to be written, as a pretraining run plans it (64 features an encoder)."""
    from infomax.export.encoder import export_meta

    return export_meta(arch="resnet18", in_chans=3, input_size=32, mean=[0.5] * 3, std=[0.25] * 3, num_features=64,
                       small_input=True, views=[{"in_chans": 3, "input_transform": "normalise", "num_features": 64}]
                       * (views - 1), summary=summary, weights_sha256="planned")


def test_the_eval_is_reckoned_before_it_runs_from_the_row_planners_rows(tmp_path: Path, monkeypatch) -> None:
    """``monitor.expect_eval``'s estimate, from the rows ``Rows.plan`` plans on the export still to be written:
    ours and random init extract the fit and scored images and fit a probe on the encoder's features; raw
    pixels (3 x 32 x 32 <= 4096) fit one on the pixels; a supervised fit still to train adds its time; a row
    the planner adds counts at once."""
    import infomax.eval.expected
    from infomax.eval.expected import expected_eval_seconds, load_expected_eval
    from infomax.eval.progress import RowCost
    from infomax.eval.rows import RowBuilder, Rows

    fits_asked, knn_asked = set(), set()
    monkeypatch.setattr(infomax.eval.expected, "probe_seconds",
                        lambda n, features, c, fits, steps: fits_asked.add(fits) or features / 100)
    monkeypatch.setattr(infomax.eval.expected, "knn_seconds",
                        lambda bank, queries, features, ks, c: knn_asked.add((bank, queries)) or features / 1000)
    config = tmp_path / "eval.yaml"
    config.write_text("dataset: synthetic\nsynthetic_size: 512\nsynthetic_image_size: 32\n"
                      "baselines: {alexnet_supervised: false, supervised_encoder: false}\n")
    plan = load_expected_eval(str(config), str(tmp_path / "run" / "export"))
    seconds, how = expected_eval_seconds(plan, _planned_export(), 0.001)
    assert seconds == pytest.approx(2 * ((512 + 128) * 0.001 + 0.64 + 0.064) + 30.72 + 3.072)
    assert how == "3 rows: 2 x 640 images to extract at 1.00 ms, 3 probes of up to 7 fits and kNN votes; stored baselines"
    assert knn_asked == {(512, 128)}  # the fit images are the bank, the scored ones the queries
    assert fits_asked == {4 + 2 + 1}  # the grid of 4, the 2 decades beyond an edge choice, the refit
    # One encoder per view (CMC): ours concatenated (2 x 64 features) and alone, the random init concatenated.
    seconds, how = expected_eval_seconds(plan, _planned_export(views=2), 0.001)
    assert seconds == pytest.approx((2 + 1 + 2) * 640 * 0.001 + 1.1 * (1.28 + 0.64 + 1.28 + 30.72))
    assert how.startswith("4 rows: 5 x 640 images to extract")
    # The supervised encoder, not stored: 2 epochs of 512 // 128 steps at half the export's 0.5 s a step.
    config.write_text("dataset: synthetic\nsynthetic_size: 512\nsynthetic_image_size: 32\nrandom_init: false\n"
                      "raw_pixels: false\nbaselines: {alexnet_supervised: false}\n")
    plan = load_expected_eval(str(config), str(tmp_path / "run" / "export"))
    seconds, how = expected_eval_seconds(plan, _planned_export(epochs_trained=2, steps=100, pretrain_seconds=50), 0.001)
    assert seconds == pytest.approx(640 * 0.001 + 0.64 + 0.064 + 2 * 4 * 0.5 * 0.5)
    assert how.endswith("supervised fits of about 2 s")
    # A row the planner adds is reckoned without any change here.
    planned = Rows.plan
    monkeypatch.setattr(Rows, "plan", lambda self, *a: [*planned(self, *a), RowBuilder(
        "new row", dict, cost=lambda: RowCost(passes=1, features=10))])
    assert expected_eval_seconds(plan, _planned_export(), 0.001)[0] == pytest.approx(
        2 * (640 * 0.001) + 0.64 + 0.064 + 0.1 + 0.01)
    with pytest.raises(ConfigError, match="'monitor.expect_eval': 'nowhere.yaml' is not a file"):
        load_expected_eval("nowhere.yaml", "runs/x/export")
    config.write_text(f"dataset: fashion_mnist\nroot: {tmp_path / 'nowhere'}\n")  # the eval's data, said as the eval's
    with pytest.raises(ConfigError, match=r"'monitor.expect_eval': .*nowhere.* give the eval config the export"):
        load_expected_eval(str(config), "runs/x/export")


def test_the_shipped_imagenet_eval_plans_no_supervised_fit_unless_asked(tmp_path: Path) -> None:
    """configs/probe_imagenet.yaml plans our export's probe and nothing that trains a network with labels:
    the supervised encoder was on by default there, a 200-epoch fit at AlexNet's lr nobody asked for. Asked
    for, it plans the fit with a ResNet recipe."""
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config
    from infomax.eval.rows import Rows

    images = open_dataset("synthetic", "train", synthetic_size=8, synthetic_image_size=16)
    meta = {"architecture": "resnet18", "in_chans": 3, "num_features": 512, "sha256": "0" * 64, "summary": {"epochs_trained": 2}}
    shipped = REPO / "configs" / "probe_imagenet.yaml"
    for asked in (False, True):
        cfg = load_config(str(shipped), ["weights=[x]", f"baselines.supervised_encoder={str(asked).lower()}"],
                          schema=EvalConfig, check=validate_eval)
        rows = Rows(cfg, Accelerator(cpu=True), images, images, 16, tmp_path, "key")
        planned = rows.plan([("runs/x/export", None, meta)], {"runs/x/export": []}, None)
        fits = [row.name for row in planned if "supervised" in row.name.lower() and not row.quoted]
        assert fits == (["supervised resnet18"] if asked else []), fits
    # asked for, a ResNet recipe: 64 images a GPU on 8, lr 0.1 x B/256, wd 1e-4, saves by time only
    schedule = rows.supervised_schedule(meta)
    assert (schedule.global_batch_size, schedule.lr, schedule.weight_decay) == (512, 0.1 * 512 / 256, 1e-4)
    assert (schedule.checkpoint_every, schedule.checkpoint_every_min) == (0, 30)


def test_a_stop_signal_ends_the_eval_at_the_next_row_and_the_rerun_reuses_the_scored_rows(
        export_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """SIGTERM (scancel, timeout) or a first Ctrl-C used to do nothing in the fast protocol: the eval ran on until
    SIGKILL and a second Ctrl-C lost every scored row. Now it stops before the next row, says what it kept, and
    the rerun of the same command reuses those rows and scores the rest, with the figures of an eval that never
    stopped (the random init drawn after them included)."""
    import signal

    from infomax.eval.row_cache import RowCache

    straight = tmp_path / "straight"
    expected = eval_report(capsys, straight, f"weights={export_dir}")["rows"]

    stopped, real_put = tmp_path / "stopped", RowCache.put
    def put_then_sigterm(self, name, row):  # the signal arrives while the first row is scored
        real_put(self, name, row)
        if self.kept == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(RowCache, "put", put_then_sigterm)
    code, _, err = eval_in_process(capsys, f"weights={export_dir}", f"out={stopped}")
    assert code == 1, err[-3000:]
    assert f"eval stopped by SIGTERM after 1 of {len(expected)} rows; the 1 scored row(s) are kept in " \
           f"{stopped / 'rows'}; rerun the same command to go on" in err, err
    assert not (stopped / "report.json").exists() and len(list((stopped / "rows").iterdir())) == 1

    monkeypatch.setattr(RowCache, "put", real_put)
    resumed = eval_report(capsys, stopped, f"weights={export_dir}")["rows"]
    assert [(r["name"], r["top1"], r["knn"]) for r in resumed] == [(r["name"], r["top1"], r["knn"]) for r in expected]


# Where the preemption's signal arrives: as the first row is stored (the eval stops before the next row), or at
# the third step of the first row's SGD fit (the imagenet protocol: the fit saves and stops mid-fit).
PREEMPTED_AT = {"between_rows": [], "in_a_fit": ["protocol=imagenet", "sgd.epochs=2", "sgd.milestones=[1]",
                                                  "sgd.global_batch_size=16", "raw_pixels=false"]}


@pytest.mark.parametrize("when", list(PREEMPTED_AT))
def test_a_preempted_eval_job_is_handed_to_submitits_requeue_and_the_requeued_job_keeps_its_work(
        export_dir: Path, tmp_path: Path, capsys, monkeypatch, when: str) -> None:
    """The chained SLURM eval was not requeued when preempted: its stop flag took submitit's USR2 handler and never
    gave it back, so the job failed with the probe's checkpoint on disk. Now SIGUSR2 saves, then hands the signal to
    submitit's handler (which requeues on rank 0); the requeued job keeps the scored rows, resumes the fit, and ends
    with the figures of an eval that never stopped. A cancel's SIGTERM still ends the job; the requeue budget holds."""
    import signal

    import infomax.launch.jobs
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config, to_yaml
    from infomax.eval.classifier import SGDFit
    from infomax.eval.row_cache import RowCache
    from infomax.eval.rows import Stopped
    from infomax.launch.jobs import EvalJob

    extra = PREEMPTED_AT[when]
    expected = eval_report(capsys, tmp_path / "straight", f"weights={export_dir}", *extra)["rows"]
    monkeypatch.setattr(infomax.launch.jobs, "export_distributed_env", lambda: "a submitit job")  # its handler counts

    def job_for(out: Path) -> EvalJob:
        cfg = load_config(None, [*FAST, f"weights=[{export_dir}]", f"out={out}", *extra], schema=EvalConfig,
                          check=validate_eval)
        return EvalJob(to_yaml(cfg), max_requeues=1)

    def run(job: EvalJob, sig: signal.Signals) -> tuple[list, list[int]]:
        """The job under a stand-in for submitit's USR2 handler, ``sig`` arriving where ``when`` says."""
        handed, results, real_put, real_step, steps = [], [], RowCache.put, SGDFit.step, []
        def put_then_signal(self, name, row):
            real_put(self, name, row)
            if self.kept == 1 and when == "between_rows":
                os.kill(os.getpid(), sig)
        def step_then_signal(self, batch, agree):
            steps.append(1)
            if len(steps) == 3 and when == "in_a_fit":
                os.kill(os.getpid(), sig)
            return real_step(self, batch, agree)
        def main(argv: list[str]) -> int:
            signal.signal(signal.SIGUSR2, lambda signum, frame: handed.append(signum))
            results.append(job())
            return 0
        with monkeypatch.context() as m:
            m.setattr(RowCache, "put", put_then_signal)
            m.setattr(SGDFit, "step", step_then_signal)
            code, _, err = in_process(capsys, main, [])
        assert code == 0, err[-3000:]
        return results[0], handed

    preempted = job_for(tmp_path / "preempted")
    assert run(preempted, signal.SIGUSR2) == ([], [signal.SIGUSR2])  # saved, then handed over; not a failure
    requeued = preempted.checkpoint()
    assert requeued is not None and requeued.function.requeues == 1
    code, out, err = in_process(capsys, lambda argv: 0 if requeued.function() else 1, [])
    assert code == 0, (out + err)[-3000:]
    if when == "between_rows":
        assert out.count("(kept from an earlier run of this eval)") == 1, out[-3000:]
    else:
        assert re.search(r": resumed from \S+ \(epoch 0, step 3\)", out), out[-3000:]  # the step it stopped at
    resumed = json.loads((tmp_path / "preempted" / "report.json").read_text())["rows"]
    assert [(r["name"], r["top1"], r["knn"]) for r in resumed] == [(r["name"], r["top1"], r["knn"]) for r in expected]
    assert requeued.function.checkpoint() is None  # --max-requeues 1 spent: the job ends, saying how to go on
    assert "resubmit the same command" in capsys.readouterr().out

    with pytest.raises(Stopped, match="stopped by SIGTERM"):  # scancel: no requeue, the job fails
        run(job_for(tmp_path / "cancelled"), signal.SIGTERM)
    # SLURM's own preemption signal, SIGTERM, while scontrol shows the job being preempted: requeued as for USR2
    monkeypatch.setattr(infomax.launch.jobs, "being_preempted", lambda: True)
    assert run(job_for(tmp_path / "preempted_by_sigterm"), signal.SIGTERM) == ([], [signal.SIGUSR2])


def _gaussian_pairs(n: int, dim: int, mi: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs of dim-d Gaussians, correlated per coordinate so that I(a; b) = mi nats in closed form:
    -d/2 log(1 - rho^2) = mi."""
    rho = math.sqrt(1 - math.exp(-2 * mi / dim))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g)
    return a, rho * a + math.sqrt(1 - rho ** 2) * torch.randn(n, dim, generator=g)


def test_yardstick_reads_a_known_mi_on_gaussian_features() -> None:
    """The yardstick's estimators on features whose MI is known: 2 nats over 4 coordinates. InfoNCE at K=512
    (ceiling 6.24) and NWJ, fresh critics trained on one set of pairs, read on another over >= 20 batches."""
    from infomax.eval.yardstick import yardstick

    result = yardstick(_gaussian_pairs(20000, 4, 2.0, seed=0), _gaussian_pairs(512 * 20, 4, 2.0, seed=1), k=512,
                       steps=300, lr=0.05)
    assert result["infonce"]["batches"] == 20 and result["log_k"] == pytest.approx(math.log(512))
    assert result["infonce"]["nats"] == pytest.approx(2.0, abs=0.15) and result["infonce"]["se"] < 0.05
    assert result["nwj"]["nats"] == pytest.approx(2.0, abs=0.3)
    independent = yardstick(_gaussian_pairs(20000, 4, 1e-9, seed=2), _gaussian_pairs(512 * 20, 4, 1e-9, seed=3),
                            k=512, steps=300, lr=0.05)
    assert abs(independent["infonce"]["nats"]) < 0.05  # no information, no reading
    # a critic kept at its zero start reads InfoNCE's 0 and NWJ's -1/e whatever the MI, and the result says so
    untrained = yardstick(_gaussian_pairs(2048, 4, 2.0, seed=4), _gaussian_pairs(64 * 20, 4, 2.0, seed=5), k=64,
                          steps=0)
    assert untrained["infonce"]["nats"] == pytest.approx(0.0, abs=1e-6)
    assert untrained["nwj"]["nats"] == pytest.approx(-1 / math.e)
    assert untrained["infonce"]["kept_at_step"] == untrained["nwj"]["kept_at_step"] == 0
    assert result["nwj"]["kept_at_step"] > 0 and result["infonce"]["kept_at_step"] > 0
    with pytest.raises(ValueError, match="at least 20 batches of 512"):
        yardstick(_gaussian_pairs(1000, 4, 1.0, 0), _gaussian_pairs(512 * 19, 4, 1.0, 1), k=512)


@pytest.mark.slow
def test_yardstick_runs_on_an_export_with_its_runs_own_views(tmp_path: Path, capsys) -> None:
    """The command on a pretraining run's export: the run's config gives the data and the view recipes; it writes
    RUN/yardstick.json and says both estimates with their standard errors."""
    from conftest import pretrain_in_process
    from infomax.eval.yardstick import main

    run_dir = tmp_path / "run"
    pretrain_in_process(capsys, f"run.dir={run_dir}", "run.max_steps=2", "monitor.knn_every=0")
    assert main([str(run_dir / "export"), "--k", "8", "--draws", "3", "--train-pairs", "128", "--steps", "20"]) == 0
    result = json.loads((run_dir / "yardstick.json").read_text())
    assert result["infonce"]["batches"] == 64 * 3 // 8 and "nats" in result["nwj"]
    assert result["dataset"] == "synthetic" and result["infonce"]["nats"] <= math.log(8) + 1e-6


def test_the_report_lands_in_the_run_dir_whether_weights_names_the_export_or_its_weights_file(tmp_path: Path) -> None:
    """weights=<run>/export/encoder.safetensors put report.*, rows/ and the fits' checkpoints inside export/."""
    from infomax.eval.report import report_dir

    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "encoder.safetensors").write_bytes(b"")
    assert report_dir("", [str(export)]) == report_dir("", [str(export / "encoder.safetensors")]) == tmp_path / "run"
    assert report_dir(str(tmp_path / "mine"), [str(export)]) == tmp_path / "mine"
    # exports side by side in one folder (not <run>/export) each keep their own report: they shared the folder's
    for name in ("a", "b"):
        assert report_dir("", [str(tmp_path / "dl" / name)]) == tmp_path / "dl" / name


def test_export_rows_are_named_by_their_run_and_told_apart_by_their_parents(tmp_path: Path) -> None:
    """weights=<run>/export/encoder.safetensors was named 'encoder.safetensors', weights=. was '', and two seeds'
    exports of two sweeps (a/seed0/export, b/seed0/export) were both 'seed0'."""
    from infomax.eval.rows import export_names

    for folder in ("r/export", "dl/x", "a/seed0/export", "b/seed0/export"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "encoder.safetensors").write_bytes(b"")
    assert export_names([str(tmp_path / "r" / "export" / "encoder.safetensors"), str(tmp_path / "dl" / "x")]) == \
        ["r", "x"]
    assert export_names([str(tmp_path / "a" / "seed0" / "export"), str(tmp_path / "b" / "seed0" / "export"),
                         str(tmp_path / "r" / "export")]) == ["a/seed0", "b/seed0", "r"]  # only the clashing grow
    assert export_names(["."]) == [Path.cwd().name] and export_names([]) == []  # stored baselines alone


def test_two_exports_of_one_architecture_name_their_own_baselines(tmp_path: Path) -> None:
    """Two exports of one architecture each planned 'random init resnet18' and 'supervised resnet18': the report
    and TensorBoard (eval/<row>/top1) could not tell whose floor and ceiling was whose. An architecture that only
    one export has keeps the short name."""
    from infomax.config.eval import EvalConfig
    from infomax.eval.rows import Rows

    images = open_dataset("synthetic", "train", synthetic_size=8, synthetic_image_size=16)
    meta = {"architecture": "resnet18", "in_chans": 3, "num_features": 512, "summary": {"epochs_trained": 2}}
    exports = [(f"runs/{run}/export", None, {**meta, "sha256": run * 64, **extra}) for run, extra in
               (("a", {}), ("b", {}), ("c", {"architecture": "resnet14t"}))]
    cfg = EvalConfig(dataset="synthetic", weights=[w for w, *_ in exports])
    cfg.baselines.supervised_encoder, cfg.baselines.alexnet_supervised, cfg.baselines.published = True, False, False
    planned = Rows(cfg, Accelerator(cpu=True), images, images, 16, tmp_path, "key").plan(
        exports, {w: [] for w, *_ in exports}, None)
    names = [row.name for row in planned]
    assert names == ["a", "random init resnet18 (a)", "b", "random init resnet18 (b)", "c", "random init resnet14t",
                     "raw pixels", "supervised resnet18 (a)", "supervised resnet18 (b)", "supervised resnet14t"], names


def test_each_row_is_compared_with_its_own_exports_supervised_row_and_a_quoted_alexnet_only_on_imagenet() -> None:
    """With two exports the Δ vs supervised was blank for every row (one supervised row was required), and on
    Fashion-MNIST baselines.published made every row's Δ vs AlexNet a difference to an ImageNet figure."""
    from infomax.config.eval import EvalConfig
    from infomax.eval.baselines import REFERENCE_ALEXNET_TOP1
    from infomax.eval.main import add_deltas, alexnet_reference

    rows = [{"kind": "ours", "top1": 0.8, "export_sha256": "a"}, {"kind": "ours", "top1": 0.7, "export_sha256": "b"},
            {"kind": "random_init", "top1": 0.3, "export_sha256": "a"}, {"kind": "raw_pixels", "top1": 0.5},
            {"kind": "supervised_encoder", "top1": 0.9, "export_sha256": "a"},
            {"kind": "supervised_encoder", "top1": 0.6, "export_sha256": "b"}]
    add_deltas(rows, None)
    deltas = [r["delta_vs_supervised"] for r in rows]
    assert deltas[:3] == pytest.approx([-0.1, 0.1, -0.6]) and deltas[3:] == [None] * 3
    assert all(r["delta_vs_alexnet"] is None for r in rows)
    published = EvalConfig(dataset="fashion_mnist")
    published.baselines.published = True
    assert alexnet_reference(published, rows) == (None, False)  # no ImageNet figure as the reference here
    published.dataset = "imagefolder"
    assert alexnet_reference(published, rows) == (REFERENCE_ALEXNET_TOP1, True)
    measured = [*rows, {"kind": "alexnet_supervised", "top1": 0.55}]
    assert alexnet_reference(published, measured) == (0.55, False)


def test_a_partial_eval_leaves_the_model_card_and_a_read_only_card_is_a_note(export_dir: Path, tmp_path: Path,
                                                                              capsys, monkeypatch) -> None:
    """A quick eval (limit_train/limit_test) or a recipe's validation split replaced the card's scores of the whole
    test split; a card that could not be written failed the eval after every row was scored."""
    import infomax.export.model_card
    from infomax.export.model_card import CARD, add_eval

    add_eval(export_dir, "| run | ours | whole test split |", "On synthetic.", tmp_path / "report.md")
    code, out, err = eval_in_process(capsys, f"weights={export_dir}", f"out={tmp_path / 'quick'}", "limit_train=48",
                                     "precision=no")
    assert code == 0, err[-2000:]
    assert "the model card(s) are left as they are: this eval scored limit_train=48" in out
    assert "| run | ours | whole test split |" in (export_dir / CARD).read_text()

    def read_only(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(infomax.export.model_card, "write_atomically", read_only)
    code, out, err = eval_in_process(capsys, f"weights={export_dir}", f"out={tmp_path / 'whole'}", "precision=no")
    assert code == 0 and (tmp_path / "whole" / "report.json").is_file(), err[-2000:]
    assert f"note: the model card in '{export_dir}' was not updated (Permission denied)" in out
