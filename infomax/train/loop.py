"""The pretraining loop's parts, which ``infomax.train.main.train`` calls in order: the model and objective,
the optimizer and schedule, resuming, the steps, the kNN monitor, and the summary with the export.

:class:`Run` holds what one run needs across them, and is the pretraining's
:class:`~infomax.train.resumable.Trainer`: the shared :class:`~infomax.train.resumable.TrainingLoop` owns the epochs,
the position, the ranks' agreement, checkpoints and the progress bar, and calls the run's batches, its
step (:func:`infomax.train.engine.train_step`), its logging after a step and its kNN monitor at an epoch's end.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from accelerate import Accelerator
from torch import nn

from infomax.config.pretrain import Config, ConfigError, OptimConfig, effective_lr, to_yaml
from infomax.data.train_loader import TrainData
from infomax.export.encoder import META, ExportFailed, export_encoder, export_meta, export_problem
from infomax.export.model_card import CARD, card_text, eval_section
from infomax.features.extract import ImageListDataset, knn_monitor
from infomax.method.bounds import BOUNDS
from infomax.method.models import LocalGlobalModel, MultiViewModel, check_takes_views, width_kwargs
from infomax.method.momentum import MomentumKeys
from infomax.method.objectives import build_objective
from infomax.method.online_probe import OnlineProbe
from infomax.runtime.checkpoint import load_part, make_room, no_room
from infomax.runtime.distributed import Agree, sync_batchnorm, wrap_learned_critic
from infomax.runtime.hardware import Precision, describe_machine
from infomax.runtime.revision import git_revision
from infomax.runtime.stop import StopFlag
from infomax.runtime.tracking import TensorBoard, Throughput, format_duration
from infomax.train.engine import StepResult, train_step
from infomax.train.resumable import Resumable, Trainer, TrainingLoop

# The eval to come (monitor.expect_eval), reckoned by the eval stage from the planned export's config.json and
# this machine's seconds of extraction per image: (seconds, how). Built where both stages are known (infomax.launch),
# so that training imports nothing of the eval.
EvalClock = Callable[[dict[str, Any], float], tuple[float, str]]


@dataclass
class Parts:
    """The trainable parts: model, objective (with any learned critic and the queue), momentum key
    model, online probe and its optimizer."""

    model: nn.Module
    objective: nn.Module
    key_model: MomentumKeys | None
    probe: nn.Module | None
    probe_optimizer: torch.optim.Optimizer | None
    learned_critic: bool


def queue_warning(queue_size: int, images: int) -> str:
    """One line when the momentum queue holds as many keys as there are training images or more: it then holds each
    image's own earlier key among the negatives of its query (MoCo's 65536 keys are 5 % of ImageNet)."""
    if not queue_size or queue_size < images:
        return ""
    return (f"warning: objective.queue_size={queue_size} holds as many keys as the {images} training images or more, "
            "so each query meets its own image's earlier key among its negatives; lower it well below the image "
            f"count (e.g. objective.queue_size={max(1, images // 20)})")


def check_shuffle_bn(cfg: Config, processes: int) -> None:
    """The momentum queue's BatchNorm on ``processes`` ranks: per-rank statistics need MoCo's shuffle, and
    the shuffle needs statistics it can change (not synced ones, and more than one group)."""
    m, queue = cfg.model, cfg.objective.queue_size
    if queue and processes > 1 and not m.sync_bn and not m.shuffle_bn:
        raise ConfigError(
            f"bad value for config key 'model.sync_bn': false with objective.queue_size on {processes} processes lets "
            "each rank's queries find their keys through the rank's own BatchNorm statistics, the failure MoCo "
            "shuffles BN against (its Sec. 3.3); set model.shuffle_bn=1 (MoCo's shuffling BN) or model.sync_bn=true")
    if m.shuffle_bn and processes > 1 and m.sync_bn:
        raise ConfigError(
            "bad value for config key 'model.shuffle_bn': with model.sync_bn=true every group's BatchNorm statistics "
            "span the global batch, so shuffling changes nothing; set model.sync_bn=false (MoCo's setup) or "
            "model.shuffle_bn=0")
    if m.shuffle_bn == 1 and processes == 1:
        raise ConfigError("bad value for config key 'model.shuffle_bn': 1 group on one process is the batch itself, "
                          "with the queries' statistics; give 2 or more groups (MoCo's demo splits BN into 8)")


def build_parts(cfg: Config, data: TrainData, accelerator: Accelerator) -> Parts:
    """Model (one encoder per view or shared, heads), objective, the online probe; MoCo's key model is
    copied once DDP has synchronised the model (:func:`build_optimizer`)."""
    views = data.view_chans
    objective = build_objective(cfg.objective, len(views), cfg.model.head_dims[-1])
    if objective.local_stages is not None:  # the model the objective needs: local maps, or embeddings per view
        model: nn.Module = LocalGlobalModel(cfg.model, views[0], len(views), objective.local_stages)
    else:
        model = MultiViewModel(cfg.model, views, len(views))
    sizes = [v.size for v in cfg.data.views for _ in range(2 if data.lab else 1)]  # Lab: an L and an ab view each
    check_takes_views(model, cfg.model.arch, list(zip(views, sizes)))
    check_shuffle_bn(cfg, accelerator.num_processes)
    if cfg.model.sync_bn and accelerator.num_processes > 1:
        # Per-rank BN statistics let a contrastive model find its positives through batch statistics,
        # and make W ranks differ from one process with the W*B batch.
        model = sync_batchnorm(model, accelerator.device.type)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The online probe: labels train only this head, on detached features, with its own optimizer.
    probe = probe_optimizer = None
    if cfg.monitor.online_probe and data.images.num_classes >= 2:
        # DDP: the same probe on every rank
        probe = accelerator.prepare_model(OnlineProbe(model.feature_dim, data.images.num_classes))
        probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.monitor.online_probe_lr, weight_decay=0.0)
    learned_critic = any(p.requires_grad for p in objective.parameters())
    return Parts(model, objective, None, probe, probe_optimizer, learned_critic)


def build_optimizer(cfg: Config, parts: Parts, accelerator: Accelerator,
                    steps_per_epoch: int) -> tuple[Any, Any, float]:
    """(optimizer, per-step scheduler, effective lr) from timm; wraps model (and a learned critic) for DDP,
    then copies the momentum key model (objective.queue_size) from the synchronised model."""
    from timm.optim import create_optimizer_v2

    takes_keys = parts.objective.takes_keys
    trainable = torch.nn.ModuleDict({"model": parts.model, "objective": parts.objective})  # learned critics train too
    global_batch = cfg.optim.batch_size_per_process * accelerator.num_processes
    lr = effective_lr(cfg.optim, global_batch)
    if cfg.optim.lr_scaling != "none":
        accelerator.print(f"lr {lr:g}: optim.lr {cfg.optim.lr:g} x {cfg.optim.lr_scaling} scaling for a global batch "
                          f"of {global_batch} ({accelerator.num_processes} x {cfg.optim.batch_size_per_process})")
    optimizer = create_optimizer_v2(trainable, opt=cfg.optim.optimizer, lr=lr,
                                    weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    parts.model, optimizer = accelerator.prepare(parts.model, optimizer)
    # A critic with parameters gets its own DDP wrapper (DDP refuses a module without any).
    parts.objective = (wrap_learned_critic(parts.objective, accelerator) if parts.learned_critic
                       else parts.objective.to(accelerator.device))
    if takes_keys:
        # MoCo's key encoder and head: an EMA copy of the online model, never DDP-wrapped (no gradient). Copied
        # from the model DDP has just synchronised, as DINO's teacher loads student.module: a copy taken before
        # the wrap would hold each rank's own seed's weights and fill the queue with other networks' keys.
        parts.key_model = MomentumKeys(accelerator.unwrap_model(parts.model), cfg.model.momentum, cfg.model.shuffle_bn,
                                       cfg.run.seed).to(accelerator.device)
    if cfg.optim.min_lr > lr:  # the "cosine decay" would climb from the peak to it
        raise ConfigError(f"bad value for config key 'optim.min_lr': {cfg.optim.min_lr:g} is above the peak lr "
                          f"{lr:g} (optim.lr after optim.lr_scaling), where the cosine ends; lower optim.min_lr")
    scheduler = lr_schedule(optimizer, cfg.optim, steps_per_epoch)
    if warning := warmup_warning(cfg.optim.warmup_epochs, cfg.optim.epochs):
        accelerator.print(warning, flush=True)
    return optimizer, scheduler, lr


def start_lines(cfg: Config, data: TrainData, lr: float, accelerator: Accelerator, total_steps: int) -> list[str]:
    """What this run trains, on what, and for how long, in one line (as MoCo and DINO print their args), then the
    loader's expected ceiling and a queue past the dataset, when they apply."""
    from infomax.runtime.hardware import loader_line

    images, width = data.images, f" at width {cfg.model.width:g}" if cfg.model.width != 1 else ""
    where = cfg.data.path if cfg.data.format == "ffcv" else cfg.data.root
    batch, processes = cfg.optim.batch_size_per_process, accelerator.num_processes
    objective = f"{cfg.objective.name} ({cfg.objective.bound} bound)"
    lines = [f"pretraining {cfg.model.arch}{width} on {cfg.data.dataset}{f' at {where}' if where else ''} "
             f"({len(images)} images, {images.num_classes} classes), objective {objective}, global batch "
             f"{batch * processes} ({processes} x {batch}), lr {lr:g}, {total_steps} steps ({len(data)} an epoch)",
             loader_line(cfg.data.format, cfg.data.num_workers, [v.size for v in cfg.data.views], len(images),
                         accelerator.device.type),
             queue_warning(cfg.objective.queue_size, len(images))]
    return [line for line in lines if line]


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int) -> Any:
    """timm's per-step scheduler: a linear warmup from 0 to the optimizer's lr, then a cosine to optim.min_lr over the
    steps after it (warmup_prefix=True, as in SimCLR, MoCo v3 and DINO), so the lr reaches its peak where the warmup
    ends. timm's num_epochs then excludes the warmup; a warmup as long as the run leaves the cosine one step."""
    from timm.scheduler import create_scheduler_v2

    warmup = min(optim.warmup_epochs, optim.epochs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=max(optim.epochs - warmup, 1 / steps_per_epoch), warmup_epochs=warmup,
        warmup_prefix=True, updates_per_epoch=steps_per_epoch, min_lr=optim.min_lr, warmup_lr=0.0, step_on_epochs=False,
    )
    return scheduler


