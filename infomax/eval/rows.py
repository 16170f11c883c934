"""Each row of the eval report, computed one way: our exports (CMC's concatenated views and the first
view alone), random init, raw pixels, the supervised AlexNet (trained here or stored), our
architecture trained with labels, AlexNet conv probes, the published figures.

:class:`Rows` holds what every row needs: the splits, the accelerator, the output directory and the
stop flag of the resumable SGD fits. :meth:`Rows.plan` chooses the rows from the config as a list of
:class:`RowBuilder` (a name and how to build the row), which ``infomax.eval.main.evaluate`` counts, runs,
reports progress on and writes to the report in one loop.

Adding a row touches this file alone (and infomax/config/eval.py for a new key), plus its test: a method of
:class:`Rows` that computes it, and one entry in :meth:`Rows.plan` (with its
:class:`~infomax.eval.progress.RowCost` if it is not an ordinary scored row). The count, the progress lines
and the report follow from the list (docs/DESIGN.md, "How to add an eval row").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from infomax.config.pretrain import ViewConfig, to_yaml
from infomax.data import ImageDataset, MultiViewDataset, build_view_transform
from infomax.data.batch_views import BatchViews
from infomax.data.colour import split_lab
from infomax.data.datasets import Subset, disjoint_subsets, labels_of
from infomax.eval.baselines import AlexNetConvFeatures, published_rows, supervised_alexnet
from infomax.eval.classifier import Augment, LinearProbeModel, SGDSchedule, fit_classifier, fit_label
from infomax.eval.features import ConcatViewEncoders, assert_unchanged, fingerprint, pixel_features
from infomax.eval.label_fractions import fraction_indices, fraction_key, fraction_scores, label_fraction_scores
from infomax.eval.probe import ProbeResult, linear_probe, topk_accuracy
from infomax.eval.progress import SUPERVISED_STEP_PER_PRETRAIN_STEP, RowCost, pretrain_step_seconds
from infomax.eval.stored_baselines import (
    alexnet_protocol,
    data_fingerprint,
    find_stored,
    scored_split,
    store_dir,
    store_result,
)
from infomax.features.extract import ImageListDataset, beton_features, extract_features
from infomax.features.knn import knn_predict_many, sharded_knn_predict_many
from infomax.method.models import create_encoder
from infomax.runtime.revision import git_revision
from infomax.runtime.stop import StopFlag

Norm = tuple[Any, Any]  # (mean, std); (None, None) = the dataset's own
NO_NORM: Norm = (None, None)


class Stopped(RuntimeError):
    """A signal stopped a long probe; its checkpoint is saved and rerunning resumes. ``signal_name``: the signal
    this process received ('' when the stop came from another rank)."""

    def __init__(self, message: str, signal_name: str = "") -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @classmethod
    def by(cls, stop: StopFlag, when: str) -> Stopped:
        """Stopped by ``stop``'s signal (or another rank's), ``when`` (e.g. "during 'probe'")."""
        return cls(f"stopped by {stop.signal_name or 'a signal on another rank'} {when}", stop.signal_name)


@dataclass(frozen=True)
class RowBuilder:
    """One row of the report before it is computed: its name and how to build it.

    ``cost()`` says what the row costs for the progress lines (:class:`~infomax.eval.progress.RowClock`); it is
    asked once the rows are counted, since it may look for a stored result. ``quoted``: a published
    figure, not computed: it has no progress line and is not among the rows to compute."""

    name: str
    build: Callable[[], dict[str, Any]]
    cost: Callable[[], RowCost] = lambda: RowCost()
    quoted: bool = False


def has_raw_pixels_row(cfg: Any, channels: int, size: int) -> bool:
    """Whether the report has a raw-pixels row: asked for, and on small images (``channels`` x ``size``^2
    at most 4096 values)."""
    return bool(cfg.raw_pixels) and channels * size * size <= 4096


def export_names(weights: Sequence[str]) -> list[str]:
    """Each export's row name: its run directory's for ``<run>/export`` (or its encoder.safetensors), else its
    folder's; exports of one name get the parent folders that tell them apart (``a/seed0``, ``b/seed0``)."""
    dirs = [Path(w).resolve() for w in weights]  # planned before an export is written too: no file is read
    dirs = [d.parent if d.suffix == ".safetensors" else d for d in dirs]
    parts = [d.parts[1:-1] if d.name == "export" else d.parts[1:] for d in dirs]  # without the root, "/"
    names = [p[-1] if p else "/" for p in parts]
    for depth in range(2, max(map(len, parts), default=0) + 1):
        clash = {n for n in names if names.count(n) > 1}  # the same export named twice keeps its clash
        names = ["/".join(p[-depth:]) if n in clash else n for n, p in zip(names, parts)]
    return names


