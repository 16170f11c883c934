"""The one configuration schema: typed dataclasses, merged from YAML and `key=value` overrides.

Every field has a default, a type and a one-line help text (``field(metadata={"help": ...})``);
the README's config reference is generated from these (``python -m pretrain.config``) and a test
keeps it in sync. YAML files in ``configs/`` hold only differences from these defaults.

Errors a user can cause (unknown key, wrong type, impossible value, missing data) raise
:class:`ConfigError` with one line that names the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError
from ruamel.yaml import YAML, YAMLError

# The one YAML reader of config files, overrides and saved configs: YAML 1.2, where only true/false are
# booleans (YAML 1.1, which PyYAML and OmegaConf read, turns an unquoted no/off/yes/on into one, so
# run.precision=no became 'False'), 1e-3 is a float, and a key given twice is an error.
YAML_1_2 = YAML(typ="safe", pure=True)


class ConfigError(ValueError):
    """A configuration a user wrote that cannot run; the message is one line with the fix."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default (copied when mutable) and a one-line help text."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Each list of choices, written once: validation, the help texts (so the README's reference) and the
# registries (datasets, critics) all follow it. choice -> what it means ("" when its name says it).
CHOICE_HELP: dict[str, dict[str, str]] = {
    "run.precision": {"auto": "the hardware decides (bf16 on GPUs that have it, else fp16; bf16 on CPUs with native "
                              "bf16, else fp32); accelerate launch's bf16/fp16 is taken",
                      "no": "", "bf16": "", "fp16": ""},
    "run.resume": {"auto": "continue from the newest readable checkpoint; stop if every one is damaged",
                   "never": "start afresh, moving the existing checkpoints aside"},
    "data.dataset": {"fashion_mnist": "", "imagefolder": "", "synthetic": ""},
    "data.format": {"torchvision": "decode with PIL/torchvision", "ffcv": "read data.path, a .beton: the fast path"},
    "data.augment": {"loader": "torchvision, per image in the loader workers",
                     "batch": "whole batch at once on the training device, every recipe step; same-size images (FFCV "
                              "crops while decoding, and its colour steps are batched either way)"},
    "data.colour_split": {"none": "", "lab": "split each RGB view into an L view (1 channel) and an ab view "
                                             "(2 channels), on device (CMC)"},
    "objective.name": {"contrastive": "a critic between view pairs, CMC/SimCLR", "amdim": "", "dim": ""},
    "objective.bound": {"infonce": "", "nwj": "", "dv": "", "mine": "", "js": "", "smile": ""},
    "objective.graph": {"full": "all pairs", "core": "view 0 against each other view, as in CMC"},
    "objective.critic": {"cosine": "/ temperature", "dot": "", "bilinear": "learned W", "concat": "joint MLP"},
    "optim.optimizer": {"sgd": "", "adamw": "", "lars": ""},
    "optim.lr_scaling": {"none": "optim.lr as given", "linear": "optim.lr x global batch / 256",
                         "sqrt": "optim.lr x sqrt(global batch / 256), SimCLR, MoCo"},
}
CHOICES: dict[str, tuple[str, ...]] = {key: tuple(choices) for key, choices in CHOICE_HELP.items()}


def choices_help(key: str, table: dict[str, dict[str, str]] = CHOICE_HELP) -> str:
    """``a (what a means) | b | ...`` for the choices of ``key`` in ``table``."""
    return " | ".join(f"{c} ({d})" if d else c for c, d in table[key].items())


def _choice(key: str, default: str, lead: str = "", tail: str = "") -> Any:
    """A field whose value is one of ``CHOICES[key]``; its help text lists them."""
    return _f(default, f"{lead}{choices_help(key)}{tail}")


@dataclass
class RunConfig:
    dir: str = _f("runs/default", "run directory: config.yaml, tb/, checkpoints/, export/; re-running with the same "
                                  "dir resumes")
    seed: int = _f(0, "base seed; each process uses seed + rank")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = run all epochs); for smoke runs")
    precision: str = _choice("run.precision", "auto", "mixed precision: ")
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms); exact resume on CPU")
    dist_timeout_min: float = _f(60, "minutes a rank waits in a collective before the job aborts; longer than any "
                                     "rank-0-only work (writing a checkpoint, the export)")
    log_every: int = _f(10, "optimizer steps between TensorBoard scalar writes (metrics reduced across ranks)")
    checkpoint_every: int = _f(500, "optimizer steps between checkpoints (also saved at each epoch end and on "
                                    "SIGTERM/SIGUSR1/SIGUSR2)")
    keep_checkpoints: int = _f(3, "how many most recent checkpoints to keep")
    export: bool = _f(True, "write export/encoder.safetensors + config.json at the end")
    resume: str = _choice("run.resume", "auto")


