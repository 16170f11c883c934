"""Eval entry point: frozen exported encoders -> linear probe + kNN, next to the AlexNet baselines -> report.

    python eval/main.py --config configs/probe_fmnist.yaml weights=runs/fmnist_cpu/export
    accelerate launch eval/main.py --config configs/probe_imagenet.yaml 'weights=[runs/a/export,runs/b/export]'

Reads only exported artefacts (encoder.safetensors + config.json), never training code paths.
Rows: each encoder, a random-init encoder of the same architecture, raw pixels (small images),
supervised AlexNet trained here, AlexNet conv1..5 probes (given a weights file), published figures.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

PROTOCOLS = {
    "fast": "fast-v1: frozen encoder (eval mode), resize + centre crop, standardised cached features, "
            "L-BFGS logistic regression, weight decay chosen on 10% of train",
    "imagenet": "imagenet-v1: frozen encoder and BN, RandomResizedCrop + flip, linear head, SGD momentum 0.9, "
                "lr drops x0.1 at the milestones, weight decay 0; resize + centre crop for scoring",
}
CONVERGENCE = {True: "", False: ", not converged", None: ", convergence unknown"}  # held-out curve -> row name
KNN = "kNN: cosine similarity, temperature-weighted votes over the cached train features"


class Stopped(RuntimeError):
    """A signal stopped a long probe; its checkpoint is saved and rerunning resumes."""


def evaluate(cfg: Any) -> list[dict[str, Any]]:  # noqa: C901 - one readable top-to-bottom function
    """Compute every row of the report; returns the rows (also written to the report files)."""
    import hashlib
    import os

    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from omegaconf import OmegaConf
    from torchvision.transforms import v2

    from eval.baselines import (
        REFERENCE_ALEXNET_TOP1,
        AlexNetConvFeatures,
        load_alexnet_features,
        published_rows,
        supervised_alexnet,
    )
    from eval.classifier import LinearProbeModel, SGDSchedule, fit_classifier
    from eval.features import (
        ConcatViewEncoders,
        assert_unchanged,
        fingerprint,
        pixel_features,
    )
    from eval.probe import linear_probe, topk_accuracy
    from eval.report import write_report
    from eval.stored_baselines import data_fingerprint, find_stored, store_result
    from pretrain.config import Config, ConfigError
    from pretrain.data import MultiViewDataset
    from pretrain.data.colour import split_lab
    from pretrain.data.datasets import REGISTRY, disjoint_subsets, spaced_subset
    from pretrain.export import load_encoder, load_view_encoders
    from pretrain.features import ImageListDataset, extract_features
    from pretrain.knn import knn_predict
    from pretrain.models import create_encoder
    from pretrain.revision import git_revision
    from pretrain.stop import StopFlag

    # ------------------------------------------------------------------ exports and data (checked before any work)
    exports = [(w, *load_encoder(w)) for w in cfg.weights]  # (path, encoder, meta); checks sha256 and keys
    view_encoders = {w: load_view_encoders(w, meta) for w, _, meta in exports}  # CMC's ab encoder, if any
    if cfg.baselines.alexnet_weights:
        alexnet_trunk = load_alexnet_features(cfg.baselines.alexnet_weights)
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
    size = exports[0][2]["input_size"][-1] if exports else cfg.image_size  # rows without an export (AlexNet, pixels)
    out = Path(cfg.out or (Path(cfg.weights[0]).resolve().parent if exports else cfg.baselines.store))
    num_classes = train.num_classes

    # ------------------------------------------------------------------ processes
    # Without a GPU, Accelerate builds a gloo group for several processes only when told cpu=True.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=multi_cpu, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=cfg.seed))
    torch.manual_seed(cfg.seed)
    stop = StopFlag().install()
    rows: list[dict[str, Any]] = []
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg)) + "".join(m["sha256"] for _, _, m in exports)

    splits, betons = {"train": train, "test": test}, {"train": cfg.train_beton, "test": cfg.test_beton}

    def norm_of(meta: dict) -> tuple[list[float], list[float]]:
        """An export's own normalisation (its config.json), which its encoder was trained with."""
        return list(meta["mean"]), list(meta["std"])

    def features(model, split: str, image_size: int, input_fn=lambda x: x, norm=(None, None)):
        """N x F outputs of ``model`` and N labels for the train or test split, all processes sharing the work;
        images normalised with ``norm`` = (mean, std) (None: the dataset's)."""
        if betons[split]:  # the FFCV path: decode + centre crop in FFCV, normalised in torch
            from pretrain.features import beton_features

            return beton_features(model, betons[split], image_size, cfg.center_crop_ratio, cfg.batch_size_per_process,
                                  accelerator, max(1, cfg.num_workers), input_fn, *norm)
        return extract_features(model, ImageListDataset(splits[split], image_size, cfg.center_crop_ratio, *norm),
                                accelerator, cfg.batch_size_per_process, cfg.num_workers, input_fn=input_fn, shard=True)

    def knn(train_xy, test_xy) -> dict[str, float]:
        (fx, fy), (tx, ty) = train_xy, test_xy
        return {str(k): (knn_predict(fx, fy, tx, k, cfg.knn_temperature, num_classes) == ty).float().mean().item()
                for k in cfg.knn_k}

    def fast_row(name: str, kind: str, train_xy, test_xy, **extra: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        probe = linear_probe(*train_xy, *test_xy, tuple(cfg.weight_decays), steps=cfg.probe_steps, seed=cfg.seed)
        return {"name": name, "kind": kind, "protocol": "fast", "top1": probe.top1, "top5": probe.top5,
                "knn": knn(train_xy, test_xy), "weight_decay": probe.weight_decay,
                "weight_decay_at_edge": probe.at_edge, "weight_decays_tried": sorted(probe.val_top1),
                "feature_dim": int(train_xy[0].shape[1]),
                "probe_seconds": round(time.perf_counter() - t0, 1), "scored": len(test_xy[1]), **extra}

    def train_transform(image_size: int, scale_min: float, norm=(None, None)) -> v2.Compose:
        mean, std = norm[0] or train.mean, norm[1] or train.std
        return v2.Compose([v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def sgd_fit(slug: str, model, trainable, image_size: int, schedule: SGDSchedule, scale_min: float,
                input_fn=lambda x: x, held_out: int = 0, drop_last: bool = True, norm=(None, None)) -> dict[str, Any]:
        """Fit with the checkpointed SGD loop, then top-1/top-5 of ``model`` on the test split.

        With ``held_out`` > 0 that many train images are kept out of the fit to draw its held-out
        curve, which says whether it converged (and drives ``schedule.patience``)."""
        fit_images, held_images = disjoint_subsets(train, len(train) - held_out, held_out) if held_out else (train, None)

        def held_out_top1(m) -> float:
            logits, y = extract_features(m, ImageListDataset(held_images, image_size, cfg.center_crop_ratio, *norm),
                                         accelerator, cfg.batch_size_per_process, cfg.num_workers, input_fn=input_fn, shard=True)
            return topk_accuracy(logits, y, 1)

        train_set = MultiViewDataset(fit_images, [train_transform(image_size, scale_min, norm)], seed=cfg.seed)
        # A checkpoint belongs to one configuration: another config (or other weights) starts afresh.
        fit_id = hashlib.sha256(f"{config_yaml}{slug}".encode()).hexdigest()[:10]
        outcome = fit_classifier(accelerator, model, trainable, train_set, schedule,
                                 out / "checkpoints" / f"{slug}-{fit_id}", desc=slug, num_workers=cfg.num_workers,
                                 input_fn=input_fn, stop=stop, held_out=held_out_top1 if held_out else None,
                                 drop_last=drop_last)
        if outcome is None:
            raise Stopped(f"stopped by {stop.signal_name or 'a signal on another rank'} during '{slug}'; "
                          "its checkpoint is saved: rerun the same command to resume")
        logits, y = features(accelerator.unwrap_model(model), "test", image_size, input_fn, norm)
        p = outcome.progress
        steps_per_epoch = len(fit_images) // schedule.global_batch_size if drop_last else -(-len(fit_images) // schedule.global_batch_size)
        budget = f"{p.epoch} epochs" if p.step_in_epoch == 0 else f"{p.global_step} steps"
        return {"top1": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5), "trained": budget,
                "scored": len(y), "epochs": round(p.global_step / max(steps_per_epoch, 1), 2), "steps": p.global_step,
                "wall_s": outcome.wall_s, "converged": outcome.converged, "held_out_top1": outcome.held_out}

    def encoder_row(name: str, kind: str, encoder, meta: dict, sha: str | None) -> dict[str, Any]:
        """An encoder scored at its export's own input size and normalisation."""
        input_fn, image_size, norm = input_fn_for(meta), meta["input_size"][-1], norm_of(meta)
        encoder = encoder.to(accelerator.device).eval().requires_grad_(False)
        t0 = time.perf_counter()
        feats = [features(encoder, split, image_size, input_fn, norm) for split in ("train", "test")]
        rate = round((len(train) + len(test)) / (time.perf_counter() - t0), 1)
        extra = {"weights_sha256": sha, "extract_images_per_s": rate, "input_size": image_size}
        if cfg.protocol == "fast":
            return fast_row(name, kind, *feats, **extra)
        s = cfg.sgd
        head = torch.nn.Linear(feats[0][0].shape[1], num_classes)
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)
        schedule = SGDSchedule(lr=s.lr, epochs=s.epochs, global_batch_size=s.global_batch_size, momentum=s.momentum,
                               weight_decay=s.weight_decay, milestones=tuple(s.milestones),
                               checkpoint_every=s.checkpoint_every)
        slug = "probe_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        scores = sgd_fit(slug, LinearProbeModel(encoder, head), head, image_size, schedule, s.crop_scale_min, input_fn,
                         drop_last=False, norm=norm)
        return {"name": name, "kind": kind, "protocol": "imagenet", **scores, "knn": knn(*feats),
                "feature_dim": int(feats[0][0].shape[1]), **extra}

    b = cfg.baselines
    alexnet_protocol = f"supervised-v1: {size} px, centre crop ratio {cfg.center_crop_ratio}, test split"

    def alexnet_row() -> dict[str, Any]:
        """The supervised AlexNet: a stored converged result when one matches, else trained here."""
        if b.use_stored and not cfg.store_baselines:
            found = find_stored(Path(b.store), "alexnet_supervised", cfg.dataset, alexnet_protocol,
                                lambda: data_fingerprint(train, test))
            if found:
                accelerator.print(f"AlexNet supervised: using the stored result {found['stored_path']} ({found['date']})")
                return {**{k: found[k] for k in ("kind", "protocol", "top1", "top5", "epochs", "steps", "wall_s",
                                                  "converged", "trained")},
                        "name": f"AlexNet supervised ({found['epochs']:g} epochs{CONVERGENCE[found['converged']]}, "
                                f"stored {found['date'][:10]})", "knn": None,
                        "stored": found["stored_path"], "stored_date": found["date"], "input_size": size}
        alexnet = supervised_alexnet(train.channels, size, num_classes)
        schedule = SGDSchedule(lr=b.alexnet_lr, epochs=b.alexnet_epochs, global_batch_size=b.alexnet_global_batch_size,
                               weight_decay=b.alexnet_weight_decay, max_steps=b.alexnet_max_steps,
                               checkpoint_every=cfg.sgd.checkpoint_every, eval_every=b.alexnet_eval_every,
                               patience=b.alexnet_patience, optimizer=b.alexnet_optimizer,
                               warmup_steps=b.alexnet_warmup_steps)
        scores = sgd_fit("alexnet_supervised", alexnet, alexnet, size, schedule, b.alexnet_crop_scale_min,
                         held_out=min(b.alexnet_held_out, len(train) // 2))
        budget = f"{scores['trained']}, {scores['epochs']:g} epochs, {scores['wall_s']:.0f} s{CONVERGENCE[scores['converged']]}"
        if b.alexnet_optimizer != "sgd":
            budget = f"{b.alexnet_optimizer.replace('adamw', 'AdamW')}, {budget}"
        row = {"name": f"AlexNet supervised ({budget})", "kind": "alexnet_supervised",
               "protocol": "supervised", **scores, "optimizer": b.alexnet_optimizer, "knn": None, "input_size": size}
        if cfg.store_baselines and accelerator.is_main_process:
            path = store_result(Path(b.store), row, dataset=cfg.dataset, protocol=alexnet_protocol,
                                data_sha256=data_fingerprint(train, test),
                                config=OmegaConf.to_yaml(OmegaConf.structured(cfg)), revision=git_revision())
            print(f"stored {path}", flush=True)
        return row

    def input_fn_for(meta: dict):
        """Loaded images -> the encoder's input: the L (or ab) channels of Lab for CMC exports, else as is."""
        channels = {"lab_L": 0, "lab_ab": 1}.get(meta.get("input_transform", "normalise"))
        if channels is not None:
            return lambda x: split_lab([x], meta["mean"], meta["std"])[channels]
        return lambda x: x

    def all_views(encoder, meta: dict, views: list) -> tuple[ConcatViewEncoders, dict]:
        """An export with one encoder per view as CMC evaluates it: every view's features concatenated."""
        fns = [input_fn_for(meta), *(input_fn_for({**meta, **entry}) for entry, _ in views)]
        return ConcatViewEncoders([encoder, *(e for _, e in views)], fns), {**meta, "input_transform": "normalise"}

    def pretrain_seconds(meta: dict) -> float:
        summary = meta.get("summary") or {}
        return float(summary.get("pretrain_seconds") or summary.get("seconds_this_run") or 0)

    def supervised_encoder_row(w: str, meta: dict) -> dict[str, Any]:
        """Our export's architecture trained end to end with labels for its pretraining's wall time, then
        scored like our encoder (the upper reference SSL papers print beside their probes)."""
        seconds = b.supervised_encoder_seconds or pretrain_seconds(meta)
        encoder = create_encoder(meta["architecture"], meta["in_chans"], meta["small_input"],
                                 meta.get("stem_stride", 1), meta.get("timm_kwargs"))
        model = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.num_features, num_classes))
        schedule = SGDSchedule(lr=b.supervised_encoder_lr, epochs=b.supervised_encoder_max_epochs,
                               global_batch_size=b.alexnet_global_batch_size, weight_decay=b.alexnet_weight_decay,
                               max_seconds=seconds, checkpoint_every=cfg.sgd.checkpoint_every)
        scores = sgd_fit(f"supervised_{meta['architecture']}_{meta['sha256'][:8]}", model, model, meta["input_size"][-1],
                         schedule, b.alexnet_crop_scale_min, input_fn=input_fn_for(meta), norm=norm_of(meta))
        row = encoder_row(f"supervised {meta['architecture']} ({seconds:.0f} s budget)", "supervised_encoder",
                          encoder, meta, None)
        return {**row, **{k: scores[k] for k in ("epochs", "steps", "wall_s")}, "supervised_top1": scores["top1"],
                "budget_s": seconds}

    jobs = len(exports) * (2 if cfg.random_init else 1) + sum(bool(v) for v in view_encoders.values()) + cfg.raw_pixels + b.alexnet_supervised + 5 * bool(b.alexnet_weights) \
        + len(exports) * b.supervised_encoder
    accelerator.print(f"eval: {len(train)} train / {len(test)} test images of {cfg.dataset}, protocol {cfg.protocol}, "
                      f"{jobs} rows to compute on {accelerator.num_processes} process(es)")
    # ------------------------------------------------------------------ our encoders (+ random init of each arch)
    def view_label(meta: dict, v: int) -> str:
        return {"lab_L": "L", "lab_ab": "ab"}.get(meta.get("input_transform", ""), f"view {v}")

    def random_like(meta: dict, in_chans: int):
        return create_encoder(meta["architecture"], in_chans, meta["small_input"], meta.get("stem_stride", 1),
                              meta.get("timm_kwargs"))

    for w, encoder, meta in exports:
        name = Path(w).resolve().parent.name if Path(w).name == "export" else Path(w).name
        views = view_encoders[w]
        scored = [(name, encoder, meta)]
        if views:  # CMC's protocol (every view's features concatenated) first, then the first view's alone
            labels = [view_label(meta, 0), *(view_label(entry, v) for v, (entry, _) in enumerate(views, start=1))]
            scored = [(f"{name} ({' + '.join(labels)} concatenated)", *all_views(encoder, meta, views)),
                      (f"{name} ({labels[0]} only)", encoder, meta)]
        for row_name, model, row_meta in scored:
            before = fingerprint(model)
            rows.append(encoder_row(row_name, "ours", model, row_meta, meta["sha256"]))
            assert_unchanged(model, before, w)
        if cfg.random_init:
            random_encoder, random_meta = random_like(meta, meta["in_chans"]), meta
            if views:
                random_encoder, random_meta = all_views(random_encoder, meta,
                                                        [(entry, random_like(meta, entry["in_chans"])) for entry, _ in views])
            before = fingerprint(random_encoder)
            rows.append(encoder_row(f"random init {meta['architecture']}" + (" (concatenated)" if views else ""),
                                    "random_init", random_encoder, random_meta, None))
            assert_unchanged(random_encoder, before, "the random-init encoder")
    # ------------------------------------------------------------------ raw pixels
    if cfg.raw_pixels and train.channels * size * size <= 4096:
        rows.append(fast_row("raw pixels", "raw_pixels", pixel_features(train, size, cfg.batch_size_per_process),
                             pixel_features(test, size, cfg.batch_size_per_process), input_size=size))
    # ------------------------------------------------------------------ AlexNet baselines
    if b.alexnet_supervised:
        rows.append(alexnet_row())
    if b.supervised_encoder:
        for w, _, meta in exports:
            if b.supervised_encoder_seconds or pretrain_seconds(meta):
                rows.append(supervised_encoder_row(w, meta))
            else:
                accelerator.print(f"no supervised-encoder row for {w}: its export records no pretraining time; "
                                  "set baselines.supervised_encoder_seconds")
    if b.alexnet_weights:
        for layer in range(1, 6):
            trunk = AlexNetConvFeatures(alexnet_trunk, layer, train.channels)
            before = fingerprint(trunk)
            feats = [features(trunk, split, b.alexnet_probe_size) for split in ("train", "test")]
            rows.append(fast_row(f"AlexNet conv{layer} ({Path(b.alexnet_weights).name})", "alexnet_conv", *feats))
            assert_unchanged(trunk, before, b.alexnet_weights)
    if b.published:
        rows.extend(published_rows())

    # ------------------------------------------------------------------ delta vs supervised AlexNet, report
    measured = [r["top1"] for r in rows if r["kind"] == "alexnet_supervised"]
    reference = measured[0] if measured else (REFERENCE_ALEXNET_TOP1 if b.published else None)
    for r in rows:
        r["delta_vs_alexnet"] = None if reference is None or r["kind"] == "alexnet_supervised" else r["top1"] - reference
    if accelerator.is_main_process:
        meta = {"dataset": cfg.dataset, "protocol": PROTOCOLS[cfg.protocol].split(":")[0],
                "protocol_description": f"{PROTOCOLS[cfg.protocol]}. {KNN}.", "seed": cfg.seed,
                "train_images": len(train), "test_images": len(test), "processes": accelerator.num_processes,
                "alexnet_reference_top1": reference, "config": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
                "train_step": int((exports[0][2].get("summary") or {}).get("steps") or 0) if exports else 0}
        table = write_report(out, rows, meta, list(cfg.knn_k))
        print(f"\n{table}\n\nreport: {out / 'report.md'}  {out / 'report.json'}  {out / 'report.png'}", flush=True)
    accelerator.wait_for_everyone()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from eval.classifier import NothingToTrain
    from eval.config import EvalConfig, validate_eval
    from eval.features import EncoderChanged
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description="Linear probe + kNN of frozen exported encoders, beside AlexNet.")
    parser.add_argument("--config", help="YAML with differences from the eval defaults (configs/probe_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. weights=runs/x/export")
    args = parser.parse_args(argv)
    # `weights=a` means one export; `weights=[a,b]` several (the schema field is a list).
    overrides = [f"weights=[{o[8:]}]" if o.startswith("weights=") and not o[8:].startswith("[") else o
                 for o in args.overrides]
    try:
        cfg = load_config(args.config, overrides, schema=EvalConfig, check=validate_eval)
        evaluate(cfg)
    except (ConfigError, EncoderChanged, NothingToTrain) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # every checkpoint of a fit damaged, or the disk full at a save
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"eval {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. state-dict key mismatch between config.json and the weights
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        print(f"error: the weights do not match the architecture in config.json: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from pretrain.entry import drop_script_dir

    drop_script_dir()
    sys.exit(main())
