"""Bad configuration fails at start with one readable line and a non-zero exit (docs/DESIGN.md, invariant 6)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, main_in_process, pretrain_in_process, run_main
from infomax.config.pretrain import Config, ConfigError, load_config, reference_markdown


def test_defaults_and_file_and_overrides_merge() -> None:
    cfg = load_config(str(REPO / "configs" / "synthetic_tiny.yaml"), ["optim.lr=0.5", "data.views.1.size=24"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 0.5 and cfg.data.views[1].size == 24 and cfg.data.views[0].size == 16
    assert cfg.model.arch == "test_resnet" and cfg.optim.weight_decay == Config().optim.weight_decay


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr'.*valid keys under 'optim':.*\blr\b"),
        ("bogus.x=1", r"unknown config key 'bogus'"),
        ("data.views.0.sise=3", r"unknown config key 'data.views.0.sise'.*valid keys under 'data.views.0':.*\bsize\b"),
        ("optim.lr=fast", r"bad value for config key 'optim.lr'"),
        ("optim.lr=-1", r"'optim.lr': must be a finite number > 0"),
        ("optim.batch_size_per_process=1", r"'optim.batch_size_per_process'"),
        ("data.views=[]", r"'data.views': needs at least 2"),
        ("data.dataset=cifar", r"'data.dataset': 'cifar' is not one of fashion_mnist, imagefolder, synthetic"),
        ("run.precision=fp8", r"'run.precision'.*auto, no, bf16, fp16"),
        ("optim.lr", r"not key=value"),
        ("data.colour_split=lab", r"'model.encoder_per_view': must be true with data.colour_split=lab"),
        ("objective.graph=star", r"'objective.graph': 'star' is not one of full, core"),
        ("objective.queue_size=-1", r"'objective.queue_size': must be >= 0"),
        ("model.momentum=1.0", r"'model.momentum': must be in \[0, 1\)"),
        ("model.stem_stride=3", r"'model.stem_stride': '3' is not one of 1, 2"),
        ("data.views.1.gamma=-0.5", r"'data.views.1.gamma': must be >= 0"),
        ("data.views.0.tone=-1", r"'data.views.0.tone': must be >= 0"),
        ("data.views.0.blur_sigma_max=0.05", r"'data.views.0.blur_sigma_max': must be >= 0.1"),
        ("data.views.1.solarize_p=1.5", r"'data.views.1.solarize_p': must be in \[0, 1\], got 1.5"),
        ("data.augment=gpu", r"'data.augment': 'gpu' is not one of loader, batch"),
        ("optim.batch_size=64", r"unknown config key 'optim.batch_size'.*batch_size_per_process"),  # renamed: CHANGELOG
    ],
)
def test_bad_values_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_a_range_declared_in_field_metadata_is_refused_with_its_key() -> None:
    """Bounds, lengths and choices are declared once on the field (``_f(..., gt=0)``) and checked by one loop
    through nested configs and lists of them: a schema of its own gets the same checks with no code of its own."""
    from dataclasses import dataclass

    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import _f, check_fields

    @dataclass
    class Inner:
        rate: float = _f(0.5, "a rate", gt=0, le=1)

    @dataclass
    class Outer:
        scale: float = _f(1.0, "a scale", gt=0)
        widths: list[int] = _f([4], "widths", min_len=1, ge=1)
        mode: str = _f("a", "a mode", choices=("a", "b"))
        inner: Inner = _f(Inner(), "nested")
        items: list[Inner] = _f([Inner(), Inner()], "a list of nested configs")

    check_fields(Outer())
    for change, pattern in [
        ({"scale": 0}, r"^bad value for config key 'scale': must be > 0, got 0$"),
        ({"widths": []}, r"'widths': needs at least 1 entry, got \[\]"),
        ({"widths": [4, 0]}, r"'widths': needs values >= 1, got \[4, 0\]"),
        ({"mode": "c"}, r"'mode': 'c' is not one of a, b"),
        ({"inner": Inner(rate=1.5)}, r"'inner.rate': must be in \(0, 1\], got 1.5"),
        ({"items": [Inner(), Inner(rate=0.0)]}, r"'items.1.rate': must be in \(0, 1\], got 0.0"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            check_fields(Outer(**change))
    with pytest.raises(ConfigError, match=r"'objective.temperature': must be > 0, got 0.0"):
        load_config(None, ["objective.temperature=0"])  # declared gt=0 on the field, checked by validate's loop
    with pytest.raises(ConfigError, match=r"'baselines.alexnet_probe_size': must be >= 64, got 32"):
        load_config(None, ["weights=[x]", "baselines.alexnet_probe_size=32"], schema=EvalConfig, check=validate_eval)


def test_nnclr_with_intra_view_negatives_is_refused() -> None:
    """NNCLR's anchor is the support-set neighbour, the intra-view negatives' the query: one row, two anchors."""
    load_config(None, ["objective.nn_support_size=64"])
    load_config(None, ["objective.intra_view_negatives=true"])
    with pytest.raises(ConfigError, match=r"'objective.intra_view_negatives': cannot be combined with objective.nn_"):
        load_config(None, ["objective.nn_support_size=64", "objective.intra_view_negatives=true"])


def test_debiased_infonce_needs_the_infonce_bound_and_cosine_critic() -> None:
    assert load_config(None, ["objective.debias_tau_plus=0.1"]).objective.debias_tau_plus == 0.1
    with pytest.raises(ConfigError, match=r"'objective.debias_tau_plus': debiases InfoNCE .*got contrastive, nwj, cosine"):
        load_config(None, ["objective.debias_tau_plus=0.1", "objective.bound=nwj"])
    with pytest.raises(ConfigError, match=r"'objective.debias_tau_plus': must be in \[0, 1\)"):
        load_config(None, ["objective.debias_tau_plus=1"])


def test_intra_view_negatives_and_nn_support_need_in_batch_keys() -> None:
    assert load_config(None, ["objective.intra_view_negatives=true"]).objective.intra_view_negatives
    with pytest.raises(ConfigError, match=r"'objective.intra_view_negatives': works with .*objective.queue_size=0"):
        load_config(None, ["objective.intra_view_negatives=true", "objective.queue_size=8"])
    with pytest.raises(ConfigError, match=r"'objective.nn_support_size': works with .*objective.queue_size=0"):
        load_config(None, ["objective.nn_support_size=1024", "objective.queue_size=8"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["optim.epochs=three"], "bad value for config key 'optim.epochs'"),
        (["data.dataset=imagefolder", "data.root=/nonexistent/imagenet"], "'/nonexistent/imagenet/train' does not "
                                                                          "exist"),
        (["data.dataset=fashion_mnist", "data.root=/nonexistent"], "Fashion-MNIST train files"),
        (["run.precision=fp16"], "fp16 needs a CUDA GPU"),
        (["data.dataset=imagefolder", "data.root=/tmp", "data.augment=batch"], "'data.augment': batch needs same-size "
                                                                               "images"),
        (["objective.name=amdim", "objective.queue_size=8"], "the momentum queue works with objective.name=contrastive"),
        (["data.dataset=fashion_mnist", "data.colour_split=lab", "model.encoder_per_view=true"],
         "'data.colour_split': lab needs RGB data, fashion_mnist has 1 channel(s)"),
        (["monitor.expect_eval=configs/probe_fmnist.yaml"],
         "'monitor.expect_eval': configs/probe_fmnist.yaml scores fashion_mnist, 1-channel images, but this run's "
         "encoder reads 3-channel synthetic images"),
        (["monitor.knn_bank=0"], "'monitor.knn_bank': must be >= 1 while the monitor is on"),
        (["monitor.knn_queries=0"], "'monitor.knn_queries': must be >= 1 while the monitor is on"),
        (["objective.name=dim", "objective.local_stages=[9,10]"], "'objective.local_stages': [10] is out of range"),
        (["model.head_dims=[64"], "override 'model.head_dims=[64': the value is not valid YAML"),
        (["model.shuffle_bn=2"], "'model.shuffle_bn': shuffles the momentum model's BatchNorm, so it needs the queue"),
        (["objective.queue_size=8", "model.shuffle_bn=1"], "'model.shuffle_bn': 1 group on one process is the batch"),
        (["monitor.expect_eval=nowhere.yaml"], "'monitor.expect_eval': 'nowhere.yaml' is not a file (looked in the "
                                               "working directory and in"),
        # torchvision's, torch's or timm's ValueError mid-start, or silently wrong figures
        (["data.views.0.hue=0.9"], "'data.views.0.hue': must be in [0, 0.5] (0.5 turns hues half-way round"),
        (["data.views.0.brightness=-1"], "'data.views.0.brightness': must be >= 0"),
        (["optim.momentum=-1"], "'optim.momentum': must be in [0, 1), got -1.0"),
        (["monitor.online_probe_lr=-1"], "'monitor.online_probe_lr': must be > 0"),
        (["monitor.knn_temperature=0"], "'monitor.knn_temperature': must be > 0"),
        (["data.synthetic_size=-5"], "'data.synthetic_size': must be >= 1"),
        # the defaults' synthetic images trained, the root unread
        (["data.root=/data/mine"], "'data.root': the synthetic images are drawn, not read from files: set "
                                   "data.dataset=imagefolder (or fashion_mnist) to use the images at /data/mine"),
    ],
)
def test_cli_errors_are_one_line_before_training(overrides: list[str], needle: str, run_dir: Path, capsys) -> None:
    code, _, err = main_in_process(capsys, f"run.dir={run_dir}", *overrides)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not run_dir.exists()  # nothing was started


def test_the_evals_root_for_the_synthetic_images_is_refused_too() -> None:
    from infomax.config.eval import EvalConfig, validate_eval

    with pytest.raises(ConfigError, match="'root': the synthetic images are drawn, not read from files: set "
                                          "dataset=imagefolder"):
        load_config(None, ["dataset=synthetic", "root=/data/mine", "weights=[x]"], schema=EvalConfig,
                    check=validate_eval)


def test_the_shipped_expect_eval_is_found_from_another_working_directory(tmp_path: Path, monkeypatch) -> None:
    """configs/fmnist_cpu.yaml names configs/probe_fmnist.yaml: started outside the checkout, the run was refused."""
    from infomax.eval.expected import load_expected_eval

    monkeypatch.chdir(tmp_path)
    plan = load_expected_eval("configs/probe_fmnist.yaml", str(tmp_path / "run" / "export"))
    assert plan.cfg.dataset == "fashion_mnist"


def test_a_min_lr_above_the_peak_lr_is_refused(run_dir: Path, capsys) -> None:
    """optim.min_lr=1 with optim.lr=0.1: the "cosine decay" climbed from the peak to the minimum."""
    code, _, err = main_in_process(capsys, f"run.dir={run_dir}", "optim.lr=0.1", "optim.min_lr=1")
    lines = err.strip().splitlines()
    assert code == 2 and lines == ["error: bad value for config key 'optim.min_lr': 1 is above the peak lr 0.1 "
                                   "(optim.lr after optim.lr_scaling), where the cosine ends; lower optim.min_lr"], err


@pytest.mark.parametrize("text, needle", [
    ("optim:\n  lr: [0.1\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3"),
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", 'is not valid YAML: found duplicate key "lr" with value "0.2" (original value: '
                                       '"0.1") at line 3'),
    ("- optim\n- run\n", "holds a list, not a mapping of sections"),
])
def test_broken_yaml_is_one_line(tmp_path: Path, text: str, needle: str, capsys) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    code, _, err = main_in_process(capsys, f"run.dir={tmp_path / 'run'}", config=config)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err[-2000:]


def test_missing_config_file_is_one_line_and_exit_2_from_the_real_process(run_dir: Path) -> None:
    """The process itself: its exit code and its stderr, nothing else (the in-process cases above check the rest)."""
    proc = run_main(f"run.dir={run_dir}", config=Path("configs/nope.yaml"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: config file 'configs/nope.yaml' not found; pass --config configs/<name>.yaml (see configs/)"]


def test_every_field_has_help_and_readme_reference_is_current() -> None:
    table = reference_markdown()
    assert all(re.search(r"\| [^|]+ \|$", row) for row in table.splitlines() if row.startswith("| `"))
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert table in reference, "docs/configuration.md is stale: paste the output of `python -m infomax.config.pretrain`"
    assert all(reference.count(row) == 1 for row in table.splitlines() if row.startswith("| `")), \
        "a key's row is in docs/configuration.md twice"


@pytest.mark.parametrize("override, pattern", [
    ("baselines.alexnet_optimizer=adam", r"'baselines.alexnet_optimizer': 'adam' is not one of sgd, adamw"),
    ("baselines.alexnet_warmup_steps=-1", r"'baselines.alexnet_warmup_steps': must be >= 0"),
    ("precision=fp8", r"'precision': 'fp8' is not one of auto, no, bf16, fp16"),
])
def test_bad_eval_values_name_the_key(override: str, pattern: str) -> None:
    from infomax.config.eval import EvalConfig, validate_eval

    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["weights=[runs/x/export]", override], schema=EvalConfig, check=validate_eval)


def test_lr_scaling_makes_one_config_right_for_any_process_count() -> None:
    from infomax.config.pretrain import effective_lr

    optim = load_config(None, ["optim.lr=0.3", "optim.lr_scaling=linear"]).optim
    assert effective_lr(optim, 2048) == pytest.approx(2.4) and effective_lr(optim, 512) == pytest.approx(0.6)
    optim.lr_scaling = "sqrt"
    assert effective_lr(optim, 1024) == pytest.approx(0.6)
    optim.lr_scaling = "none"
    assert effective_lr(optim, 2048) == pytest.approx(0.3)
    imagenet = load_config(str(REPO / "configs" / "imagenet_resnet50.yaml")).optim
    assert effective_lr(imagenet, 8 * imagenet.batch_size_per_process) == pytest.approx(2.4)  # what it hard-coded for 8 GPUs


def test_effective_lr_is_printed_and_used(run_dir: Path, capsys) -> None:
    proc = pretrain_in_process(capsys, f"run.dir={run_dir}", "optim.lr=0.4", "optim.lr_scaling=linear",
                               "optim.batch_size_per_process=32", "run.max_steps=1", "monitor.knn_every=0",
                               "optim.warmup_epochs=0")
    assert "lr 0.05: optim.lr 0.4 x linear scaling for a global batch of 32 (1 x 32)" in proc.stdout
    state = torch.load(next((run_dir / "checkpoints").glob("step_*")) / "state.pt", weights_only=True)
    assert state["scheduler"]["base_values"] == [pytest.approx(0.05)] * len(state["scheduler"]["base_values"])


def test_unquoted_no_is_the_precision_choice_not_false(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` as false; `run.precision=no` (and `precision: no` in a file) must still mean no,
    while a bool field still takes yes/no (OmegaConf's conversion)."""
    from infomax.config.eval import EvalConfig, validate_eval

    assert load_config(None, ["run.precision=no"]).run.precision == "no"
    (tmp_path / "c.yaml").write_text("run:\n  precision: no\n")
    assert load_config(str(tmp_path / "c.yaml")).run.precision == "no"
    assert load_config(None, ["weights=[x]", "precision=no"], schema=EvalConfig, check=validate_eval).precision == "no"
    assert load_config(None, ["model.channels_last=yes"]).model.channels_last is True


