"""The one configuration schema: typed dataclasses, merged from YAML and `key=value` overrides.

Every field has a default, a type, a one-sentence help text and, where it has one, the range or the
choices it must lie in (``_f(0.1, "...", gt=0)``): :func:`check_fields` reads them all in one loop; only
rules that tie several keys together are written out in :func:`validate`. The README's config reference
is generated from the help texts (``python -m pretrain.config``) and a test keeps it in sync. YAML files
in ``configs/`` hold only differences from these defaults.

Errors a user can cause (unknown key, wrong type, impossible value, missing data) raise
:class:`ConfigError` with one line that names the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
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


def _f(default: Any, help: str, **check: Any) -> Any:
    """A dataclass field with a default (copied when mutable), a one-sentence help text and what
    :func:`check_fields` checks: bounds ``gt``/``ge``/``lt``/``le`` (of each entry, for a list), ``finite``,
    ``min_len`` (lists), ``choices``, and ``why``, a reason the bound's message gives."""
    metadata = {"help": help, **check}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# Each list of choices, written once: validation, the help texts (so the README's reference) and the
# registries (datasets, critics) all follow it. choice -> what it means ("" when its name says it).
CHOICE_HELP: dict[str, dict[str, str]] = {
    "run.precision": {"auto": "the hardware decides, unless accelerate launch gives bf16/fp16", "no": "", "bf16": "",
                      "fp16": ""},
    "run.resume": {"auto": "continue from the newest readable checkpoint; stop if every one is damaged",
                   "never": "start afresh, moving the existing checkpoints aside"},
    "data.dataset": {"fashion_mnist": "", "imagefolder": "", "synthetic": ""},
    "data.format": {"torchvision": "decode with PIL/torchvision", "ffcv": "read data.path, a .beton: the fast path"},
    "data.augment": {"loader": "torchvision, per image in the loader workers",
                     "batch": "the whole batch at once on the training device; same-size images only"},
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


def _choice(key: str, default: str, lead: str = "", tail: str = "",
            table: dict[str, dict[str, str]] = CHOICE_HELP) -> Any:
    """A field whose value is one of ``table[key]``; its help text lists them."""
    return _f(default, f"{lead}{choices_help(key, table)}{tail}", choices=tuple(table[key]))


@dataclass
class RunConfig:
    dir: str = _f("runs/default", "run directory (config.yaml, tb/, checkpoints/, export/); re-running with the same "
                                  "dir resumes")
    seed: int = _f(0, "base seed; each process uses seed + rank", ge=0, lt=2**31, why="numpy's generators need it")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = run all epochs); for smoke runs", ge=0)
    precision: str = _choice("run.precision", "auto", "mixed precision: ")
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms); exact resume on CPU")
    dist_timeout_min: float = _f(60, "minutes a rank waits in a collective before the job aborts (longer than rank "
                                     "0's checkpoint and export writes)", gt=0)
    log_every: int = _f(10, "optimizer steps between TensorBoard scalar writes (metrics reduced across ranks)", ge=1)
    checkpoint_every: int = _f(500, "optimizer steps between checkpoints (also saved at each epoch end and on "
                                    "SIGTERM/SIGUSR1/SIGUSR2)", ge=1)
    keep_checkpoints: int = _f(3, "how many most recent checkpoints to keep", ge=1)
    export: bool = _f(True, "write export/encoder.safetensors + config.json at the end")
    resume: str = _choice("run.resume", "auto")


@dataclass
class ViewConfig:
    size: int = _f(32, "output side length in pixels of this view", ge=8)
    crop_scale_min: float = _f(0.2, "random resized crop: smallest area fraction", gt=0, le=1)
    crop_scale_max: float = _f(1.0, "random resized crop: largest area fraction", gt=0, le=1)
    flip_p: float = _f(0.5, "probability of a horizontal flip", ge=0, le=1)
    jitter_p: float = _f(0.8, "probability of colour jitter", ge=0, le=1)
    brightness: float = _f(0.4, "colour jitter brightness strength")
    contrast: float = _f(0.4, "colour jitter contrast strength")
    saturation: float = _f(0.4, "colour jitter saturation strength (ignored for 1-channel data)")
    hue: float = _f(0.1, "colour jitter hue strength (ignored for 1-channel data)")
    gamma: float = _f(0.0, "random gamma strength, drawn with the jitter: x ** g, log g ~ U(+-log(1 + gamma)) (0 = "
                           "off)", ge=0)
    tone: float = _f(0.0, "strength of a random monotone tone curve, drawn with the jitter after gamma (0 = off)", ge=0)
    grayscale_p: float = _f(0.2, "probability of converting to grayscale (ignored for 1-channel data)", ge=0, le=1)
    blur_p: float = _f(0.0, "probability of Gaussian blur", ge=0, le=1)
    blur_sigma_max: float = _f(2.0, "largest Gaussian blur sigma (smallest is 0.1)", ge=0.1, why="the smallest sigma")
    solarize_p: float = _f(0.0, "probability of solarizing (pixels at or above half of full scale become 1 - x), "
                                "after the blur", ge=0, le=1)


