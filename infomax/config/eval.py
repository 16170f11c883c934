"""The eval stage's schema (same conventions as infomax.config.pretrain: default, type, help per field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from infomax.config.pretrain import DatasetOptions, _choice, _f, check_dataset_options, check_fields, require

# The eval stage's own lists of choices, written once (help texts and validation follow them).
EVAL_CHOICES: dict[str, dict[str, str]] = {
    "protocol": {"fast": "L-BFGS probe on cached features", "imagenet": "SGD probe on augmented frozen features"},
    "baselines.alexnet_optimizer": {"sgd": "", "adamw": "leaves AlexNet's first plateau far sooner: the choice for "
                                                        "a short budget"},
}


@dataclass
class SGDProbeConfig:
    lr: float = _f(30.0, "imagenet protocol: SGD learning rate of the linear head (MoCo: 30 at batch 256)", gt=0)
    momentum: float = _f(0.9, "imagenet protocol: SGD momentum")
    weight_decay: float = _f(0.0, "imagenet protocol: weight decay")
    epochs: int = _f(100, "imagenet protocol: epochs", ge=1)
    milestones: list[int] = _f([60, 80], "imagenet protocol: epochs where the lr drops x0.1")
    global_batch_size: int = _f(256, "imagenet protocol: global batch (split across processes)", ge=1)
    crop_scale_min: float = _f(0.08, "imagenet protocol: RandomResizedCrop smallest area (plus horizontal flip)")
    checkpoint_every: int = _f(0, "SGD fits: also checkpoint every N steps (0 = by time only, "
                                  "sgd.checkpoint_every_min; always when stopped); rerun resumes", ge=0)
    checkpoint_every_min: float = _f(30, "SGD fits: also checkpoint every N minutes of training, agreed across "
                                         "ranks (0 = off)", ge=0)


@dataclass
class BaselinesConfig:
    alexnet_supervised: bool = _f(True, "train torchvision's AlexNet with labels on the same split and report it")
    alexnet_epochs: int = _f(1, "supervised AlexNet: epoch budget", ge=1)
    alexnet_max_steps: int = _f(0, "supervised AlexNet: step budget (0 = the whole epoch budget)")
    alexnet_lr: float = _f(0.01, "supervised AlexNet: lr (cosine decay; SGD with momentum 0.9, or AdamW)", gt=0)
    alexnet_optimizer: str = _choice("baselines.alexnet_optimizer", "sgd", "supervised AlexNet: ", table=EVAL_CHOICES)
    alexnet_warmup_steps: int = _f(0, "supervised AlexNet: linear lr warmup steps", ge=0)
    alexnet_weight_decay: float = _f(5e-4, "supervised AlexNet: weight decay")
    alexnet_global_batch_size: int = _f(128, "supervised AlexNet: global batch (split across processes)", ge=1)
    alexnet_crop_scale_min: float = _f(0.08, "supervised AlexNet: RandomResizedCrop smallest area (plus horizontal "
                                             "flip)")
    alexnet_held_out: int = _f(2000, "supervised AlexNet: train images kept out of its fit to draw its held-out curve "
                                     "(and its patience); 0 = none")
    alexnet_eval_every: int = _f(0, "supervised AlexNet: steps between held-out checks (0 = each epoch, or 10 checks "
                                    "over a shorter budget)")
    alexnet_patience: int = _f(0, "supervised AlexNet: stop once the held-out top-1 has not improved for this many "
                                  "checks (0 = use the whole budget)")
    use_stored: bool = _f(True, "use a stored AlexNet result (make baselines) when dataset, protocol and "
                                "data hash match")
    store: str = _f("", "directory of stored baseline results; empty = the repository's baselines/ (tracked, so a "
                    "fresh clone has them)")
    supervised_encoder: bool = _f(True, "add our encoder's architecture trained end to end with labels for as many "
                                        "epochs as the export's pretraining")
    supervised_encoder_epochs: float = _f(0.0, "supervised encoder: epoch budget, fractions allowed (0 = the export's "
                                               "pretraining epochs)", ge=0)
    supervised_encoder_global_batch_size: int = _f(128, "supervised encoder: global batch (split across "
                                                        "processes)", ge=1)
    supervised_encoder_lr: float = _f(0.05, "supervised encoder: SGD lr (momentum 0.9, cosine decay over the epoch "
                                            "budget)")
    supervised_encoder_weight_decay: float = _f(5e-4, "supervised encoder: SGD weight decay")
    alexnet_weights: str = _f("", "an AlexNet state dict (e.g. torchvision's alexnet-owt-7be5be79.pth): adds conv1..5 "
                                  "probes")
    alexnet_probe_size: int = _f(224, "conv1..5 probes: input side the images are resized to (>= 64)", ge=64)
    published: bool = _f(False, "add the quoted ImageNet reference rows (only comparable on ImageNet)")


@dataclass
class EvalConfig(DatasetOptions):
    # The dataset options come first (shared with pretraining's data.*); the eval's own default dataset:
    dataset: str = _choice("data.dataset", "fashion_mnist", tail=" (train split for fitting, test/val for scoring)")
    weights: list[str] = _f([], "export directories to evaluate (weights=runs/x/export, or [a,b] for several)")
    train_beton: str = _f("", "extract the train split's features from this .beton (FFCV) instead of decoding "
                              "dataset/root")
    test_beton: str = _f("", "extract the test split's features from this .beton (FFCV)")
    limit_train: int = _f(0, "use only N training images, each class in proportion (0 = all)", ge=0)
    limit_test: int = _f(0, "use only N test images, each class in proportion (0 = all)", ge=0)
    holdout: int = _f(0, "fit on the train split less N images (each class in proportion) and score on those, not "
                         "on the test split (the validation split of a pretraining with data.holdout=N)", ge=0)
    center_crop_ratio: float = _f(1.0, "eval transform: resize to size / ratio, centre crop (ImageNet: 0.875 = 256 -> "
                                       "224)", gt=0, le=1)
    protocol: str = _choice("protocol", "fast", table=EVAL_CHOICES)
    weight_decays: list[float] = _f([1e-6, 1e-5, 1e-4, 1e-3], "fast probe: weight decays tried on the held-out 10% of "
                                                              "train", min_len=1, ge=0)
    probe_steps: int = _f(100, "fast probe: L-BFGS iterations per fit", ge=1)
    label_fractions: list[float] = _f([], "fast protocol: the probe and kNN also fitted on these fractions of the "
                                          "training labels, each class in proportion, drawn with `seed` (SSL papers' "
                                          "1% / 10% columns: [0.01, 0.1]); [] = none", gt=0, lt=1)
    sgd: SGDProbeConfig = field(default_factory=SGDProbeConfig)
    knn_k: list[int] = _f([20, 200], "kNN neighbour counts (cosine, temperature-weighted votes); [] = no kNN", ge=1)
    knn_temperature: float = _f(0.07, "kNN vote temperature", gt=0)
    random_init: bool = _f(True, "add a row for a randomly initialised encoder of the same architecture")
    raw_pixels: bool = _f(True, "add a row for a probe on raw pixels (small images only)")
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    store_baselines: bool = _f(False, "train the supervised AlexNet (early stopping by baselines.alexnet_patience) "
                                      "and store it under baselines.store; weights may be empty (make baselines)")
    image_size: int = _f(28, "image side for rows without an export (store_baselines with no weights)", ge=1)
    batch_size_per_process: int = _f(256, "feature extraction: images per process per batch", ge=1)
    channels_last: bool = _f(True, "channels_last weights for feature extraction and the supervised fits (NHWC convs: "
                                   "faster on CPUs and GPUs)")
    precision: str = _choice("run.precision", "auto", "mixed precision of the fits and feature extraction: ")
    num_workers: int = _f(2, "loader workers", ge=0)
    seed: int = _f(0, "seed for the random-init encoder, the held-out split and the SGD fits", ge=0, lt=2**31,
                   why="numpy's generators need it")
    dist_timeout_min: float = _f(60, "minutes a rank waits in a collective (rank 0 alone writes the report)", gt=0)
    out: str = _f("", "report directory; empty = the first export's run dir (<run>/export), else its own folder")


def validate_eval(c: EvalConfig) -> None:
    """Each field's own range and choices (:func:`infomax.config.fields.check_fields`), then the rules between keys."""
    check_fields(c)
    check_dataset_options(c, "")
    require(len(c.weights) >= 1 or c.store_baselines, "weights", "give at least one export directory, e.g. "
                                                                 "weights=runs/fmnist_cpu/export")
    require(not ((c.train_beton or c.test_beton) and (c.limit_train or c.limit_test)), "limit_train",
            "limits apply to dataset/root; write the .beton with --limit instead")
    require(not (c.holdout and (c.train_beton or c.test_beton)), "holdout",
            "the validation split is read from dataset/root; drop train_beton/test_beton")
    require(not (c.label_fractions and c.protocol != "fast"), "label_fractions",
            "label fractions are scored by the fast protocol; set protocol=fast or label_fractions=[]")
    require(all(0 < m < c.sgd.epochs for m in c.sgd.milestones), "sgd.milestones",
            f"must lie inside (0, {c.sgd.epochs})")