def test_fractional_epochs_end_the_run_and_its_cosine_schedule_together(run_dir: Path, capsys) -> None:
    """256 images / 32 = 8 steps per epoch: optim.epochs=1.5 is 12 steps, the lr at 0 after the last."""
    proc = pretrain_in_process(capsys, f"run.dir={run_dir}", "optim.epochs=1.5", "optim.warmup_epochs=0",
                               "monitor.knn_every=0")
    assert "step 12/12, epoch 1/1.5" in proc.stdout
    summary = json.loads((run_dir / "export" / "config.json").read_text())["summary"]
    assert summary["steps"] == 12 and summary["epochs_trained"] == 1.5
    state = torch.load(run_dir / "checkpoints" / "step_00000012" / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.1)


def test_every_list_of_choices_has_one_source() -> None:
    """CHOICES is the list; the dataset registry, the critics, the eval schema and each help text follow it."""
    import dataclasses

    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import CHOICES, Config, choices_help
    from infomax.data.datasets import REGISTRY
    from infomax.method.bounds import BOUNDS
    from infomax.method.critics import CRITICS

    assert tuple(REGISTRY) == CHOICES["data.dataset"] and CRITICS == CHOICES["objective.critic"]
    assert tuple(BOUNDS) == CHOICES["objective.bound"]  # the registry declares every bound the config offers
    for key in CHOICES:
        section, name = key.split(".")
        field = {f.name: f for f in dataclasses.fields(getattr(Config(), section))}[name]
        assert choices_help(key) in field.metadata["help"], key  # the help text lists them from CHOICES
    from infomax.config.eval import EVAL_CHOICES
    from infomax.eval.main import PROTOCOLS

    assert tuple(PROTOCOLS) == tuple(EVAL_CHOICES["protocol"])  # every protocol has its report description
    for key in EVAL_CHOICES:
        *section, name = key.split(".")
        node = getattr(EvalConfig(), section[0]) if section else EvalConfig()
        field = {f.name: f for f in dataclasses.fields(node)}[name]
        assert choices_help(key, EVAL_CHOICES) in field.metadata["help"], key
    with pytest.raises(ConfigError, match="'mnist' is not one of fashion_mnist, imagefolder, synthetic"):
        load_config(None, ["dataset=mnist", "weights=[x]"], schema=EvalConfig, check=validate_eval)