@dataclass
class DataConfig:
    dataset: str = _choice("data.dataset", "synthetic", tail=" (pretrain.data.datasets.REGISTRY)")
    root: str = _f("", "dataset directory; empty = the dataset's default (Fashion-MNIST: "
                       "/usr/share/datasets/fashion-mnist)")
    num_workers: int = _f(2, "DataLoader worker processes per training process (FFCV: decoding threads)", ge=0)
    format: str = _choice("data.format", "torchvision")
    path: str = _f("", "ffcv: the .beton file (python -m pretrain.data.beton ... --out train.beton)")
    os_cache: bool = _f(True, "ffcv: read through the OS page cache (false: ffcv's own process cache)")
    batches_ahead: int = _f(3, "ffcv: batches prepared ahead of the training step")
    augment: str = _choice("data.augment", "loader")
    synthetic_size: int = _f(2048, "synthetic: number of training images")
    synthetic_classes: int = _f(8, "synthetic: number of latent classes the images are drawn from", ge=2)
    synthetic_image_size: int = _f(32, "synthetic: side length of the drawn images")
    colour_split: str = _choice("data.colour_split", "none")
    limit: int = _f(0, "use only the first N training images (0 = all)", ge=0)
    holdout: int = _f(0, "hold N evenly spaced training images out as a validation split, never trained on: the kNN "
                         "monitor's queries, scored by eval holdout=N", ge=0)
    views: list[ViewConfig] = _f([ViewConfig(), ViewConfig()], "one augmentation recipe per view; V = len(views) >= 2 "
                                                               "(>= 1 with colour_split=lab)")


@dataclass
class ModelConfig:
    arch: str = _f("resnet18", "any timm encoder name (timm.create_model(arch, num_classes=0))")
    small_input: bool = _f(True, "small-image stem for images of 64 px and below (ResNets): 3x3 first conv, no "
                                 "max-pool")
    stem_stride: int = _f(1, "small_input: stride of the first conv (1: stage 1 at full resolution; 2: half, ~4x "
                             "cheaper)", choices=(1, 2))
    width: float = _f(1.0, "ResNets: scale every stage's channels (and a deep stem's) by this; 0.5 is ~3.5x cheaper "
                           "on small images", gt=0, le=4)
    head_dims: list[int] = _f([512, 128], "projection MLP widths after the encoder feature: hidden..., output",
                              min_len=1, ge=1)
    head_bn: bool = _f(True, "BatchNorm between the projection head's hidden layers")
    shared_head: bool = _f(True, "one projection head for all views (false: one per view)")
    encoder_per_view: bool = _f(False, "a separate encoder per view (CMC); false: one shared encoder")
    channels_last: bool = _f(False, "channels_last memory format (faster convs on GPUs with bf16/fp16)")
    momentum: float = _f(0.99, "objective.queue_size > 0: EMA coefficient of the momentum (key) encoder and head, "
                               "MoCo's m", ge=0, lt=1)
    shuffle_bn: int = _f(0, "objective.queue_size > 0: MoCo's shuffling BN, the momentum model's keys computed in "
                            "this many groups per process, each on its own BatchNorm statistics (0 = off)", ge=0)
    sync_bn: bool = _f(True, "BatchNorm statistics over the global batch with several processes (SyncBatchNorm on "
                             "GPUs, GlobalBatchNorm on CPU ranks)")


@dataclass
class ObjectiveConfig:
    name: str = _choice("objective.name", "contrastive", "training objective: ")
    bound: str = _choice("objective.bound", "infonce", "MI lower bound maximised: ", " (see README: Objectives and "
                                                                                     "bounds)")
    graph: str = _choice("objective.graph", "full", "which view pairs: ")
    critic: str = _choice("objective.critic", "cosine", "contrastive: ")
    temperature: float = _f(0.1, "temperature of the cosine critic: score = cos(z_a, z_b) / temperature", gt=0)
    queue_size: int = _f(0, "contrastive: keys from a momentum model (model.momentum) plus a queue of this many past "
                            "keys per view, MoCo v2 (0 = off: in-batch keys)", ge=0)
    nn_support_size: int = _f(0, "contrastive, in-batch keys: NNCLR, each query replaced by its nearest neighbour "
                                 "among this many past view-0 embeddings (0 = off)", ge=0)
    intra_view_negatives: bool = _f(False, "contrastive, in-batch keys: also score each query against the other "
                                           "images of its own view (SimCLR's NT-Xent: 2N-2 negatives for 2 views)")
    debias_tau_plus: float = _f(0.0, "contrastive, infonce bound, cosine critic: debiased InfoNCE's tau+, the "
                                     "expected share of negatives from the query's own class, e.g. 0.1 for 10 "
                                     "balanced classes (0 = off)", ge=0, lt=1)
    smile_tau: float = _f(5.0, "SMILE: clip the scores to [-tau, tau] inside the log-mean-exp", gt=0)
    mine_ema: float = _f(0.1, "MINE: update weight of the moving average of the denominator", gt=0, le=1)
    local_stages: list[int] = _f([3, 4], "amdim/dim: timm stage indices of the two local feature maps "
                                         "(forward_intermediates)")
    amdim_tclip: float = _f(20.0, "amdim: soft clipping of scores, tclip * tanh(s / tclip)")
    amdim_reg: float = _f(0.05, "amdim: weight of the mean squared raw score regulariser")


