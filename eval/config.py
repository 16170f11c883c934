"""The eval stage's schema (same conventions as pretrain.config: default, type, help per field)."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import ConfigError, _f


@dataclass
class EvalConfig:
    weights: list[str] = _f([], "export directories to evaluate (weights=runs/x/export, or [a,b] for several)")
    dataset: str = _f("fashion_mnist", "fashion_mnist | imagefolder | synthetic (train split for fitting, test/val for scoring)")
    root: str = _f("", "dataset directory; empty = the dataset's default")
    limit_train: int = _f(0, "use only N evenly spaced training images (0 = all)")
    limit_test: int = _f(0, "use only N evenly spaced test images (0 = all)")
    protocol: str = _f("fast", "fast: linear probe on cached frozen features")
    weight_decays: list[float] = _f([1e-6, 1e-5, 1e-4, 1e-3], "fast probe: weight decays tried on the held-out 10% of train")
    probe_steps: int = _f(100, "fast probe: L-BFGS iterations per fit")
    knn_k: list[int] = _f([20, 200], "kNN neighbour counts (cosine, temperature-weighted votes)")
    knn_temperature: float = _f(0.07, "kNN vote temperature")
    random_init: bool = _f(True, "add a row for a randomly initialised encoder of the same architecture")
    raw_pixels: bool = _f(True, "add a row for a probe on raw pixels (small images only)")
    batch_size: int = _f(256, "feature extraction batch size")
    num_workers: int = _f(2, "feature extraction loader workers")
    seed: int = _f(0, "seed for the random-init encoder and the held-out split")
    out: str = _f("", "report directory; empty = beside the first export (its parent run dir)")
    synthetic_size: int = _f(2048, "synthetic: training images (test split: a quarter, another seed)")
    synthetic_classes: int = _f(8, "synthetic: classes")
    synthetic_image_size: int = _f(32, "synthetic: image side")


def validate_eval(c: EvalConfig) -> None:
    def require(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"bad value for config key '{key}': {msg}")

    require(len(c.weights) >= 1, "weights", "give at least one export directory, e.g. weights=runs/fmnist_cpu/export")
    require(c.dataset in ("fashion_mnist", "imagefolder", "synthetic"), "dataset",
            f"'{c.dataset}' is not one of fashion_mnist, imagefolder, synthetic")
    require(c.protocol == "fast", "protocol", f"'{c.protocol}' is not one of fast (the imagenet protocol is not built yet)")
    require(len(c.weight_decays) >= 1 and min(c.weight_decays) >= 0, "weight_decays", "needs values >= 0")
    require(len(c.knn_k) >= 1 and min(c.knn_k) >= 1, "knn_k", "needs values >= 1")
    require(c.limit_train >= 0 and c.limit_test >= 0, "limit_train", "limits must be >= 0")