@dataclass
class ViewConfig:
    size: int = _f(32, "output side length in pixels of this view")
    crop_scale_min: float = _f(0.2, "random resized crop: smallest area fraction")
    crop_scale_max: float = _f(1.0, "random resized crop: largest area fraction")
    flip_p: float = _f(0.5, "probability of a horizontal flip")
    jitter_p: float = _f(0.8, "probability of colour jitter")
    brightness: float = _f(0.4, "colour jitter brightness strength")
    contrast: float = _f(0.4, "colour jitter contrast strength")
    saturation: float = _f(0.4, "colour jitter saturation strength (ignored for 1-channel data)")
    hue: float = _f(0.1, "colour jitter hue strength (ignored for 1-channel data)")
    gamma: float = _f(0.0, "random gamma strength, with the jitter: x ** g, log g ~ U(+-log(1 + gamma)); bends the "
                           "grey-level histogram, which brightness and contrast only shift and stretch (0 = off)")
    tone: float = _f(0.0, "random tone curve strength, with the jitter (after gamma): a monotone piecewise-linear map "
                          "of [0, 1] onto itself whose 4 segments' slopes are scaled by log-uniform factors in [1/(1 "
                          "+ tone), 1 + tone], then renormalised; bends the histogram in ways one gamma cannot (0 = "
                          "off)")
    grayscale_p: float = _f(0.2, "probability of converting to grayscale (ignored for 1-channel data)")
    blur_p: float = _f(0.0, "probability of Gaussian blur")
    blur_sigma_max: float = _f(2.0, "largest Gaussian blur sigma (smallest is 0.1)")
    solarize_p: float = _f(0.0, "probability of solarizing, after the blur (BYOL: 0 on one view, 0.2 on the other): "
                                "pixels at or above half of full scale become 1 - x; unlike gamma and tone it is not "
                                "monotone")


@dataclass
class DataConfig:
    dataset: str = _choice("data.dataset", "synthetic", tail=" (pretrain.data.datasets.REGISTRY)")
    root: str = _f("", "dataset directory; empty = the dataset's default (Fashion-MNIST: "
                       "/usr/share/datasets/fashion-mnist)")
    num_workers: int = _f(2, "DataLoader worker processes per training process (FFCV: decoding threads)")
    format: str = _choice("data.format", "torchvision")
    path: str = _f("", "ffcv: the .beton file (python -m pretrain.data.beton ... --out train.beton)")
    os_cache: bool = _f(True, "ffcv: read through the OS page cache (false: ffcv's own process cache)")
    batches_ahead: int = _f(3, "ffcv: batches prepared ahead of the training step")
    augment: str = _choice("data.augment", "loader")
    synthetic_size: int = _f(2048, "synthetic: number of training images")
    synthetic_classes: int = _f(8, "synthetic: number of latent classes the images are drawn from")
    synthetic_image_size: int = _f(32, "synthetic: side length of the drawn images")
    colour_split: str = _choice("data.colour_split", "none")
    limit: int = _f(0, "use only the first N training images (0 = all)")
    holdout: int = _f(0, "hold N evenly spaced training images out as a validation split: never trained on, the kNN "
                         "monitor's queries, scored by eval holdout=N (choose recipes there, not on the test split)")
    views: list[ViewConfig] = _f([ViewConfig(), ViewConfig()], "one augmentation recipe per view; V = len(views) >= 2 "
                                                               "(>= 1 with colour_split=lab)")