def test_artefacts_of_an_older_version_are_refused_in_one_line(tmp_path: Path) -> None:
    """No compatibility shims in a v0.1. A run dir whose config.yaml has a key this version does
    not know (optim.batch_size, renamed), a saved config with one, a checkpoint without a manifest and an export
    without the keys this version records are each said to come from an older version."""
    from infomax.config.pretrain import from_yaml, to_yaml
    from infomax.export.encoder import META, DamagedExport, read_meta
    from infomax.runtime.checkpoint import read_intact
    from infomax.runtime.run_dir import MARKER, RunDirError, check_run_dir

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "optim.batch_size_per_process=64"])
    old_yaml = to_yaml(cfg).replace("batch_size_per_process: 64", "batch_size: 64")
    with pytest.raises(ConfigError, match="the key 'optim.batch_size', which this version of infomax does not know"):
        from_yaml(old_yaml)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "state.pt").write_bytes(b"an old checkpoint")
    (run / "config.yaml").write_text("# git revision: old\n" + old_yaml)
    with pytest.raises(RunDirError, match="non-empty directory that infomax did not create .or an older version did"):
        check_run_dir(cfg)  # no marker file: runs of an older version were not marked
    (run / MARKER).write_text("")
    with pytest.raises(RunDirError, match=r"written by an older version of infomax .* has optim.batch_size, which"):
        check_run_dir(cfg)
    with pytest.raises(ValueError, match="no manifest.json: written by an older version"):
        read_intact(run / "checkpoints" / "step_00000004")
    # An export from before stem_stride and timm_kwargs were recorded is refused, not rebuilt with defaults.
    export = tmp_path / "export"
    export.mkdir()
    meta = {"architecture": "resnet18", "in_chans": 1, "input_size": [1, 28, 28], "mean": [0.5], "std": [0.5],
            "small_input": True, "num_features": 512, "sha256": "0" * 64}
    (export / META).write_text(json.dumps(meta))
    with pytest.raises(DamagedExport, match="lacks timm_kwargs, stem_stride: it was written by an older version of "
                                            "infomax, .*; re-export it: rerun the pretraining command on its run dir"):
        read_meta(export)
    (export / META).write_text(json.dumps({**meta, "timm_kwargs": {}, "stem_stride": 1}))
    assert read_meta(export)["stem_stride"] == 1