def for_export(builder: RowBuilder, sha256: str) -> RowBuilder:
    """``builder``, its row marked with the export it belongs to (``export_sha256``): its Δ vs supervised is
    against that export's architecture."""
    build = builder.build
    return dataclasses.replace(builder, build=lambda: {**build(), "export_sha256": sha256})


def input_fn_for(meta: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """Loaded images -> the encoder's input: the L (or ab) channels of Lab for CMC exports, else as is."""
    channels = {"lab_L": 0, "lab_ab": 1}.get(meta.get("input_transform", "normalise"))
    if channels is not None:
        return lambda x: split_lab([x], meta["mean"], meta["std"])[channels]
    return lambda x: x


def norm_of(meta: dict) -> Norm:
    """An export's own normalisation (its config.json), which its encoder was trained with."""
    return list(meta["mean"]), list(meta["std"])


def view_label(meta: dict, v: int) -> str:
    return {"lab_L": "L", "lab_ab": "ab"}.get(meta.get("input_transform", ""), f"view {v}")


def random_like(meta: dict, in_chans: int) -> nn.Module:
    return create_encoder(meta["architecture"], in_chans, meta["small_input"], meta["stem_stride"],
                          meta["timm_kwargs"])


def all_views(encoder: nn.Module, meta: dict, views: list) -> tuple[ConcatViewEncoders, dict]:
    """An export with one encoder per view as CMC evaluates it: every view's features concatenated."""
    fns = [input_fn_for(meta), *(input_fn_for({**meta, **entry}) for entry, _ in views)]
    return ConcatViewEncoders([encoder, *(e for _, e in views)], fns), {**meta, "input_transform": "normalise"}


def pretrain_epochs(meta: dict) -> float:
    """The epochs (fractional) the export was pretrained for, 0 when its summary does not say."""
    return float((meta.get("summary") or {}).get("epochs_trained") or 0)


def supervised_epochs(meta: dict, baselines: Any) -> float:
    """The supervised-encoder fit's epochs: as many as the export's pretraining, unless configured."""
    return baselines.supervised_encoder_epochs or pretrain_epochs(meta)


def supervised_encoder_protocol(meta: dict, cfg: Any) -> str:
    """Everything the supervised-encoder row depends on but the data (the export's architecture and input, the
    epochs, the fit, the scoring): a stored one is used only under the same string."""
    b = cfg.baselines
    epochs = supervised_epochs(meta, b)
    arch = {k: meta.get(k) for k in ("architecture", "timm_kwargs", "in_chans", "input_size", "small_input",
                                     "stem_stride", "input_transform", "mean", "std")}
    return (f"supervised-encoder-v1: {json.dumps(arch, sort_keys=True)}; {epochs:g} epochs, SGD lr "
            f"{b.supervised_encoder_lr:g}, weight decay {b.supervised_encoder_weight_decay:g}, global batch "
            f"{b.supervised_encoder_global_batch_size}, crops {b.alexnet_crop_scale_min:g}-1; scored by {cfg.protocol} "
            f"(centre crop ratio {cfg.center_crop_ratio}, kNN k {list(cfg.knn_k)}), {scored_split(cfg.holdout)}")


def knn_top1(train_xy: tuple[torch.Tensor, torch.Tensor], test_xy: tuple[torch.Tensor, torch.Tensor],
             ks: Sequence[int], temperature: float, num_classes: int, bank_sharded: bool = False,
             bank_size: int | None = None) -> dict[str, float]:
    """kNN top-1 per k on every process, from (N x F, N) train and (M x F, M) test features and labels. With
    ``bank_sharded`` ``train_xy`` is this process's share of the bank, on the device (the imagenet protocol), and
    ``bank_size`` the whole bank's. Each is labelled with the k it used: at most the bank's size."""
    (fx, fy), (tx, ty) = train_xy, test_xy
    predict = sharded_knn_predict_many if bank_sharded else knn_predict_many
    preds = predict(fx, fy, tx, ks, temperature, num_classes)
    n = bank_size if bank_size is not None else len(fx)
    return {str(min(k, n)): (pred.cpu() == ty.cpu()).float().mean().item() for k, pred in preds.items()}


class Rows:
    def __init__(self, cfg: Any, accelerator: Accelerator, train: ImageDataset, test: ImageDataset, size: int,
                 out: Path, fit_key: str, stop: StopFlag | None = None) -> None:
        self.cfg, self.b, self.accelerator = cfg, cfg.baselines, accelerator
        self.train, self.test, self.size, self.out, self.fit_key = train, test, size, out, fit_key
        self.splits, self.betons = {"train": train, "test": test}, {"train": cfg.train_beton, "test": cfg.test_beton}
        self.num_classes = train.num_classes
        self.stop = stop or StopFlag()  # the eval installs its signal handlers; a plan made elsewhere does not
        self.unreadable: dict[str, int] = {}  # images each split could not decode, skipped by every row
        self.alexnet_protocol = alexnet_protocol(size, cfg.center_crop_ratio, cfg.holdout)

    # ------------------------------------------------------------------ shared steps
    def memory_format(self, model: nn.Module) -> nn.Module:
        """``model`` with channels_last weights (in place) when configured: its convs then run in NHWC, as
        pretraining's do with model.channels_last (1.8x on the demo encoder's forward pass, benchmarks/README.md)."""
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def features(self, model: nn.Module, split: str, image_size: int, input_fn=lambda x: x, norm: Norm = NO_NORM,
                 keep_shard: bool = False):
        """N x F outputs of ``model`` and N labels for the train or test split, all processes sharing the work;
        images normalised with ``norm`` = (mean, std) (None: the dataset's). ``keep_shard``: each process keeps
        only its own share (a kNN bank that stays split)."""
        cfg = self.cfg
        if self.betons[split]:  # the FFCV path: decode + centre crop in FFCV, normalised in torch
            return beton_features(model, self.betons[split], image_size, cfg.center_crop_ratio,
                                  cfg.batch_size_per_process, self.accelerator, max(1, cfg.num_workers), input_fn,
                                  *norm, keep_shard=keep_shard)
        feats, labels = extract_features(
            model, ImageListDataset(self.splits[split], image_size, cfg.center_crop_ratio, *norm), self.accelerator,
            cfg.batch_size_per_process, cfg.num_workers, input_fn=input_fn, shard=True, keep_shard=keep_shard)
        skipped = len(self.splits[split]) - len(labels)
        if not keep_shard and skipped and split not in self.unreadable:  # said once, as pretraining counts them
            self.unreadable[split] = skipped
            self.accelerator.print(f"eval: {skipped} unreadable image(s) of the {split} split skipped: "
                                   f"{'scored' if split == 'test' else 'fitted'} on the other {len(labels)}",
                                   flush=True)
        return feats, labels

    def knn(self, train_xy, test_xy, bank_sharded: bool = False) -> dict[str, float]:
        return knn_top1(train_xy, test_xy, self.cfg.knn_k, self.cfg.knn_temperature, self.num_classes, bank_sharded,
                        len(self.train))

    def probe(self, train_xy, test_xy) -> ProbeResult:
        cfg = self.cfg
        return linear_probe(*train_xy, *test_xy, tuple(cfg.weight_decays), steps=cfg.probe_steps, seed=cfg.seed)

    def fast_row(self, name: str, kind: str, train_xy, test_xy, **extra: Any) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.perf_counter()
        probe = self.probe(train_xy, test_xy)
        row = {"name": name, "kind": kind, "protocol": "fast", "top1": probe.top1, "top5": probe.top5,
               "knn": self.knn(train_xy, test_xy), "weight_decay": probe.weight_decay,
               "weight_decay_at_edge": probe.at_edge, "weight_decays_tried": sorted(probe.val_top1),
               "probe_grad_max": probe.grad_max, "feature_dim": int(train_xy[0].shape[1]),
               "probe_seconds": round(time.perf_counter() - t0, 1), "scored": len(test_xy[1]), **extra}
        # The supervised encoder was trained on every label: its fractions' scores come from fits on the fraction
        # alone (supervised_fractions).
        fractions = [] if kind == "supervised_encoder" else list(cfg.label_fractions)
        return {**row, "label_fractions": label_fraction_scores(train_xy, test_xy, fractions, cfg.seed, self.probe,
                                                                self.subset_knn)}

    def subset_knn(self, train_xy, test_xy) -> dict[str, float]:
        """kNN top-1 per k with a part of the train split as the bank, each k labelled with the k it used."""
        return knn_top1(train_xy, test_xy, self.cfg.knn_k, self.cfg.knn_temperature, self.num_classes)

    def train_input(self, images: ImageDataset, image_size: int, scale_min: float,
                    norm: Norm = NO_NORM) -> tuple[MultiViewDataset, Augment | None, int]:
        """The SGD fits' augmentation, RandomResizedCrop + flip + normalise (pretraining's view recipe without
        colour): (the fit's dataset, its on-device augment or None, its loader workers).

        Same-size images are drawn per batch on the device by ``BatchViews``, as pretraining's
        data.augment=batch does: the loader only collates uint8 images and needs no workers, which on a
        2-core CPU would take the cores from the step (benchmarks/results/eval_stage.md). Other images
        go through torchvision per image in the loader workers."""
        cfg = self.cfg
        mean, std = norm[0] or self.train.mean, norm[1] or self.train.std
        view = ViewConfig(size=image_size, crop_scale_min=scale_min, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
        if not images.same_size:
            transform = build_view_transform(view, self.train.channels, mean, std)
            return MultiViewDataset(images, [transform], seed=cfg.seed), None, cfg.num_workers
        views, rank = BatchViews([view], mean, std, cfg.seed), self.accelerator.process_index
        return MultiViewDataset(images, [], seed=cfg.seed), lambda x, epoch, step: views(x, epoch, step, rank)[0], 0

    def sgd_fit(self, slug: str, model: nn.Module, trainable: nn.Module, image_size: int, schedule: SGDSchedule,
                scale_min: float, input_fn=lambda x: x, held_out: int = 0, drop_last: bool = True,
                norm: Norm = NO_NORM, images: ImageDataset | None = None) -> dict[str, Any]:
        """Fit with the checkpointed SGD loop on ``images`` (default: the train split), then top-1/top-5 of
        ``model`` on the scored split (test or validation).

        With ``held_out`` > 0 that many train images are kept out of the fit to draw its held-out
        curve, which drives ``schedule.patience`` (early stopping: the only fit called converged)."""
        cfg, acc, train = self.cfg, self.accelerator, self.train if images is None else images
        model = self.memory_format(model)  # in place: ``trainable`` is a part of it
        fit_images, held_images = (disjoint_subsets(train, len(train) - held_out, held_out) if held_out
                                   else (train, None))
        held_set = ImageListDataset(held_images, image_size, cfg.center_crop_ratio, *norm) if held_out else None

        def held_out_top1(m: nn.Module) -> float:
            logits, y = extract_features(m, held_set, acc, cfg.batch_size_per_process, cfg.num_workers,
                                         input_fn=input_fn, shard=True)
            return topk_accuracy(logits, y, 1)

        train_set, augment, workers = self.train_input(fit_images, image_size, scale_min, norm)
        # A checkpoint belongs to one configuration: another config (or other weights) starts afresh.
        fit_id = hashlib.sha256(f"{self.fit_key}{slug}".encode()).hexdigest()[:10]
        outcome = fit_classifier(acc, model, trainable, train_set, schedule,
                                 self.out / "checkpoints" / f"{slug}-{fit_id}", desc=slug, num_workers=workers,
                                 input_fn=input_fn, stop=self.stop,
                                 held_out=held_out_top1 if held_out else None, drop_last=drop_last, augment=augment)
        if outcome is None:
            raise Stopped.by(self.stop, f"during '{slug}'; its checkpoint is saved")
        logits, y = self.features(acc.unwrap_model(model), "test", image_size, input_fn, norm)
        p, batch = outcome.progress, schedule.global_batch_size
        steps_per_epoch = len(fit_images) // batch if drop_last else -(-len(fit_images) // batch)
        budget = f"{p.epoch} epochs" if p.step_in_epoch == 0 else f"{p.global_step} steps"
        return {"top1": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5), "trained": budget,
                "scored": len(y), "epochs": round(p.global_step / max(steps_per_epoch, 1), 2), "steps": p.global_step,
                "wall_s": outcome.wall_s, "stopped": outcome.stopped, "converged": outcome.converged,
                "held_out_top1": outcome.held_out, "augment": "loader" if augment is None else "batch"}

    # ------------------------------------------------------------------ rows
    def encoder_row(self, name: str, kind: str, encoder: nn.Module, meta: dict, sha: str | None) -> dict[str, Any]:
        """An encoder scored at its export's own input size and normalisation, by the configured protocol."""
        cfg, acc = self.cfg, self.accelerator
        input_fn, image_size, norm = input_fn_for(meta), meta["input_size"][-1], norm_of(meta)
        encoder = self.memory_format(encoder.to(acc.device)).eval().requires_grad_(False)
        before, t0 = fingerprint(encoder), time.perf_counter()
        # The imagenet protocol's probe trains on images, so its train features serve the kNN alone and stay
        # split across the ranks (1.28M x 2048 is 10 GB a copy); the fast probe fits on all of them.
        feats = [self.features(encoder, split, image_size, input_fn, norm,
                               keep_shard=split == "train" and cfg.protocol != "fast") for split in ("train", "test")]
        rate = round((len(self.train) + len(self.test)) / (time.perf_counter() - t0), 1)
        extra = {"weights_sha256": sha, "extract_images_per_s": rate, "input_size": image_size}
        if cfg.protocol == "fast":
            row = self.fast_row(name, kind, *feats, **extra)
        else:
            s = cfg.sgd
            head = torch.nn.Linear(feats[0][0].shape[1], self.num_classes)
            torch.nn.init.normal_(head.weight, std=0.01)
            torch.nn.init.zeros_(head.bias)
            schedule = SGDSchedule(lr=s.lr, epochs=s.epochs, global_batch_size=s.global_batch_size, momentum=s.momentum,
                                   weight_decay=s.weight_decay, milestones=tuple(s.milestones),
                                   checkpoint_every=s.checkpoint_every,
                                   checkpoint_every_min=s.checkpoint_every_min)
            # One checkpoint dir per row: two exports may share a run-dir name or an architecture.
            slug = "probe_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + f"_{meta['sha256'][:8]}"
            scores = self.sgd_fit(slug, LinearProbeModel(encoder, head), head, image_size, schedule, s.crop_scale_min,
                                  input_fn, drop_last=False, norm=norm)
            row = {"name": name, "kind": kind, "protocol": "imagenet", **scores,
                   "knn": self.knn(*feats, bank_sharded=True), "feature_dim": int(feats[0][0].shape[1]), **extra}
        assert_unchanged(encoder, before, name)
        return row

    def export_rows(self, name: str, encoder: nn.Module | None, meta: dict, views: list,
                    owner: str = "") -> list[RowBuilder]:
        """Our export's rows: CMC's protocol (every view's features concatenated) first when it has one
        encoder per view, then the first view's encoder alone; then its random-init floor, named with ``owner``
        (the export's name when another export shares its architecture). What each costs is read from config.json
        alone (``encoder`` and the views' encoders are None when the export is planned)."""
        widths = [int(meta["num_features"]), *(int(entry["num_features"]) for entry, _ in views)]
        alone = (name, lambda: (encoder, meta), RowCost(passes=1, features=widths[0]))
        scored = [alone]
        if views:
            labels = [view_label(meta, 0), *(view_label(entry, v) for v, (entry, _) in enumerate(views, start=1))]
            scored = [(f"{name} ({' + '.join(labels)} concatenated)", lambda: all_views(encoder, meta, views),
                       RowCost(passes=len(widths), features=sum(widths))), (f"{name} ({labels[0]} only)", *alone[1:])]
        rows = [RowBuilder(row_name, functools.partial(self.export_row, row_name, model_of, meta["sha256"]),
                           cost=lambda c=cost: c)
                for row_name, model_of, cost in scored]
        if self.cfg.random_init:
            notes = ", ".join(n for n in (owner, "concatenated" if views else "") if n)
            random_name = f"random init {meta['architecture']}" + (f" ({notes})" if notes else "")
            rows.append(RowBuilder(random_name, functools.partial(self.random_init_row, random_name, meta, views),
                                   cost=lambda: RowCost(passes=len(widths), features=sum(widths))))
        return rows

    def export_row(self, name: str, model_of: Callable[[], tuple[nn.Module, dict]], sha: str) -> dict[str, Any]:
        return self.encoder_row(name, "ours", *model_of(), sha)

    def random_init_row(self, name: str, meta: dict, views: list) -> dict[str, Any]:
        """The export's architecture at random init (every view's encoder, concatenated, for an export with
        one per view), drawn from the seeded RNG when the row is computed, scored as ours is."""
        random_encoder, random_meta = random_like(meta, meta["in_chans"]), meta
        if views:
            random_views = [(entry, random_like(meta, entry["in_chans"])) for entry, _ in views]
            random_encoder, random_meta = all_views(random_encoder, meta, random_views)
        return self.encoder_row(name, "random_init", random_encoder, random_meta, None)

    def raw_pixels_row(self) -> dict[str, Any]:
        batch = self.cfg.batch_size_per_process
        return self.fast_row("raw pixels", "raw_pixels", pixel_features(self.train, self.size, batch),
                             pixel_features(self.test, self.size, batch), input_size=self.size)

    def alexnet_row(self) -> dict[str, Any]:
        """The supervised AlexNet: a stored result when one matches, else trained here."""
        cfg, b, size = self.cfg, self.b, self.size
        if (found := self.stored("alexnet_supervised", self.alexnet_protocol)) is not None:
            return {**{k: found[k] for k in ("kind", "top1", "top5", "epochs", "steps", "wall_s", "stopped",
                                              "trained")}, "protocol": "supervised",
                    "converged": found["stopped"] == "early_stopping",  # the rule of today, for older records too
                    "stored_protocol": found["protocol"],
                    "name": f"AlexNet supervised ({found['epochs']:g} epochs"
                            f"{fit_label(found['stopped'])}, stored {found['date'][:10]})",
                    "knn": None, "stored": found["stored_path"], "stored_date": found["date"], "input_size": size}
        revision = git_revision()  # of the code that trains it (taken before the hour-long fit)
        alexnet = supervised_alexnet(self.train.channels, size, self.num_classes)
        schedule = SGDSchedule(lr=b.alexnet_lr, epochs=b.alexnet_epochs, global_batch_size=b.alexnet_global_batch_size,
                               weight_decay=b.alexnet_weight_decay, max_steps=b.alexnet_max_steps,
                               checkpoint_every=cfg.sgd.checkpoint_every,
                               checkpoint_every_min=cfg.sgd.checkpoint_every_min, eval_every=b.alexnet_eval_every,
                               patience=b.alexnet_patience, optimizer=b.alexnet_optimizer,
                               warmup_steps=b.alexnet_warmup_steps)
        scores = self.sgd_fit("alexnet_supervised", alexnet, alexnet, size, schedule, b.alexnet_crop_scale_min,
                              held_out=min(b.alexnet_held_out, len(self.train) // 2))
        trained = scores["trained"]
        trained = trained if trained.endswith("epochs") else f"{trained}, {scores['epochs']:g} epochs"
        budget = f"{trained}, {scores['wall_s']:.0f} s{fit_label(scores['stopped'])}"
        if b.alexnet_optimizer != "sgd":
            budget = f"{b.alexnet_optimizer.replace('adamw', 'AdamW')}, {budget}"
        row = {"name": f"AlexNet supervised ({budget})", "kind": "alexnet_supervised",
               "protocol": "supervised", **scores, "optimizer": b.alexnet_optimizer, "knn": None, "input_size": size}
        self.store(row, self.alexnet_protocol, revision)
        return row

    def stored(self, kind: str, protocol: str) -> dict[str, Any] | None:
        """The stored result of ``kind`` under ``protocol`` on this data (``make baselines``), said in one line;
        None when the config asks to train and store, or none matches."""
        if found := self._find_stored(kind, protocol):
            self.accelerator.print(f"{kind}: using the stored result {found['stored_path']} ({found['date']})")
        return found

    def _find_stored(self, kind: str, protocol: str) -> dict[str, Any] | None:
        if not self.b.use_stored or self.cfg.store_baselines:
            return None
        return find_stored(store_dir(self.b.store), kind, self.cfg.dataset, protocol, lambda: self.data_sha256)

    @functools.cached_property
    def data_sha256(self) -> str:
        """:func:`data_fingerprint` of both splits (it reads every image: once per eval)."""
        return data_fingerprint(self.train, self.test)

    def store(self, row: dict[str, Any], protocol: str, revision: str, suffix: str = "") -> None:
        """With ``store_baselines``, write ``row`` to the baselines store (rank 0) for later evals to report."""
        if self.cfg.store_baselines and self.accelerator.is_main_process:
            path = store_result(store_dir(self.b.store), row, dataset=self.cfg.dataset, protocol=protocol,
                                data_sha256=self.data_sha256, suffix=suffix,
                                config=to_yaml(self.cfg), revision=revision)
            print(f"stored {path}", flush=True)

    def supervised_budget(self, meta: dict) -> tuple[float, int]:
        """(epochs, steps) of the supervised-encoder fit for an export: as many epochs as its pretraining."""
        epochs = supervised_epochs(meta, self.b)
        return epochs, max(1, round(epochs * (len(self.train) // self.b.supervised_encoder_global_batch_size)))

    def supervised_schedule(self, meta: dict) -> SGDSchedule:
        """The supervised-encoder fit's SGD: its own batch, lr and weight decay, a cosine over the budget's
        steps, and the probe's checkpoint rule (by time on the shipped ImageNet config)."""
        b, epochs, steps = self.b, *self.supervised_budget(meta)
        return SGDSchedule(lr=b.supervised_encoder_lr, epochs=math.ceil(epochs), max_steps=steps,
                           global_batch_size=b.supervised_encoder_global_batch_size,
                           weight_decay=b.supervised_encoder_weight_decay,
                           checkpoint_every=self.cfg.sgd.checkpoint_every,
                           checkpoint_every_min=self.cfg.sgd.checkpoint_every_min)

    def supervised_encoder_row(self, meta: dict, owner: str = "") -> dict[str, Any]:
        """Our export's architecture trained end to end with labels for as many epochs as its pretraining
        (an epoch budget, not seconds, so the row means the same on every machine), then scored like our
        encoder: the upper reference SSL papers print beside their probes. ``owner``: the export's name, when
        another export shares its architecture."""
        b = self.b
        epochs = self.supervised_budget(meta)[0]
        named = f"supervised {meta['architecture']} ({owner + ': ' if owner else ''}{epochs:g} epochs"
        protocol = supervised_encoder_protocol(meta, self.cfg)
        if (found := self.stored("supervised_encoder", protocol)) is not None:
            kept = {k: v for k, v in found.items() if k not in ("dataset", "data_sha256", "config", "git_revision",
                                                              "date", "stored_path", "protocol")}
            asked = {fraction_key(f) for f in self.cfg.label_fractions}  # a stored fit of other fractions: not shown
            kept["label_fractions"] = {k: v for k, v in (found.get("label_fractions") or {}).items()
                                       if k in asked and v.get("seed") == self.cfg.seed}  # nor of other images
            kept["converged"] = found["stopped"] == "early_stopping"  # the rule of today, for older records too
            return {**kept, "name": f"{named}, {found['wall_s']:.0f} s, stored {found['date'][:10]})",
                    "protocol": self.cfg.protocol, "stored_protocol": found["protocol"], "stored": found["stored_path"],
                    "stored_date": found["date"]}
        revision = git_revision()
        encoder = random_like(meta, meta["in_chans"])
        model = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.num_features, self.num_classes))
        schedule = self.supervised_schedule(meta)
        scores = self.sgd_fit(f"supervised_{meta['architecture']}_{meta['sha256'][:8]}", model, model,
                              meta["input_size"][-1], schedule, b.alexnet_crop_scale_min, input_fn=input_fn_for(meta),
                              norm=norm_of(meta))
        row = self.encoder_row(f"{named}, {scores['wall_s']:.0f} s)", "supervised_encoder", encoder, meta, None)
        row = {**row, **{k: scores[k] for k in ("epochs", "steps", "wall_s", "augment", "stopped", "converged")},
               "supervised_top1": scores["top1"], "budget_epochs": epochs,
               "label_fractions": self.supervised_fractions(meta, schedule)}
        self.store(row, protocol, revision, suffix="-" + hashlib.sha256(protocol.encode()).hexdigest()[:8])
        return row

    def supervised_fractions(self, meta: dict, schedule: SGDSchedule) -> dict[str, dict]:
        """Our architecture trained with labels on each label fraction alone (its images and labels, for as many
        steps as the full-label fit; a fraction smaller than the batch is one batch), then its probe and kNN fitted
        on the features of the same images: the reference the other rows' label-fraction columns are read
        against. Each entry names the seed that drew its images, so a stored one is shown only under that seed."""
        cfg, acc, size, norm = self.cfg, self.accelerator, meta["input_size"][-1], norm_of(meta)
        input_fn, labels, scores = input_fn_for(meta), torch.tensor(labels_of(self.train)), {}
        for fraction in cfg.label_fractions:
            subset = Subset(self.train, fraction_indices(labels, fraction, cfg.seed).tolist())
            # a global batch splits evenly over the processes
            batch = min(schedule.global_batch_size, len(subset) - len(subset) % acc.num_processes)
            fit = dataclasses.replace(schedule, global_batch_size=batch,
                                      epochs=math.ceil(schedule.max_steps / max(1, len(subset) // max(1, batch))))
            encoder = random_like(meta, meta["in_chans"])
            model = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.num_features, self.num_classes))
            self.sgd_fit(f"supervised_{100 * fraction:g}pct_{meta['architecture']}_{meta['sha256'][:8]}", model, model,
                         size, fit, self.b.alexnet_crop_scale_min, input_fn=input_fn, norm=norm, images=subset)
            encoder = encoder.to(acc.device).eval().requires_grad_(False)
            fit_xy = extract_features(encoder, ImageListDataset(subset, size, cfg.center_crop_ratio, *norm), acc,
                                      cfg.batch_size_per_process, cfg.num_workers, input_fn=input_fn, shard=True)
            test_xy = self.features(encoder, "test", size, input_fn, norm)
            scores[fraction_key(fraction)] = {**fraction_scores(fit_xy, test_xy, self.probe, self.subset_knn),
                                              "seed": cfg.seed}
        return scores

    def has_stored_supervised_encoder(self, meta: dict) -> bool:
        """Whether :meth:`supervised_encoder_row` will report a stored result (no fit to wait for)."""
        return self._find_stored("supervised_encoder", supervised_encoder_protocol(meta, self.cfg)) is not None

    def supervised_encoder_cost(self, meta: dict) -> RowCost:
        """A stored result costs nothing; a fit (one more per label fraction, as long) is reckoned from the export's
        own pretraining speed."""
        if self.has_stored_supervised_encoder(meta):
            return RowCost(scored=False)
        fits = 1 + len(self.cfg.label_fractions)
        steps = self.supervised_budget(meta)[1]
        return RowCost(fit_seconds=fits * steps * pretrain_step_seconds(meta) * SUPERVISED_STEP_PER_PRETRAIN_STEP)

    def alexnet_conv_row(self, trunk: nn.Module, layer: int) -> dict[str, Any]:
        """The linear probe of AlexNet's conv ``layer`` (1..5; its pooled ReLU outputs) from a weights file."""
        b = self.b
        features = AlexNetConvFeatures(trunk, layer, self.train.channels)
        before = fingerprint(features)
        feats = [self.features(features, split, b.alexnet_probe_size) for split in ("train", "test")]
        row = self.fast_row(f"AlexNet conv{layer} ({Path(b.alexnet_weights).name})", "alexnet_conv", *feats)
        assert_unchanged(features, before, b.alexnet_weights)
        return row

    # ------------------------------------------------------------------ which rows
    def plan(self, exports: list[tuple[str, nn.Module, dict]], view_encoders: dict[str, list],
             alexnet_trunk: nn.Module | None) -> list[RowBuilder]:
        """The report's rows in its order, as the config chooses them: each export's (``exports``: (path,
        encoder, meta); ``view_encoders``: its other views' encoders by path) and its random init, raw
        pixels (small images), the supervised AlexNet, each export's architecture trained with labels,
        AlexNet conv1..5 (``alexnet_trunk``, given a weights file), the published figures.

        A new row is one more entry here (and its method above); nothing else counts the rows."""
        cfg, b = self.cfg, self.b
        rows: list[RowBuilder] = []
        names = export_names([w for w, *_ in exports])
        archs = [meta["architecture"] for *_, meta in exports]
        owners = [name if archs.count(arch) > 1 else "" for name, arch in zip(names, archs)]  # whose baseline is whose
        for name, owner, (w, encoder, meta) in zip(names, owners, exports):
            rows += [for_export(row, meta["sha256"])
                     for row in self.export_rows(name, encoder, meta, view_encoders[w], owner)]
        if has_raw_pixels_row(cfg, self.train.channels, self.size):
            pixels = self.train.channels * self.size * self.size
            rows.append(RowBuilder("raw pixels", self.raw_pixels_row, cost=lambda: RowCost(features=pixels)))
        if b.alexnet_supervised:  # stored, or its fit shows its own progress
            rows.append(RowBuilder("AlexNet supervised", self.alexnet_row, cost=lambda: RowCost(scored=False)))
        for owner, (w, _, meta) in zip(owners, exports) if b.supervised_encoder else []:
            if b.supervised_encoder_epochs or pretrain_epochs(meta):
                planned = f"supervised {meta['architecture']}" + (f" ({owner})" if owner else "")
                rows.append(for_export(RowBuilder(planned, functools.partial(self.supervised_encoder_row, meta, owner),
                                                  cost=functools.partial(self.supervised_encoder_cost, meta)),
                                       meta["sha256"]))
            else:
                self.accelerator.print(f"no supervised-encoder row for {w}: its export records no pretraining "
                                       "epochs; set baselines.supervised_encoder_epochs")
        if alexnet_trunk is not None:
            rows += [RowBuilder(f"AlexNet conv{layer}", functools.partial(self.alexnet_conv_row, alexnet_trunk, layer))
                     for layer in range(1, 6)]
        if b.published:
            rows += [RowBuilder(row["name"], functools.partial(dict, row), quoted=True) for row in published_rows()]
        return rows