@dataclass
class ModelConfig:
    arch: str = _f("resnet18", "any timm encoder name (timm.create_model(arch, num_classes=0))")
    small_input: bool = _f(True, "small-image stem for images of 64 px and below (ResNets): 3x3 first conv, no "
                                 "max-pool")
    stem_stride: int = _f(1, "small_input: stride of the first conv (1: stage 1 at full resolution; 2: half, ~4x "
                             "cheaper)")
    width: float = _f(1.0, "ResNets: scale every stage's channels (and a deep stem's) by this; 0.5 is ~3.5x cheaper "
                           "on small images")
    head_dims: list[int] = _f([512, 128], "projection MLP widths after the encoder feature: hidden..., output")
    head_bn: bool = _f(True, "BatchNorm between the projection head's hidden layers")
    shared_head: bool = _f(True, "one projection head for all views (false: one per view)")
    encoder_per_view: bool = _f(False, "a separate encoder per view (CMC); false: one shared encoder")
    channels_last: bool = _f(False, "channels_last memory format (faster convs on GPUs with bf16/fp16)")
    momentum: float = _f(0.99, "objective.queue_size > 0: EMA coefficient of the momentum (key) encoder and head, "
                               "MoCo's m")
    shuffle_bn: int = _f(0, "objective.queue_size > 0: MoCo's shuffling BN (its Sec. 3.3): the momentum model "
                            "computes the keys of a random permutation of the global batch in groups, each on its own "
                            "BatchNorm statistics, so a query and its positive key rarely share them. On several "
                            "processes (model.sync_bn=false) each process splits its share of the shuffled batch into "
                            "this many groups (1 = MoCo's _batch_shuffle_ddp); on one process its batch (2 or more, "
                            "MoCo's SplitBatchNorm demo); 0 = off")
    sync_bn: bool = _f(True, "BN statistics over the global batch with several processes: SyncBatchNorm on GPUs "
                             "(timm's conversion, which keeps BatchNormAct2d's activation), our GlobalBatchNorm on "
                             "CPU ranks")


@dataclass
class ObjectiveConfig:
    name: str = _choice("objective.name", "contrastive", "training objective: ")
    bound: str = _choice("objective.bound", "infonce", "MI lower bound maximised: ", " (see README: Objectives and "
                                                                                     "bounds)")
    graph: str = _choice("objective.graph", "full", "which view pairs: ")
    critic: str = _choice("objective.critic", "cosine", "contrastive: ")
    temperature: float = _f(0.1, "temperature of the cosine critic: score = cos(z_a, z_b) / temperature")
    queue_size: int = _f(0, "contrastive: keys from a momentum model (model.momentum) plus a queue of this many past "
                            "keys per view, MoCo v2 (0 = off: in-batch keys)")
    nn_support_size: int = _f(0, "contrastive, in-batch keys: NNCLR, each query replaced by its nearest neighbour "
                                 "among this many past view-0 embeddings (0 = off)")
    intra_view_negatives: bool = _f(False, "contrastive, in-batch keys: also score each query against the other "
                                           "images of its own view (SimCLR's NT-Xent: 2N-2 negatives for 2 views)")
    debias_tau_plus: float = _f(0.0, "contrastive, infonce bound, cosine critic: train on debiased InfoNCE (Chuang et "
                                     "al. 2020); the expected share of negatives from the query's own class, e.g. 0.1 "
                                     "for 10 balanced classes (0 = off; MI is still read out by InfoNCE)")
    smile_tau: float = _f(5.0, "SMILE: clip the scores to [-tau, tau] inside the log-mean-exp")
    mine_ema: float = _f(0.1, "MINE: update weight of the moving average of the denominator")
    local_stages: list[int] = _f([3, 4], "amdim/dim: timm stage indices of the two local feature maps "
                                         "(forward_intermediates)")
    amdim_tclip: float = _f(20.0, "amdim: soft clipping of scores, tclip * tanh(s / tclip)")
    amdim_reg: float = _f(0.05, "amdim: weight of the mean squared raw score regulariser")