@dataclass
class OptimConfig:
    epochs: float = _f(10, "training epochs; a fraction ends the last one early (the cosine schedule spans the whole "
                           "run)", gt=0, finite=True)
    batch_size_per_process: int = _f(256, "images per process per step (global batch = this x processes)", ge=2,
                                     why="InfoNCE needs negatives")
    optimizer: str = _choice("optim.optimizer", "lars", tail=" (timm.optim.create_optimizer_v2)")
    lr: float = _f(0.3, "peak learning rate (after warmup); per 256 images of global batch when optim.lr_scaling is "
                        "not none", gt=0, finite=True)
    lr_scaling: str = _choice("optim.lr_scaling", "none", tail="; the effective lr is printed at start")
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule", ge=0)
    weight_decay: float = _f(1e-6, "weight decay (not applied to biases and norm layers)", ge=0)
    momentum: float = _f(0.9, "momentum for sgd and lars")
    warmup_epochs: float = _f(1.0, "linear warmup epochs, fractions allowed (stepped per optimizer step)", ge=0,
                              finite=True)
    grad_clip: float = _f(0.0, "max global gradient norm (0 = no clipping; the norm is logged either way)", ge=0)
    skip_nonfinite: bool = _f(False, "skip steps whose loss is NaN/inf (counted) instead of stopping the run")


@dataclass
class MonitorConfig:
    knn_every: int = _f(1, "run the online kNN monitor every N epochs (0 = never)", ge=0)
    knn_k: int = _f(20, "neighbours of the online kNN monitor", ge=1)
    knn_temperature: float = _f(0.07, "temperature of the kNN monitor's weighted votes")
    knn_bank: int = _f(5000, "labelled training images in the kNN memory bank")
    knn_queries: int = _f(1000, "labelled held-out images classified by the kNN monitor")
    online_probe: bool = _f(True, "train a linear classifier on detached encoder features with labels (never reaching "
                                  "the encoder), scored with the kNN monitor")
    online_probe_lr: float = _f(1e-3, "online probe: AdamW learning rate (its own optimizer, no weight decay)")
    expect_eval: str = _f("", "an eval config to run on the export afterwards (make demo: configs/probe_fmnist.yaml), "
                              "reckoned into the expected-duration line ('' = the pretraining alone)")


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


def require(ok: bool, key: str, message: str) -> None:
    """The one form of a refused value (both stages' configs): the key, then what it must be."""
    if not ok:
        raise ConfigError(f"bad value for config key '{key}': {message}")


_BOUNDS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


def _bounds_text(m: Any) -> str:
    """``> 0``, ``>= 1``, ``in [0, 1)``, ... for the bounds a field declares."""
    lo, hi = (next((k for k in pair if k in m), None) for pair in (("gt", "ge"), ("lt", "le")))
    if lo and hi:
        return f"in {'(' if lo == 'gt' else '['}{m[lo]}, {m[hi]}{')' if hi == 'lt' else ']'}"
    return f"{_BOUNDS[lo or hi][0]} {m[lo or hi]}"  # type: ignore[index]


def _in_bounds(x: Any, m: Any) -> bool:
    return all(op(x, m[b]) for b, (_, op) in _BOUNDS.items() if b in m) and (not m.get("finite") or math.isfinite(x))


