"""The one configuration schema: typed dataclasses, merged from YAML and `key=value` overrides.

Every field has a default, a type, a one-sentence help text and, where it has one, the range or the
choices it must lie in (``_f(0.1, "...", gt=0)``): :func:`check_fields` reads them all in one loop; only
rules that tie several keys together are written out in :func:`validate`. The config reference (docs/configuration.md)
is generated from the help texts (``python -m infomax.config.pretrain``) and a test keeps it in sync. YAML files
in ``configs/`` hold only differences from these defaults.

Errors a user can cause (unknown key, wrong type, impossible value, missing data) raise
:class:`ConfigError` with one line that names the key and the fix. The machinery both stages' schemas
share (fields, the check loop, YAML and overrides) is :mod:`infomax.config.fields`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

# Re-exported: the pretraining's modules take the config machinery from here, with the schema.
from infomax.config.fields import (  # noqa: F401
    YAML_1_2,
    ConfigError,
    _f,
    check_fields,
    load_structured,
    require,
    to_yaml,
    yaml_problem,
)

# Each list of choices, written once: validation, the help texts (so docs/configuration.md's reference) and the
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
    # the built-in bounds; infomax.method.bounds registers each (and any other) with its help and what it is
    "objective.bound": {"infonce": "", "nwj": "", "dv": "", "mine": "", "js": "", "smile": ""},
    "objective.graph": {"full": "all pairs", "core": "view 0 against each other view, as in CMC"},
    "objective.critic": {"cosine": "/ temperature", "dot": "", "bilinear": "learned W", "concat": "joint MLP"},
    "optim.optimizer": {"sgd": "", "adamw": "", "lars": ""},
    "optim.lr_scaling": {"none": "optim.lr as given", "linear": "optim.lr x global batch / 256, MoCo, SimCLR with LARS",
                         "sqrt": "optim.lr x sqrt(global batch / 256), SimCLR's choice for small batches"},
}
CHOICES: dict[str, tuple[str, ...]] = {key: tuple(choices) for key, choices in CHOICE_HELP.items()}


def choices_help(key: str, table: dict[str, dict[str, str]] = CHOICE_HELP) -> str:
    """``a (what a means) | b | ...`` for the choices of ``key`` in ``table``."""
    return " | ".join(f"{c} ({d})" if d else c for c, d in table[key].items())


def _choice(key: str, default: str, lead: str = "", tail: str = "",
            table: dict[str, dict[str, str]] = CHOICE_HELP) -> Any:
    """A field whose value is one of ``table[key]``; its help text lists them."""
    # the live table: a choice registered later (infomax.method.bounds.register_bound) is accepted from then on
    return _f(default, f"{lead}{choices_help(key, table)}{tail}", choices=table[key])


@dataclass
class RunConfig:
    dir: str = _f("runs/default", "run directory (config.yaml, tb/, checkpoints/, export/); re-running with the same "
                                  "dir resumes")
    seed: int = _f(0, "base seed; each process uses seed + rank", ge=0, lt=2**31, why="numpy's generators need it")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = run all epochs); for smoke runs", ge=0)
    precision: str = _choice("run.precision", "auto", "mixed precision: ")
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms); exact resume on CPU")
    dist_timeout_min: float = _f(15, "minutes a rank waits in a collective before the job aborts: a dead or hung "
                                     "rank ends the job this soon, and rank 0's longest wait (a checkpoint save, "
                                     "the export) takes seconds to a minute", gt=0)
    log_every: int = _f(10, "optimizer steps between TensorBoard scalar writes (metrics reduced across ranks)", ge=1)
    checkpoint_every: int = _f(0, "optimizer steps between checkpoints (0 = none by steps: by time, "
                                  "run.checkpoint_every_min; always on SIGTERM/SIGUSR1/SIGUSR2 and at the end)", ge=0)
    checkpoint_every_min: float = _f(30, "minutes of training between checkpoints, agreed across ranks (0 = off): "
                                         "a save stops every GPU for its copy, write and barrier", ge=0)
    save_at_epoch_end: bool = _f(False, "also checkpoint at each epoch end (short CPU runs; at a large global batch "
                                        "an epoch can take a minute)")
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
    brightness: float = _f(0.4, "colour jitter brightness strength", ge=0)
    contrast: float = _f(0.4, "colour jitter contrast strength", ge=0)
    saturation: float = _f(0.4, "colour jitter saturation strength (ignored for 1-channel data)", ge=0)
    hue: float = _f(0.1, "colour jitter hue strength (ignored for 1-channel data)", ge=0, le=0.5,
                    why="0.5 turns hues half-way round the colour circle")
    gamma: float = _f(0.0, "random gamma strength, drawn with the jitter: x ** g, log g ~ U(+-log(1 + gamma)) (0 = "
                           "off)", ge=0)
    tone: float = _f(0.0, "strength of a random monotone tone curve, drawn with the jitter after gamma (0 = off)", ge=0)
    grayscale_p: float = _f(0.2, "probability of converting to grayscale (ignored for 1-channel data)", ge=0, le=1)
    blur_p: float = _f(0.0, "probability of Gaussian blur", ge=0, le=1)
    blur_sigma_max: float = _f(2.0, "largest Gaussian blur sigma (smallest is 0.1)", ge=0.1, why="the smallest sigma")
    solarize_p: float = _f(0.0, "probability of solarizing (pixels at or above half of full scale become 1 - x), "
                                "after the blur", ge=0, le=1)


@dataclass
class DatasetOptions:
    """Which images, written once for both stages: pretraining holds these as ``data.*``, the eval at its top level,
    and both open them with :func:`infomax.data.datasets.open_configured`."""

    dataset: str = _choice("data.dataset", "synthetic", tail=" (infomax.data.datasets.REGISTRY)")
    root: str = _f("", "dataset directory; empty = the dataset's default (Fashion-MNIST: "
                       "/usr/share/datasets/fashion-mnist)")
    synthetic_size: int = _f(2048, "synthetic: number of training images (its test split: a quarter, another seed)",
                             ge=1)
    synthetic_classes: int = _f(8, "synthetic: number of latent classes the images are drawn from", ge=2)
    synthetic_image_size: int = _f(32, "synthetic: side length of the drawn images", ge=1)


@dataclass
class DataConfig(DatasetOptions):
    num_workers: int = _f(2, "DataLoader worker processes per training process (FFCV: decoding threads)", ge=0)
    format: str = _choice("data.format", "torchvision")
    path: str = _f("", "ffcv: the .beton file (python -m infomax.data.beton ... --out train.beton)")
    os_cache: bool = _f(True, "ffcv: read through the OS page cache (false: ffcv's own process cache)")
    batches_ahead: int = _f(3, "ffcv: batches prepared ahead of the training step")
    augment: str = _choice("data.augment", "loader")
    colour_split: str = _choice("data.colour_split", "none")
    limit: int = _f(0, "use only N training images, each class in proportion (0 = all)", ge=0)
    holdout: int = _f(0, "hold N training images out (each class in proportion) as a validation split, never "
                         "trained on: the kNN monitor's queries, scored by eval holdout=N", ge=0)
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
    bound: str = _choice("objective.bound", "infonce", "MI lower bound maximised: ", " (see docs/objectives.md)")
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
    momentum: float = _f(0.9, "momentum for sgd and lars", ge=0, lt=1)
    warmup_epochs: float = _f(1.0, "linear warmup epochs from lr 0 to optim.lr, fractions allowed (stepped per "
                                   "optimizer step); the cosine spans the epochs after it", ge=0,
                              finite=True)
    grad_clip: float = _f(0.0, "max global gradient norm (0 = no clipping; the norm is logged either way)", ge=0)
    skip_nonfinite: bool = _f(False, "skip steps whose loss is NaN/inf (counted) instead of stopping the run")


@dataclass
class MonitorConfig:
    knn_every: int = _f(1, "run the online kNN monitor every N epochs (0 = never)", ge=0)
    knn_k: int = _f(20, "neighbours of the online kNN monitor", ge=1)
    knn_temperature: float = _f(0.07, "temperature of the kNN monitor's weighted votes", gt=0)
    knn_bank: int = _f(5000, "labelled training images in the kNN memory bank")
    knn_queries: int = _f(1000, "labelled held-out images classified by the kNN monitor")
    online_probe: bool = _f(True, "train a linear classifier on detached encoder features with labels (never reaching "
                                  "the encoder), scored with the kNN monitor")
    online_probe_lr: float = _f(1e-3, "online probe: AdamW learning rate (its own optimizer, no weight decay)", gt=0)
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


def check_dataset_options(d: DatasetOptions, prefix: str) -> None:
    """The rules of the dataset options both stages share (``prefix``: ``data.``, or '' as the eval spells them)."""
    require(not (d.dataset == "synthetic" and d.root), f"{prefix}root",
            f"the synthetic images are drawn, not read from files: set {prefix}dataset=imagefolder (or fashion_mnist) "
            f"to use the images at {d.root}, or leave {prefix}root empty")


def validate(c: Config) -> None:
    """Reject impossible values with one line naming the key and what is allowed: each field's own range
    and choices (:func:`check_fields`), then the rules between keys."""
    check_fields(c)
    o, d, m, ob, mo = c.optim, c.data, c.model, c.objective, c.monitor
    check_dataset_options(d, "data.")
    require(d.format != "ffcv" or bool(d.path), "data.path", "data.format=ffcv reads a .beton: give "
            "data.path=train.beton (write it with python -m infomax.data.beton)")
    lab = d.colour_split == "lab"
    require(len(d.views) >= (1 if lab else 2), "data.views",
            f"needs at least {1 if lab else 2} view recipes, got {len(d.views)}")
    require(not lab or m.encoder_per_view, "model.encoder_per_view",
            "must be true with data.colour_split=lab: the L and ab encoders see 1 and 2 channels")
    for i, v in enumerate(d.views):
        require(v.crop_scale_min <= v.crop_scale_max, f"data.views.{i}.crop_scale_min",
                f"must be <= crop_scale_max, got {v.crop_scale_min}..{v.crop_scale_max}")
    require(not d.holdout or d.format != "ffcv", "data.holdout",
            "a .beton holds every image it was written with; hold images out with data.format=torchvision")
    if ob.name in ("amdim", "dim"):
        require(len(ob.local_stages) == 2, "objective.local_stages", f"needs two stage indices, got {ob.local_stages}")
        require(len(d.views) == 2 and not lab, "data.views", f"{ob.name} uses exactly 2 RGB/gray views, got "
                                                             f"{len(d.views)}")
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


def load_config(path: str | None = None, overrides: Sequence[str] = (), schema: type | None = None,
                check: Any = None) -> Any:
    """Defaults <- YAML file <- dotted overrides, checked against the schema, then validated
    (:func:`infomax.config.fields.load_structured`); the pretraining's :class:`Config` and :func:`validate`
    unless the eval stage passes its own."""
    return load_structured(path, overrides, schema or Config, check or validate)


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """The peak lr the optimizer gets: ``optim.lr`` scaled by the global batch per ``optim.lr_scaling``,
    so one config is right for any number of processes."""
    ratio = global_batch / 256
    return optim.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[optim.lr_scaling]


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
    """The config reference (docs/configuration.md) table, generated from the dataclasses."""
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