@dataclass
class OptimConfig:
    epochs: float = _f(10, "training epochs; a fraction ends the last one early (the cosine schedule spans the whole "
                           "run)")
    batch_size_per_process: int = _f(256, "images per process per step (global batch = this x processes)")
    optimizer: str = _choice("optim.optimizer", "lars", tail=" (timm.optim.create_optimizer_v2)")
    lr: float = _f(0.3, "peak learning rate (after warmup); per 256 images of global batch when optim.lr_scaling is "
                        "not none")
    lr_scaling: str = _choice("optim.lr_scaling", "none", tail="; the effective lr is printed at start")
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule")
    weight_decay: float = _f(1e-6, "weight decay (not applied to biases and norm layers)")
    momentum: float = _f(0.9, "momentum for sgd and lars")
    warmup_epochs: float = _f(1.0, "linear warmup epochs, fractions allowed (stepped per optimizer step)")
    grad_clip: float = _f(0.0, "max global gradient norm (0 = no clipping; the norm is logged either way)")
    skip_nonfinite: bool = _f(False, "skip steps whose loss is NaN/inf (counted) instead of stopping the run")


@dataclass
class MonitorConfig:
    knn_every: int = _f(1, "run the online kNN monitor every N epochs (0 = never)")
    knn_k: int = _f(20, "neighbours of the online kNN monitor")
    knn_temperature: float = _f(0.07, "temperature of the kNN monitor's weighted votes")
    knn_bank: int = _f(5000, "labelled training images in the kNN memory bank")
    knn_queries: int = _f(1000, "labelled held-out images classified by the kNN monitor")
    online_probe: bool = _f(True, "train a linear classifier on detached encoder features with labels (never reaching "
                                  "the encoder); scored with the kNN monitor")
    online_probe_lr: float = _f(1e-3, "online probe: AdamW learning rate (its own optimizer, no weight decay)")
    expect_eval: str = _f("", "an eval config that will run on the export after this pretraining, as make demo runs "
                              "configs/probe_fmnist.yaml: the expected-duration line after the first steps then "
                              "reckons it too, for the whole duration ('' = the pretraining alone)")


@dataclass
class Config:
    run: RunConfig = _f(RunConfig(), "run settings")
    data: DataConfig = _f(DataConfig(), "data settings")
    model: ModelConfig = _f(ModelConfig(), "model settings")
    objective: ObjectiveConfig = _f(ObjectiveConfig(), "objective settings")
    optim: OptimConfig = _f(OptimConfig(), "optimizer settings")
    monitor: MonitorConfig = _f(MonitorConfig(), "online kNN monitor settings")


def _valid_keys(node_path: str, schema: type | None = None) -> list[str]:
    """Field names of the dataclass at a dotted path ('' = top level; list indices are skipped)."""
    cls: Any = schema or Config
    for part in filter(lambda p: p and not p.isdigit(), node_path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or fields[part].default_factory is dataclasses.MISSING:
            return []
        default = fields[part].default_factory()
        cls = type(default[0]) if isinstance(default, list) and default else type(default)
        if not dataclasses.is_dataclass(cls):
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _explain(err: OmegaConfBaseException, source: str, schema: type | None = None) -> ConfigError:
    key = re.sub(r"\[(\d+)\]", r".\1", getattr(err, "full_key", None) or "?")  # views[0].x -> views.0.x
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = ", ".join(_valid_keys(parent, schema))
        where = f"under '{parent}'" if parent else "at the top level"
        return ConfigError(f"unknown config key '{key}' (from {source}); valid keys {where}: {valid}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' (from {source}): {msg}")
    return ConfigError(f"config error at '{key}' (from {source}): {str(err).splitlines()[0]}")


def load_config(path: str | None = None, overrides: Sequence[str] = (), schema: type | None = None,
                check: Any = None) -> Any:
    """Defaults <- YAML file <- dotted overrides, checked against the schema, then validated.

    ``schema``/``check`` default to the pretraining :class:`Config` and :func:`validate`; the eval
    stage passes its own.
    """
    schema, check = schema or Config, check or validate
    cfg = OmegaConf.structured(schema)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found; pass --config configs/<name>.yaml (see configs/)")
        loaded = _load_yaml(p)
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, path, schema) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value, e.g. optim.lr=0.3")
        key, value = item.split("=", 1)
        try:
            parsed = YAML_1_2.load(value)
        except YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({yaml_problem(e)}); quote it or "
                              "fix the brackets, e.g. model.head_dims=[512,128]") from None
        _check_list_index(cfg, key.strip(), item)
        try:
            OmegaConf.update(cfg, key.strip(), parsed, merge=True)
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'", schema) from None
    config = OmegaConf.to_object(cfg)
    check(config)
    return config