def test_a_checkpoint_part_laid_out_by_an_older_version_is_refused_in_one_line(tmp_path: Path) -> None:
    """The contrastive objective's queue moved under its candidates: a checkpoint whose objective
    state has the old layout (``queue.queue``) is refused in one line naming the keys, not loaded half."""
    from conftest import contrastive
    from infomax.runtime.checkpoint import PartMismatch, load_part

    objective = contrastive(0.2, queue_size=8, dim=4)
    old = {k.removeprefix("candidates."): v for k, v in objective.state_dict().items()}
    with pytest.raises(PartMismatch, match=r"step_4: its 'objective' state does not fit this version's \(missing "
                                           r"candidates.queue.queue.*not expected queue.queue.*older version"):
        load_part(objective, old, "objective", tmp_path / "step_4")
    load_part(objective, objective.state_dict(), "objective", tmp_path / "step_4")  # its own layout loads


def load_shipped(name: str):
    """configs/<name> under its stage's schema: the eval stage's for probe_*/baselines_* (a probe's exports come
    from the command line), pretraining's otherwise."""
    from infomax.config.eval import EvalConfig, validate_eval

    file = str(REPO / "configs" / name)
    if name.startswith(("probe_", "baselines_")):
        weights = ["weights=[runs/x/export]"] if name.startswith("probe_") else []
        return load_config(file, weights, schema=EvalConfig, check=validate_eval)
    return load_config(file, [])


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_validates(path: str) -> None:
    """A shipped config that fails its own validation would be the first thing a user runs into."""
    load_shipped(path)


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*imagenet*.yaml")))
def test_the_gpu_configs_save_by_time_only(path: str) -> None:
    """A step or epoch rule at ImageNet's global batch would save every minute or two, each save stalling every
    GPU for its copy, write and barrier: the shipped GPU configs save every 30 min of training (and when
    stopped, and at the end), pretraining and the probe's SGD fits alike."""
    cfg = load_shipped(path)
    rule = cfg.sgd if path.startswith("probe_") else cfg.run
    if not path.startswith("probe_"):
        assert not rule.save_at_epoch_end
    assert (rule.checkpoint_every, rule.checkpoint_every_min) == (0, 30)