def check_fields(node: Any, prefix: str = "") -> None:
    """Every field's declared choices, length and bounds (its metadata, see :func:`_f`), through nested
    configs and lists of them, each refused with its dotted key."""
    for f in dataclasses.fields(node):
        key, value, m = prefix + f.name, getattr(node, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
        for i, item in enumerate(value if isinstance(value, list) else []):
            if dataclasses.is_dataclass(item):
                check_fields(item, f"{key}.{i}.")
        if "choices" in m:
            require(value in m["choices"], key, f"'{value}' is not one of {', '.join(map(str, m['choices']))}")
        if "min_len" in m:
            n = m["min_len"]
            require(len(value) >= n, key, f"needs at least {n} {'entry' if n == 1 else 'entries'}, got {value}")
        if not any(b in m for b in _BOUNDS):
            continue
        if isinstance(value, list):
            require(all(_in_bounds(x, m) for x in value), key, f"needs values {_bounds_text(m)}, got {value}")
        else:
            finite, why = "a finite number " if m.get("finite") else "", f" ({m['why']})" if "why" in m else ""
            require(_in_bounds(value, m), key, f"must be {finite}{_bounds_text(m)}{why}, got {value}")


def validate(c: Config) -> None:
    """Reject impossible values with one line naming the key and what is allowed: each field's own range
    and choices (:func:`check_fields`), then the rules between keys."""
    check_fields(c)
    o, d, m, ob, mo = c.optim, c.data, c.model, c.objective, c.monitor
    require(d.format != "ffcv" or bool(d.path), "data.path", "data.format=ffcv reads a .beton: give "
            "data.path=train.beton (write it with python -m pretrain.data.beton)")
    lab = d.colour_split == "lab"
    require(len(d.views) >= (1 if lab else 2), "data.views",
            f"needs at least {1 if lab else 2} view recipes, got {len(d.views)}")
    require(not lab or d.dataset != "fashion_mnist", "data.colour_split", "lab needs RGB data, Fashion-MNIST is "
                                                                          "grayscale")
    require(not lab or m.encoder_per_view, "model.encoder_per_view",
            "must be true with data.colour_split=lab: the L and ab encoders see 1 and 2 channels")
    for i, v in enumerate(d.views):
        require(v.crop_scale_min <= v.crop_scale_max, f"data.views.{i}.crop_scale_min",
                f"must be <= crop_scale_max, got {v.crop_scale_min}..{v.crop_scale_max}")
    require(d.augment == "loader" or d.format == "ffcv" or d.dataset != "imagefolder", "data.augment",
            "batch needs same-size images: fashion_mnist, synthetic, or a .beton (data.format=ffcv); use loader")
    require(not d.holdout or d.format != "ffcv", "data.holdout",
            "a .beton holds every image it was written with; hold images out with data.format=torchvision")
    if ob.name in ("amdim", "dim"):
        require(len(ob.local_stages) == 2, "objective.local_stages", f"needs two stage indices, got {ob.local_stages}")
        require(len(d.views) == 2 and not lab, "data.views", f"{ob.name} uses exactly 2 RGB/gray views, got "
                                                             f"{len(d.views)}")
        require(ob.name != "dim" or ob.bound in ("infonce", "nwj", "dv", "js", "smile"), "objective.bound",
                f"dim supports infonce, nwj, dv, js, smile, got {ob.bound}")
    require(ob.queue_size == 0 or ob.name == "contrastive", "objective.queue_size",
            f"the momentum queue works with objective.name=contrastive, not {ob.name}; set objective.queue_size=0")
    for key, on in (("intra_view_negatives", ob.intra_view_negatives), ("nn_support_size", ob.nn_support_size)):
        require(not on or (ob.name == "contrastive" and ob.queue_size == 0), f"objective.{key}",
                "works with objective.name=contrastive and in-batch keys (objective.queue_size=0) only")
    require(not (ob.intra_view_negatives and ob.nn_support_size), "objective.intra_view_negatives",
            "cannot be combined with objective.nn_support_size: NNCLR's anchor is the query's support-set neighbour, "
            "the intra-view negatives' the query itself, so one softmax row would mix two anchors; set one of them off")
    require(not ob.debias_tau_plus or (ob.name, ob.bound, ob.critic) == ("contrastive", "infonce", "cosine"),
            "objective.debias_tau_plus", "debiases InfoNCE with the cosine critic's score floor: it needs "
            f"objective.name=contrastive, bound=infonce, critic=cosine (got {ob.name}, {ob.bound}, {ob.critic})")
    require(not m.shuffle_bn or ob.queue_size > 0, "model.shuffle_bn", "shuffles the momentum model's BatchNorm, so "
            "it needs the queue: set objective.queue_size, or model.shuffle_bn=0")
    require(not m.shuffle_bn or o.batch_size_per_process >= 2 * m.shuffle_bn, "model.shuffle_bn",
            f"{m.shuffle_bn} groups of optim.batch_size_per_process={o.batch_size_per_process} leave fewer than 2 "
            "images for some group's BatchNorm statistics; use fewer groups")
    for key in ("knn_bank", "knn_queries"):
        require(mo.knn_every == 0 or getattr(mo, key) >= 1, f"monitor.{key}", f"must be >= 1 while the monitor is "
                f"on, got {getattr(mo, key)}; set monitor.knn_every=0 to turn it off")


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