def _check_list_index(cfg: DictConfig, key: str, item: str) -> None:
    """``data.views.5.size`` with two views names the views there are (OmegaConf's own message does not)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if not parts[i].isdigit():
            continue
        parent = ".".join(parts[:i])
        items = OmegaConf.select(cfg, parent, default=None)
        if isinstance(items, ListConfig) and int(parts[i]) >= len(items):
            n = len(items)
            numbered = {0: "none yet", 1: "numbered 0", 2: "numbered 0 and 1"}.get(n, f"numbered 0 to {n - 1}")
            example = "[{size: 16}, {size: 16}]" if parent == "data.views" else "[...]"
            raise ConfigError(f"override '{item}': '{parent}' has {n} entries ({numbered}); set an existing one, "
                              f"or give the whole list, e.g. {parent}={example}")


def yaml_problem(e: YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def _load_yaml(path: Path) -> DictConfig:
    """A config file as a mapping (:data:`YAML_1_2`, which also rejects duplicate keys)."""
    try:
        loaded = YAML_1_2.load(path)
    except YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(loaded, dict):
        kind = {list: "list", type(None): "nothing"}.get(type(loaded), type(loaded).__name__)
        raise ConfigError(f"config file '{path}' holds a {kind}, not a mapping of sections; write it as keys such "
                          "as 'optim:' with settings under them")
    return OmegaConf.create(loaded)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"bad value for config key '{key}': {message}")


def validate(c: Config) -> None:
    """Reject impossible values with one line naming the key and what is allowed."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        _require(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")
    o, d, r, m = c.optim, c.data, c.run, c.model
    _require(d.format != "ffcv" or bool(d.path), "data.path",
             "data.format=ffcv reads a .beton: give data.path=train.beton (write it with python -m "
             "pretrain.data.beton)")
    _require(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be a finite number > 0, got {o.lr}")
    _require(o.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {o.min_lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(math.isfinite(o.epochs) and o.epochs > 0, "optim.epochs", f"must be a finite number > 0, got {o.epochs}")
    _require(math.isfinite(o.warmup_epochs), "optim.warmup_epochs", f"must be finite, got {o.warmup_epochs}")
    _require(r.dist_timeout_min > 0, "run.dist_timeout_min", f"must be > 0, got {r.dist_timeout_min}")
    _require(0 <= r.seed < 2**31, "run.seed", f"must be in [0, 2**31), as numpy's generators need, got {r.seed}")
    _require(o.batch_size_per_process >= 2, "optim.batch_size_per_process",
             f"must be >= 2 (InfoNCE needs negatives), got {o.batch_size_per_process}")
    _require(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    lab = d.colour_split == "lab"
    _require(len(d.views) >= (1 if lab else 2), "data.views",
             f"needs at least {1 if lab else 2} view recipes, got {len(d.views)}")
    _require(not lab or d.dataset != "fashion_mnist", "data.colour_split", "lab needs RGB data, Fashion-MNIST is "
                                                                           "grayscale")
    _require(not lab or m.encoder_per_view, "model.encoder_per_view",
             "must be true with data.colour_split=lab: the L and ab encoders see 1 and 2 channels")
    for i, v in enumerate(d.views):
        k = f"data.views.{i}"
        _require(v.size >= 8, f"{k}.size", f"must be >= 8 pixels, got {v.size}")
        _require(0 < v.crop_scale_min <= v.crop_scale_max <= 1, f"{k}.crop_scale_min",
                 f"need 0 < crop_scale_min <= crop_scale_max <= 1, got {v.crop_scale_min}..{v.crop_scale_max}")
        for p in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _require(0 <= getattr(v, p) <= 1, f"{k}.{p}", f"is a probability in [0, 1], got {getattr(v, p)}")
        _require(v.blur_sigma_max >= 0.1, f"{k}.blur_sigma_max", "must be >= 0.1 (the smallest sigma), got "
                                                                 f"{v.blur_sigma_max}")
        for strength in ("gamma", "tone"):
            _require(getattr(v, strength) >= 0, f"{k}.{strength}", "must be >= 0 (0 = off), got "
                                                                   f"{getattr(v, strength)}")
    _require(d.augment == "loader" or d.format == "ffcv" or d.dataset != "imagefolder", "data.augment",
             "batch needs same-size images: fashion_mnist, synthetic, or a .beton (data.format=ffcv); use loader")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(d.limit >= 0, "data.limit", f"must be >= 0, got {d.limit}")
    _require(d.holdout >= 0, "data.holdout", f"must be >= 0, got {d.holdout}")
    _require(not d.holdout or d.format != "ffcv", "data.holdout",
             "a .beton holds every image it was written with; hold images out with data.format=torchvision")
    _require(d.synthetic_classes >= 2, "data.synthetic_classes", f"must be >= 2, got {d.synthetic_classes}")
    _require(0 < m.width <= 4, "model.width", f"must be in (0, 4], got {m.width}")
    _require(m.stem_stride in (1, 2), "model.stem_stride", f"must be 1 or 2, got {m.stem_stride}")
    _require(len(m.head_dims) >= 1 and min(m.head_dims) >= 1, "model.head_dims",
             f"needs at least one positive width, got {m.head_dims}")
    _require(c.objective.smile_tau > 0, "objective.smile_tau", f"must be > 0, got {c.objective.smile_tau}")
    _require(0 < c.objective.mine_ema <= 1, "objective.mine_ema", f"must be in (0, 1], got {c.objective.mine_ema}")
    ob = c.objective
    if ob.name in ("amdim", "dim"):
        _require(len(ob.local_stages) == 2, "objective.local_stages", f"needs two stage indices, got {ob.local_stages}")
        _require(len(d.views) == 2 and not lab, "data.views", f"{ob.name} uses exactly 2 RGB/gray views, got "
                                                              f"{len(d.views)}")
        _require(ob.name != "dim" or ob.bound in ("infonce", "nwj", "dv", "js", "smile"), "objective.bound",
                 f"dim supports infonce, nwj, dv, js, smile, got {ob.bound}")
    _require(ob.queue_size >= 0, "objective.queue_size", f"must be >= 0, got {ob.queue_size}")
    _require(ob.queue_size == 0 or ob.name == "contrastive", "objective.queue_size",
             f"the momentum queue works with objective.name=contrastive, not {ob.name}; set objective.queue_size=0")
    for key, on in (("intra_view_negatives", ob.intra_view_negatives), ("nn_support_size", ob.nn_support_size)):
        _require(not on or (ob.name == "contrastive" and ob.queue_size == 0), f"objective.{key}",
                 "works with objective.name=contrastive and in-batch keys (objective.queue_size=0) only")
    _require(not (ob.intra_view_negatives and ob.nn_support_size), "objective.intra_view_negatives",
             "cannot be combined with objective.nn_support_size: NNCLR's anchor is the query's support-set neighbour, "
             "the intra-view negatives' the query itself, so one softmax row would mix two anchors; set one of them "
             "off")
    _require(0 <= ob.debias_tau_plus < 1, "objective.debias_tau_plus", f"must be in [0, 1), got {ob.debias_tau_plus}")
    _require(not ob.debias_tau_plus or (ob.name, ob.bound, ob.critic) == ("contrastive", "infonce", "cosine"),
             "objective.debias_tau_plus", "debiases InfoNCE with the cosine critic's score floor: it needs "
             f"objective.name=contrastive, bound=infonce, critic=cosine (got {ob.name}, {ob.bound}, {ob.critic})")
    _require(ob.nn_support_size >= 0, "objective.nn_support_size", f"must be >= 0, got {ob.nn_support_size}")
    _require(0 <= m.momentum < 1, "model.momentum", f"must be in [0, 1), got {m.momentum}")
    _require(m.shuffle_bn >= 0, "model.shuffle_bn", f"must be >= 0 (0 = off), got {m.shuffle_bn}")
    _require(not m.shuffle_bn or ob.queue_size > 0, "model.shuffle_bn",
             "shuffles the momentum model's BatchNorm, so it needs the queue: set objective.queue_size, or "
             "model.shuffle_bn=0")
    _require(not m.shuffle_bn or c.optim.batch_size_per_process >= 2 * m.shuffle_bn, "model.shuffle_bn",
             f"{m.shuffle_bn} groups of optim.batch_size_per_process={c.optim.batch_size_per_process} leave fewer than "
             "2 images for some group's BatchNorm statistics; use fewer groups")
    _require(c.objective.temperature > 0, "objective.temperature", f"must be > 0, got {c.objective.temperature}")
    _require(r.max_steps >= 0, "run.max_steps", f"must be >= 0, got {r.max_steps}")
    _require(r.log_every >= 1, "run.log_every", f"must be >= 1, got {r.log_every}")
    _require(r.checkpoint_every >= 1, "run.checkpoint_every", f"must be >= 1, got {r.checkpoint_every}")
    _require(r.keep_checkpoints >= 1, "run.keep_checkpoints", f"must be >= 1, got {r.keep_checkpoints}")
    mo = c.monitor
    _require(mo.knn_k >= 1, "monitor.knn_k", f"must be >= 1, got {mo.knn_k}")
    _require(mo.knn_every >= 0, "monitor.knn_every", f"must be >= 0 (0 = monitor off), got {mo.knn_every}")
    for key in ("knn_bank", "knn_queries"):
        _require(mo.knn_every == 0 or getattr(mo, key) >= 1, f"monitor.{key}",
                 f"must be >= 1 while the monitor is on, got {getattr(mo, key)}; set monitor.knn_every=0 to turn it "
                 "off")


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """The peak lr the optimizer gets: ``optim.lr`` scaled by the global batch per ``optim.lr_scaling``,
    so one config is right for any number of processes."""
    ratio = global_batch / 256
    return optim.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[optim.lr_scaling]


def to_yaml(c: Any) -> str:
    """A resolved config (the pretraining's, or the eval's) as YAML: run.dir/config.yaml, TensorBoard,
    the eval's report and fit keys, the job scripts."""
    return OmegaConf.to_yaml(OmegaConf.structured(c))


def from_yaml(text: str) -> Config:
    """Inverse of :func:`to_yaml` (used for checkpoints and exports). A config with a key this version
    does not know was written by an older one: refused in one line (CHANGELOG.md lists the renames)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(YAML_1_2.load(text) or {}))
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"a saved config has the key '{key}', which this version of infomax does not know: it was "
                          "written by an older version (CHANGELOG.md); start a new run.dir") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the table cell


def reference_markdown() -> str:
    """The README's config reference table, generated from the dataclasses."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(Config):
        cls = type(section.default_factory())  # type: ignore[misc]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if f.name == "views":
                default = "2 x ViewConfig()"
            lines.append(f"| `{section.name}.{f.name}` | `{default}` | {_cell(f.metadata['help'])} |")
    lines += ["", "Each entry of `data.views` is a view recipe (`data.views.0.size=64`):", "",
              "| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(ViewConfig):
        lines.append(f"| `data.views.N.{f.name}` | `{f.default}` | {_cell(f.metadata['help'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
