"""Eval entry point: frozen exported encoders -> linear probe + kNN -> report.

    python eval/main.py --config configs/probe_fmnist.yaml weights=runs/fmnist_cpu/export
    python eval/main.py --config configs/probe_fmnist.yaml 'weights=[runs/a/export,runs/b/export]'

Reads only exported artefacts (encoder.safetensors + config.json), never training code paths.
Rows: each encoder, a random-init encoder of the same architecture, raw pixels (small images).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running as a script puts eval/ first on sys.path, where features.py, config.py, ... would shadow
# same-named top-level modules; the package is imported by name instead.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

PROTOCOL = "fast-v1: frozen encoder (eval mode), resize + centre crop, standardised features, " \
           "L-BFGS logistic regression, weight decay chosen on 10% of train; kNN cosine, T-weighted votes"


def evaluate(cfg: Any) -> list[dict[str, Any]]:
    """Run every row of the report; returns the rows (also written to the report files)."""
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from eval.features import assert_unchanged, fingerprint, frozen_features, pixel_features
    from eval.probe import linear_probe
    from eval.report import write_report
    from pretrain.config import Config, ConfigError
    from pretrain.data.datasets import REGISTRY, spaced_subset
    from pretrain.export import load_encoder
    from pretrain.knn import knn_predict
    from pretrain.models import create_encoder

    # ------------------------------------------------------------------ exports (checked before any work)
    exports = [(w, *load_encoder(w)) for w in cfg.weights]  # (path, encoder, meta); checks sha256 and keys

    # ------------------------------------------------------------------ data
    data_cfg = Config()
    data_cfg.data.dataset, data_cfg.data.root = cfg.dataset, cfg.root
    data_cfg.data.synthetic_size, data_cfg.data.synthetic_classes = cfg.synthetic_size, cfg.synthetic_classes
    data_cfg.data.synthetic_image_size = cfg.synthetic_image_size

    def split(name: str, limit: int):
        ds = REGISTRY[cfg.dataset](data_cfg, name)
        if len(ds) == 0:
            raise ConfigError(f"the {name} split of {cfg.dataset} is empty: check root")
        return spaced_subset(ds, limit) if limit else ds

    train, test = split("train", cfg.limit_train), split("test", cfg.limit_test)
    for w, _, meta in exports:
        needs = 3 if meta.get("input_transform") == "lab_L" else meta["in_chans"]
        if needs != train.channels:
            raise ConfigError(f"'{w}' expects {needs}-channel images but {cfg.dataset} has {train.channels}; "
                              "evaluate it on the dataset it was trained for")

    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    rows: list[dict[str, Any]] = []

    def score(name: str, kind: str, train_xy, test_xy, sha: str | None) -> None:
        (fx, fy), (tx, ty) = train_xy, test_xy
        t0 = time.perf_counter()
        probe = linear_probe(fx, fy, tx, ty, tuple(cfg.weight_decays), steps=cfg.probe_steps, seed=cfg.seed)
        num_classes = int(max(fy.max(), ty.max())) + 1
        knn = {str(k): (knn_predict(fx, fy, tx, k, cfg.knn_temperature, num_classes) == ty).float().mean().item()
               for k in cfg.knn_k}
        rows.append({"name": name, "kind": kind, "protocol": "fast", "top1": probe.top1, "top5": probe.top5,
                     "knn": knn, "weight_decay": probe.weight_decay, "feature_dim": int(fx.shape[1]),
                     "probe_seconds": round(time.perf_counter() - t0, 1), "weights_sha256": sha})

    bar = tqdm(total=len(exports) * (2 if cfg.random_init else 1) + int(cfg.raw_pixels), desc="eval", unit="row")
    # ------------------------------------------------------------------ our encoders (+ random init of each arch)
    for w, encoder, meta in exports:
        before = fingerprint(encoder)
        t0 = time.perf_counter()
        feats = [frozen_features(encoder, ds, meta, accelerator, cfg.batch_size, cfg.num_workers) for ds in (train, test)]
        rate = (len(train) + len(test)) / (time.perf_counter() - t0)
        score(Path(w).resolve().parent.name if Path(w).name == "export" else Path(w).name, "ours", *feats, meta["sha256"])
        rows[-1]["extract_images_per_s"] = round(rate, 1)
        assert_unchanged(encoder, before, w)
        bar.update()
        if cfg.random_init:
            random_encoder = create_encoder(meta["architecture"], meta["in_chans"], meta["small_input"])
            feats = [frozen_features(random_encoder, ds, meta, accelerator, cfg.batch_size, cfg.num_workers)
                     for ds in (train, test)]
            score(f"random init {meta['architecture']}", "random_init", *feats, None)
            bar.update()
    # ------------------------------------------------------------------ raw pixels
    if cfg.raw_pixels:
        size = exports[0][2]["input_size"][-1]
        if train.channels * size * size <= 4096:
            score("raw pixels", "raw_pixels", pixel_features(train, size, cfg.batch_size),
                  pixel_features(test, size, cfg.batch_size), None)
        bar.update()
    bar.close()

    # ------------------------------------------------------------------ report
    if accelerator.is_main_process:
        from omegaconf import OmegaConf

        out = Path(cfg.out) if cfg.out else Path(cfg.weights[0]).resolve().parent
        meta = {"dataset": cfg.dataset, "protocol": "fast-v1", "protocol_description": PROTOCOL, "seed": cfg.seed,
                "train_images": len(train), "test_images": len(test),
                "config": OmegaConf.to_yaml(OmegaConf.structured(cfg))}
        table = write_report(out, rows, meta, list(cfg.knn_k))
        print(f"\n{table}\n\nreport: {out / 'report.md'}  {out / 'report.json'}  {out / 'report.png'}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from eval.config import EvalConfig, validate_eval
    from eval.features import EncoderChanged
    from pretrain.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description="Linear probe + kNN of frozen exported encoders.")
    parser.add_argument("--config", help="YAML with differences from the eval defaults (configs/probe_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. weights=runs/x/export")
    args = parser.parse_args(argv)
    # `weights=a` means one export; `weights=[a,b]` several (the schema field is a list).
    overrides = [f"weights=[{o[8:]}]" if o.startswith("weights=") and not o[8:].startswith("[") else o
                 for o in args.overrides]
    try:
        cfg = load_config(args.config, overrides, schema=EvalConfig, check=validate_eval)
        evaluate(cfg)
    except (ConfigError, EncoderChanged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. state-dict key mismatch between config.json and the weights
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        print(f"error: the weights do not match the architecture in config.json: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