def schedule_steps(scheduler_state: dict[str, Any]) -> int:
    """The steps a timm cosine schedule spans, from its state dict: with warmup_prefix the cosine follows the warmup.
    Rounded: the two parts are fractions of epochs times steps per epoch, whose float sum may miss the integer."""
    prefix = scheduler_state.get("warmup_t", 0) if scheduler_state.get("warmup_prefix") else 0
    return round(scheduler_state["t_initial"] + prefix)


def warmup_warning(warmup: float, epochs: float) -> str:
    """One line when the warmup takes the whole run, so the lr never reaches optim.lr and no cosine follows."""
    if not warmup or not epochs or warmup < epochs:
        return ""
    return (f"warning: optim.warmup_epochs={warmup:g} is the whole run (optim.epochs={epochs:g}): the lr never "
            "reaches optim.lr; lower optim.warmup_epochs (a tenth of the epochs or less)")


MI_AVERAGED_STEPS = 50  # logged steps the summary's mean MI value spans
TIMED_STEPS = 20  # steps timed (after the first) before the run prints how long it should take


@dataclass
class Run(Trainer):
    """One pretraining run in progress: its config, parts, position and reporting; the
    :class:`~infomax.train.resumable.Trainer` of its :class:`~infomax.train.resumable.TrainingLoop` (:attr:`loop`)."""

    cfg: Config
    accelerator: Accelerator
    data: TrainData
    parts: Parts
    optimizer: Any
    scheduler: Any
    lr: float
    resumable: Resumable
    total_steps: int
    eval_clock: EvalClock | None = None  # monitor.expect_eval's eval, loaded at start
    loop: TrainingLoop | None = None  # built by start_reporting, once the run has resumed
    tb: TensorBoard | None = None
    stop: StopFlag = field(default_factory=StopFlag)
    meter: Throughput = field(default_factory=Throughput)
    started: float = 0.0
    seconds_before: float = 0.0
    last: dict[str, float] = field(default_factory=dict)  # the last logged (rank-averaged) diagnostics
    # the bound's value at the last logged steps of this run: one batch's value is noisy, the summary averages them
    mi_logged: deque = field(default_factory=lambda: deque(maxlen=MI_AVERAGED_STEPS))
    knn_top1: float = float("nan")
    probe_top1: float | None = None
    knn_step: int = -1
    knn_seconds: float = 0.0  # the last kNN monitor pass
    first_step_done: float = 0.0  # when this run's first (warm-up) step ended
    stopped_by: str = ""

    @property
    def progress(self) -> Any:
        return self.resumable.progress

    @property
    def bar(self) -> Any:
        return self.loop.bar

    @property
    def steps_this_run(self) -> int:
        return self.loop.steps_this_run if self.loop is not None else 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def raw_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.parts.model)

    @property
    def raw_objective(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.parts.objective)

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Load every part's state from a checkpoint (position and RNG: :meth:`Resumable.resume`)."""
        p, acc = self.parts, self.accelerator
        load_part(self.raw_model, state["model"], "model", path)
        load_part(self.raw_objective, state["objective"], "objective", path)
        if p.key_model is not None:
            if state.get("momentum_model") is None:
                raise ConfigError(f"{path} was written without objective.queue_size; resume it without the queue "
                                  "or start the queued run in a new run.dir")
            p.key_model.load_state_dict(state["momentum_model"])
        if p.probe is not None and state.get("online_probe"):
            acc.unwrap_model(p.probe).load_state_dict(state["online_probe"])
            p.probe_optimizer.load_state_dict(state["online_probe_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The schedule is a pure function of the config and the step, so it is rebuilt from this run's config,
        # not loaded: a checkpoint's scheduler state holds the old length, and a raised optim.epochs would then
        # train its extra epochs at the old schedule's final lr (0).
        steps = schedule_steps(self.scheduler.state_dict())
        saved_steps = schedule_steps(state.get("scheduler") or self.scheduler.state_dict())
        if saved_steps != steps and self.main:
            print(f"optim.epochs changed: the lr schedule (warmup, then cosine) now spans {steps:g} "
                  f"steps instead of {saved_steps:g}, and resumes at step {self.progress.global_step} on it",
                  flush=True)
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        if reported := state.get("reported"):
            self.last, self.probe_top1 = dict(reported["last"]), reported["probe_top1"]
            self.mi_logged.extend(reported["mi_logged"])
            self.knn_top1 = float("nan") if reported["knn_top1"] is None else reported["knn_top1"]

    def save(self) -> Path | None:
        """A checkpoint of everything (all ranks call; rank 0 writes); returns its path on rank 0."""
        self.progress.train_seconds = self.seconds_before + time.perf_counter() - self.started
        p, acc = self.parts, self.accelerator
        return self.resumable.save({
            "model": self.raw_model.state_dict(),
            "objective": self.raw_objective.state_dict(),  # includes the momentum queue
            "momentum_model": p.key_model.state_dict() if p.key_model is not None else None,
            "online_probe": acc.unwrap_model(p.probe).state_dict() if p.probe is not None else None,
            "online_probe_optimizer": p.probe_optimizer.state_dict() if p.probe is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "config": to_yaml(self.cfg),
            # what the summary reports, so that an export written again from this checkpoint reports it too
            "reported": {"last": self.last, "mi_logged": list(self.mi_logged), "probe_top1": self.probe_top1,
                         "knn_top1": None if math.isnan(self.knn_top1) else self.knn_top1},
        })

    def start_reporting(self, run_dir: Path) -> None:
        """TensorBoard, the stop signals, the loop (its progress bar) and the clocks, once the run has resumed."""
        self.tb = TensorBoard(run_dir / "tb", enabled=self.main)
        self.tb.text("config", to_yaml(self.cfg))
        self.stop.install()
        cfg = self.cfg
        self.loop = TrainingLoop(self, self.resumable, steps_per_epoch=len(self.data), total_steps=self.total_steps,
                                 epochs=cfg.optim.epochs, checkpoint_every=cfg.run.checkpoint_every, stop=self.stop,
                                 desc="pretrain", save_at_epoch_end=cfg.run.save_at_epoch_end,
                                 checkpoint_every_min=cfg.run.checkpoint_every_min)
        self.started, self.seconds_before = time.perf_counter(), self.progress.train_seconds
        self.meter.reset()  # images/s from here, not from when the run was built

    def run_knn(self) -> None:
        """The kNN monitor and the online probe on the held-out queries (every rank extracts its shard;
        the main process logs and prints)."""
        cfg, progress, t0 = self.cfg, self.progress, time.perf_counter()
        size = cfg.data.views[0].size
        probe = self.accelerator.unwrap_model(self.parts.probe) if self.parts.probe else None
        self.knn_top1, probe_top1 = knn_monitor(
            self.raw_model.encoder_for(0), ImageListDataset(self.data.knn_bank, size),
            ImageListDataset(self.data.knn_queries, size), self.accelerator, cfg.monitor.knn_k,
            cfg.monitor.knn_temperature, cfg.data.num_workers, input_fn=self.data.first_view, probe=probe)
        # an untrained probe's score means nothing: the summary of a run stopped before the next pass reported it
        self.probe_top1 = probe_top1 if progress.global_step else None
        if self.main:
            self.tb.scalars({"monitor/knn_top1": self.knn_top1}, progress.global_step)
            line = (f"epoch {progress.epoch} (step {progress.global_step}): kNN top-1 {self.knn_top1:.2%} "
                    f"(k={cfg.monitor.knn_k})")
            if self.probe_top1 is not None:
                self.tb.scalars({"monitor/online_probe_top1": self.probe_top1}, progress.global_step)
                line += f"   online probe top-1 {self.probe_top1:.2%}"
            self.bar.write(line)
        self.knn_step = progress.global_step
        self.accelerator.wait_for_everyone()
        self.parts.model.train()
        self.knn_seconds = time.perf_counter() - t0

    def knn_passes_ahead(self) -> int:
        """kNN monitor passes still to come: at every knn_every-th epoch end, and once more at the last step
        unless that is such an epoch end (:meth:`epoch_end`, :meth:`at_end`)."""
        every, n = self.cfg.monitor.knn_every, len(self.data)
        if not every:
            return 0
        last_full_epoch = self.total_steps // n
        ends = sum(k % every == 0 for k in range(self.progress.epoch + 1, last_full_epoch + 1))
        return ends + (not (self.total_steps % n == 0 and last_full_epoch % every == 0))

    def expected_duration(self) -> str:
        """One line, printed once after the first timed steps: how long the rest of the run should take."""
        step_s = (time.perf_counter() - self.first_step_done) / (self.steps_this_run - 1)
        steps_left, passes = self.total_steps - self.progress.global_step, self.knn_passes_ahead()
        seconds = steps_left * step_s + passes * self.knn_seconds
        knn = f", {passes} kNN passes of {self.knn_seconds:.0f} s" if passes else ""
        line = (f"expected: pretraining ends in about {format_duration(seconds)} ({steps_left} steps at {step_s:.3f} s"
                f"{knn}) on {describe_machine()}")
        if self.eval_clock is None:
            return line
        eval_seconds, how = self.expected_eval(step_s)
        # An upper bound: each probe reckoned at every fit it may make, each at L-BFGS's most passes.
        return (f"{line}; the eval ({self.cfg.monitor.expect_eval}) then takes up to {format_duration(eval_seconds)} "
                f"({how}), so the whole run ends within about {format_duration(seconds + eval_seconds)}")

    def expected_eval(self, step_s: float) -> tuple[float, str]:
        """(seconds, how) of the eval ``monitor.expect_eval`` names, on this run's export, reckoned now from this
        machine's extraction speed: the kNN monitor's pass, or without it a third of a step's images."""
        cfg, acc = self.cfg, self.accelerator
        if self.knn_seconds:
            per_image = self.knn_seconds / (len(self.data.knn_bank) + len(self.data.knn_queries))
        else:  # a forward pass costs about a third of a training step's forward and backward
            per_image = step_s / (3 * cfg.optim.batch_size_per_process * len(cfg.data.views) * acc.num_processes)
        return self.eval_clock(self.planned_export(step_s), per_image)

    def view_transform(self, v: int) -> str:
        """The input transform of view ``v``'s encoder, as config.json names it."""
        return ("lab_L", "lab_ab")[v % 2] if self.data.lab else "normalise"

    def export_spec(self) -> dict[str, Any]:
        """What config.json says of the first view's encoder: :func:`export_meta`'s keywords but the weights'."""
        cfg, data = self.cfg, self.data
        return {"arch": cfg.model.arch, "in_chans": data.view_chans[0], "input_size": cfg.data.views[0].size,
                "mean": data.images.mean, "std": data.images.std, "small_input": cfg.model.small_input,
                "stem_stride": cfg.model.stem_stride, "timm_kwargs": width_kwargs(cfg.model.arch, cfg.model.width),
                "input_transform": self.view_transform(0)}

    def planned_export(self, step_s: float) -> dict[str, Any]:
        """config.json of the export this run will write, as far as it is known now (step_s: seconds a step)."""
        model = self.raw_model
        views = [{"in_chans": self.data.view_chans[v], "input_transform": self.view_transform(v),
                  "num_features": int(model.encoder_for(v).num_features)} for v in range(1, len(model.encoders))]
        summary = {"epochs_trained": round(self.total_steps / len(self.data), 3), "steps": self.total_steps,
                   "pretrain_seconds": step_s * self.total_steps, "holdout": self.cfg.data.holdout}
        return export_meta(**self.export_spec(), num_features=int(model.encoder_for(0).num_features), views=views,
                           summary=summary, weights_sha256="planned")

    # ------------------------------------------------------- the loop's hooks (infomax.train.resumable.Trainer)
    def batches(self, epoch: int, start: int) -> Iterable[dict[str, Any]]:
        """The epoch's batches from ``start`` on, the time spent waiting for each counted (perf/data_wait_frac)."""
        return self.meter.timed(self.data.epoch_batches(self.accelerator, epoch, start))

    def step(self, batch: dict[str, Any], agree: Agree) -> StepResult:
        """The batch's views (drawn for this position), then :func:`train_step`, which puts its non-finite flag
        into the loop's agreement for the step."""
        cfg, acc, progress, parts, data = self.cfg, self.accelerator, self.progress, self.parts, self.data
        views = data.views(batch, progress.epoch, progress.step_in_epoch, acc)
        if progress.global_step == 0 and self.steps_this_run == 0:
            self.tb.views(views, data.images.mean, data.images.std)
        progress.note_unreadable(data.skipped(batch))
        labels = batch["label"].to(acc.device, non_blocking=True)  # pinned by the loader on CUDA
        probe = (parts.probe, parts.probe_optimizer, labels) if parts.probe else None
        result = train_step(acc, parts.model, parts.objective, self.optimizer, data.model_views(views),
                            grad_clip=cfg.optim.grad_clip, skip_nonfinite=cfg.optim.skip_nonfinite,
                            step=progress.global_step, agree=agree, channels_last=cfg.model.channels_last,
                            key_model=parts.key_model, probe=probe)
        self.meter.images += batch["views"][0].shape[0] * acc.num_processes
        return result

    def after_step(self, result: StepResult, last: bool) -> None:
        """The schedule, the expected-duration line after the first timed steps, logging every ``run.log_every``
        steps and at the last, and what stopped the run."""
        progress = self.progress
        if result.grad_norm is None:
            progress.skipped_steps += 1
        self.scheduler.step_update(progress.global_step)
        if self.steps_this_run == 1:
            self.first_step_done = time.perf_counter()  # the first step warms up: time the ones after it
        elif self.steps_this_run == TIMED_STEPS + 1 and progress.global_step < self.total_steps and self.main:
            self.bar.write(self.expected_duration())
        if progress.global_step % self.cfg.run.log_every == 0 or progress.global_step == self.total_steps:
            log_step(self, result)
        if self.loop.stopped:
            self.stopped_by = self.stop.signal_name or "signal on another rank"

    def epoch_end(self) -> None:
        """The kNN monitor every ``monitor.knn_every`` epochs."""
        if self.cfg.monitor.knn_every and self.progress.epoch % self.cfg.monitor.knn_every == 0:
            self.run_knn()

    def at_end(self) -> None:
        """The final state is always measured (a run ending mid-epoch, e.g. at ``run.max_steps``)."""
        if self.cfg.monitor.knn_every and self.knn_step != self.progress.global_step and self.steps_this_run:
            self.run_knn()


def log_step(run: Run, result: StepResult) -> None:
    """Rank-averaged diagnostics, lr, throughput -> TensorBoard and the progress bar."""
    extra = {"online_probe_loss": result.probe_loss} if result.probe_loss is not None else {}
    names = ["loss", *result.diag, *extra]
    values = torch.stack([result.loss.float(), *(v.float() for v in [*result.diag.values(), *extra.values()])])
    run.last = dict(zip(names, run.accelerator.reduce(values, reduction="mean").tolist()))
    run.mi_logged.append(run.last["mi"])
    images_per_s, wait_frac = run.meter.read()
    scalars = {(k if "/" in k else f"train/{k}"): v for k, v in run.last.items()}  # "monitor/x" keeps its group
    scalars.update({"train/lr": run.optimizer.param_groups[0]["lr"], "perf/images_per_s": images_per_s,
                    "perf/data_wait_frac": wait_frac, "train/skipped_steps": run.progress.skipped_steps})
    if result.grad_norm is not None:
        scalars["train/grad_norm"] = float(result.grad_norm)
    run.tb.scalars(scalars, run.progress.global_step)
    ceiling = f"/{run.last['log_k']:.2f}" if has_log_k_ceiling(run.cfg) else ""  # only InfoNCE's has one
    run.bar.set_postfix(loss=f"{run.last['loss']:.3f}", mi=f"{run.last['mi']:.2f}{ceiling}",
                        img_s=f"{images_per_s:.0f}")


def has_log_k_ceiling(cfg: Config) -> bool:
    """Whether the run's MI value has InfoNCE's ceiling, log of the candidates per positive (a bound the registry
    says has one, and AMDIM's NCE terms); no ceiling is printed beside the others."""
    return BOUNDS[cfg.objective.bound].ceiling or cfg.objective.name == "amdim"


def finish(run: Run, run_dir: Path, checkpoint_path: Path | None, precision: Precision) -> dict[str, Any]:
    """The summary (returned, in the export and printed), the export and TensorBoard's hparams."""
    cfg, acc, progress, last = run.cfg, run.accelerator, run.progress, run.last
    elapsed = time.perf_counter() - run.started
    summary: dict[str, Any] = {
        "steps": progress.global_step,
        "epochs_completed": progress.epoch,
        "epochs_trained": round(progress.global_step / len(run.data), 3),  # fractional: optim.epochs=1.5
        "steps_this_run": run.steps_this_run,
        "seconds_this_run": round(elapsed, 1),
        "pretrain_seconds": round(progress.train_seconds, 1),  # over all resumes: the supervised-encoder budget
        "final_loss": last.get("loss"),
        "mi_estimate_nats": last.get("mi"),
        # the same, averaged over the last logged steps (up to MI_AVERAGED_STEPS of this run): less noisy
        "mi_estimate_nats_mean_logged": sum(run.mi_logged) / len(run.mi_logged) if run.mi_logged else None,
        "mi_logged_steps": len(run.mi_logged),
        "mi_batch_keys_nats": last.get("monitor/mi_batch_keys"),  # with the queue: the bound over fresh keys
        "log_k": last.get("log_k"),
        "knn_top1": None if math.isnan(run.knn_top1) else run.knn_top1,
        "online_probe_top1": run.probe_top1,
        "skipped_steps": progress.skipped_steps,
        "unreadable_images": progress.unreadable_count,
        "stopped_by": run.stopped_by or None,
        "holdout": cfg.data.holdout,  # validation images never trained on: eval holdout=N scores them
        "processes": acc.num_processes,
        "precision": progress.precision_line() or precision.mode,  # each precision's steps, when auto changed it
        "precision_reason": precision.reason,
        "machine": describe_machine(),  # what the times above were measured on
    }
    export_dir = run_dir / "export"
    if run.main and not run.stopped_by and cfg.run.export:
        try:
            export(run, export_dir, summary)
        except OSError as e:  # the checkpoint holds everything: a rerun writes the export from it
            reason = no_room(e)
            raise ExportFailed(f"could not write the export to {export_dir} ({reason or e}); the checkpoint "
                               f"{checkpoint_path} is intact. {make_room(reason).capitalize() if reason else 'Fix it'} "
                               "and rerun the same command: it writes the export from the checkpoint") from None
    run.tb.close()
    acc.wait_for_everyone()
    if run.main:
        print_summary(run, summary, elapsed, run_dir, checkpoint_path, export_dir)
    return summary


def export(run: Run, export_dir: Path, summary: dict[str, Any]) -> None:
    """The first view's encoder for timm (and every other view's beside it), plus TensorBoard's hparams."""
    cfg, data, model = run.cfg, run.data, run.raw_model
    facts = {"name": export_dir.resolve().parent.name, "objective": cfg.objective.name, "bound": cfg.objective.bound,
             "dataset": cfg.data.dataset, "train_images": len(data.images), "views": [v.size for v in cfg.data.views],
             "global_batch": cfg.optim.batch_size_per_process * run.accelerator.num_processes,
             "processes": run.accelerator.num_processes, "precision": f"{summary['precision']} "
             f"({summary['precision_reason']})", "seconds": summary["pretrain_seconds"], "machine": summary["machine"],
             "revision": git_revision(), "config": to_yaml(cfg)}
    # the same weights exported again (a damaged export rewritten from the checkpoint): their eval rows stay
    evaluated = eval_section(export_dir) if run.steps_this_run == 0 else ""
    card = {CARD: lambda meta: card_text(meta, model.encoder_for(0), facts, evaluated)}
    # one encoder per view (CMC): the others beside it, for the concatenated probe
    views = [(model.encoder_for(v), data.view_chans[v], run.view_transform(v)) for v in range(1, len(model.encoders))]
    export_encoder(model.encoder_for(0), export_dir, **run.export_spec(), summary=summary, view_encoders=views,
                   beside=card)
    hp = {"arch": cfg.model.arch, "lr": run.lr, "batch_size_per_process": cfg.optim.batch_size_per_process,
          "bound": cfg.objective.bound, "temperature": cfg.objective.temperature,
          "processes": run.accelerator.num_processes, "precision": summary["precision"]}
    run.tb.hparams(hp, {"hparam/final_loss": float(run.last.get("loss", float("nan"))),
                        "hparam/knn_top1": run.knn_top1, "hparam/mi_nats": float(run.last.get("mi", float("nan")))})


def print_summary(run: Run, summary: dict[str, Any], elapsed: float, run_dir: Path, checkpoint_path: Path | None,
                  export_dir: Path) -> None:
    cfg, progress = run.cfg, run.progress
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    state = f"stopped ({run.stopped_by})" if run.stopped_by else "finished"
    lines = [
        "",
        f"infomax pretraining {state}: step {progress.global_step}/{run.total_steps}, epoch {progress.epoch}/"
        f"{cfg.optim.epochs:g}, {run.steps_this_run} steps in {elapsed:.0f}s on {run.accelerator.num_processes} "
        "process(es)",
        f"  loss {fmt(summary['final_loss'], '.4f')}   "
        + (f"MI estimate {fmt(summary['mi_estimate_nats'], '.3f')} nats with the queue's stale keys ("
           + (f"ceiling log K = {fmt(summary['log_k'], '.3f')}; " if has_log_k_ceiling(cfg) else "no ceiling; ")
           + "no lower bound), bound over the batch's keys alone "
           f"{summary['mi_batch_keys_nats']:.3f} nats" if summary["mi_batch_keys_nats"] is not None else
           f"MI bound {fmt(summary['mi_estimate_nats'], '.3f')} nats (ceiling log K = {fmt(summary['log_k'], '.3f')})"
           if has_log_k_ceiling(cfg) else
           f"MI estimate {fmt(summary['mi_estimate_nats'], '.3f')} nats ({cfg.objective.bound}: no ceiling; "
           f"{BOUNDS[cfg.objective.bound].minibatch})")
        + f"   kNN top-1 {fmt(summary['knn_top1'], '.2%')}"
        + (f"   online probe top-1 {summary['online_probe_top1']:.2%}"
           if summary["online_probe_top1"] is not None else ""),
        f"  skipped steps {progress.skipped_steps}   unreadable images {progress.unreadable_count}   "
        f"precision {summary['precision']} ({summary['precision_reason']})",
        f"  run dir {run_dir}   checkpoint {checkpoint_path}",
    ]
    if run.stopped_by:
        lines.append("  re-run the same command to resume from the checkpoint")
    elif cfg.run.export:
        tb = shlex.quote(str(run_dir / "tb"))
        lines.append(f"  export {export_dir}/encoder.safetensors   tensorboard --logdir {tb}")
    print("\n".join(lines), flush=True)


def already_complete(run: Run, run_dir: Path) -> dict[str, Any] | None:
    """A finished run rerun with the same budget: say so, change nothing, return its summary; else None."""
    progress, cfg = run.progress, run.cfg
    export_dir = run_dir / "export"
    export_json = export_dir / META
    if not (progress.global_step >= run.total_steps or progress.epoch >= cfg.optim.epochs):
        return None
    if cfg.run.export and (problem := export_problem(export_dir)):  # cut short by a full disk, damaged since
        if progress.global_step > run.total_steps:  # a stopped run: its export and record would claim this budget
            raise ConfigError(f"run dir {run_dir} has trained {progress.global_step} steps, more than this budget of "
                              f"{run.total_steps}, and has no usable export ({problem}); rerun with the budget in its "
                              f"config.yaml to finish it, or with run.max_steps={progress.global_step} to export it "
                              "as it is")
        run.accelerator.print(f"infomax pretraining: the run is complete but its export cannot be used ({problem}); "
                              "writing it again from the newest checkpoint")
        return None
    run.accelerator.print(f"infomax pretraining: run dir {run_dir} is already complete (step {progress.global_step}"
                          f"/{run.total_steps}, epoch {progress.epoch}/{cfg.optim.epochs:g}); nothing to do. Raise "
                          "optim.epochs or run.max_steps to continue it, or pick a new run.dir")
    return json.loads(export_json.read_text()).get("summary", {}) if export_json.is_file() else {}
