"""A checkpointed, resumable SGD classifier loop under Accelerate, shared by the `imagenet` linear
probe (a linear head on a frozen encoder) and the supervised AlexNet baseline (trained end to end).

Resume follows pretraining: the newest checkpoint in ``ckpt_dir`` holds the trainable weights, the
optimizer, the position inside the epoch and every rank's RNG; augmentations are a pure function of
(seed, epoch, index) (``MultiViewDataset``), so a stopped and resumed fit ends on the same weights.

Its parts: :func:`check_batch` and :func:`build_optimizer` (a fit's batch split and optimizer),
:func:`sgd_step` (one step), :class:`SGDFit` (a fit's state: resume and save through
:class:`~infomax.train.resumable.Resumable`, the held-out evaluation, and the
:class:`~infomax.train.resumable.Trainer` hooks the shared :class:`~infomax.train.resumable.TrainingLoop` calls: its
batches, its step with the clock agreed beside the stop request, the held-out curve after a step, the time cap
and early stopping), :func:`fit_classifier` (builds the fit and runs its loop). The loop, as pretraining's, owns
the epochs, the position, the agreement, the checkpoint cadence and the progress bar.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from infomax.data import MultiViewDataset
from infomax.runtime import checkpoint as ckpt
from infomax.runtime.distributed import Agree
from infomax.runtime.stop import StopFlag
from infomax.train.resumable import Resumable, Trainer, TrainingLoop


@dataclass
class SGDSchedule:
    """SGD with momentum (or AdamW); lr decays x0.1 at each epoch milestone, or follows a cosine when none
    are given, after an optional linear warmup."""

    lr: float
    epochs: int
    global_batch_size: int  # split across processes
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    max_steps: int = 0  # stop after this many steps in total (a budget); 0 = all epochs
    max_seconds: float = 0.0  # stop after this much training wall time in total (a budget); 0 = none
    checkpoint_every: int = 0  # also checkpoint every N steps (0 = no step rule)
    checkpoint_every_min: float = 0.0  # also checkpoint every N minutes of training (0 = off)
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between held-out evaluations (0 = each epoch, or 10 over a shorter budget)
    patience: int = 0  # stop when the held-out accuracy has not improved for this many evaluations (0 = never)
    optimizer: str = "sgd"  # sgd | adamw (AdamW ignores momentum)
    warmup_steps: int = 0  # linear warmup from ~0 to lr over these first steps

    def factor(self, step: int, steps_per_epoch: int, seconds: float = 0.0) -> float:
        """The lr multiplier at ``step``; under a wall-time budget the cosine follows whichever of
        steps and ``seconds`` (training time so far) is further along, so it spans the budget."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.milestones:
            return warmup * 0.1 ** sum(step >= m * steps_per_epoch for m in self.milestones)
        total = self.total_steps(steps_per_epoch)
        done = min(step, total) / total
        if self.max_seconds:
            done = max(done, min(seconds / self.max_seconds, 1.0))
        return warmup * 0.5 * (1 + math.cos(math.pi * done))

    def total_steps(self, steps_per_epoch: int) -> int:
        total = self.epochs * steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total


class FrozenEncoder(nn.Module):
    """An encoder that stays in eval mode (frozen BN statistics) and outside autograd."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(x).float()


class LinearProbeModel(nn.Module):
    """A frozen encoder and a linear head, the head in fp32 whatever the launch's mixed precision.

    Under a bf16/fp16 launch only the frozen encoder runs in low precision; the head, its logits and
    so its loss stay fp32, as in MoCo's ``main_lincls.py`` (which has no autocast at all).
    B x C x H x W images -> B x classes fp32 logits."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.frozen, self.head = FrozenEncoder(encoder), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.frozen(x)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())


Augment = Callable[[torch.Tensor, int, int], torch.Tensor]  # (uint8 batch, epoch, step in epoch) -> augmented input


class NothingToTrain(RuntimeError):
    pass


@dataclass
class FitOutcome:
    """Where a fit ended, its held-out curve and budget, what stopped it and whether it had converged."""

    progress: ckpt.Progress
    held_out: list[tuple[int, float]]  # (global step, held-out top-1) at each evaluation
    wall_s: float  # training wall time over all resumes
    early_stopped: bool  # the patience rule ended it
    cap: str = "epoch_cap"  # what ended it otherwise: epoch_cap | step_cap | time_cap

    @property
    def stopped(self) -> str:
        """early_stopping | epoch_cap | step_cap | time_cap."""
        return "early_stopping" if self.early_stopped else self.cap

    @property
    def converged(self) -> bool:
        """True only when early stopping ended it. A fit stopped by a cap is not called converged even on a
        flat held-out curve: every schedule here decays the lr by its cap (a cosine to zero, or milestones), which
        flattens any curve, so the curve cannot say that more epochs would not help."""
        return self.early_stopped


def fit_label(stopped: str) -> str:
    """What ended a fit, for a row's name: ", early-stopped" or ", at its epoch cap" (step, time)."""
    return ", early-stopped" if stopped == "early_stopping" else f", at its {stopped.replace('_cap', '')} cap"


def check_batch(accelerator: Accelerator, train_set: MultiViewDataset, schedule: SGDSchedule, desc: str) -> int:
    """Each process's share of the global batch; NothingToTrain when it does not split evenly over the
    processes or the train split holds less than one batch."""
    per_process, rest = divmod(schedule.global_batch_size, accelerator.num_processes)
    if rest or per_process < 1:
        raise NothingToTrain(f"batch size {schedule.global_batch_size} does not split over "
                             f"{accelerator.num_processes} processes")
    if len(train_set) < schedule.global_batch_size:
        raise NothingToTrain(f"{desc}: the train split has {len(train_set)} images, fewer than one batch of "
                             f"{schedule.global_batch_size}; lower the batch size")
    return per_process


def build_optimizer(trainable: nn.Module, schedule: SGDSchedule) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW, over the parameters of ``trainable`` that take gradients, at the base lr
    (each step sets its own: :meth:`SGDSchedule.factor`)."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    return torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)


def sgd_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
             labels: torch.Tensor, lr: float, input_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One cross-entropy step at ``lr`` on a batch: ``x`` B x C x H x W images, ``labels`` B class indices;
    ``model(input_fn(x))`` gives B x classes logits under the launch's autocast, the loss is taken in fp32.
    Returns the 0-dim loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with accelerator.autocast():
        logits = model(input_fn(x))
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return loss


@dataclass
class SGDFit(Trainer):
    """One fit in progress: its prepared parts, position (``resumable.progress``) and what its checkpoint holds
    beside the weights and optimizer (the held-out curve, the training time so far, whether it ended); the
    :class:`~infomax.train.resumable.Trainer` of its :class:`~infomax.train.resumable.TrainingLoop` (:attr:`loop`).

    Every rank holds the same state: the flags that end the fit are agreed (:meth:`TrainingLoop.agree`)."""

    accelerator: Accelerator
    model: nn.Module  # prepared: B x C x H x W -> B x classes logits
    trainable: nn.Module  # the part of ``model`` that trains; its state is what a checkpoint keeps
    optimizer: torch.optim.Optimizer  # prepared
    loader: torch.utils.data.DataLoader  # prepared; batches of {"views": [B x C x H x W], "label": B}
    train_set: MultiViewDataset
    schedule: SGDSchedule
    resumable: Resumable
    desc: str
    input_fn: Callable[[torch.Tensor], torch.Tensor]
    stop: StopFlag | None
    held_out: Callable[[nn.Module], float] | None
    augment: Augment | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (global step, held-out top-1)
    wall_before: float = 0.0  # training wall time of the runs before this one
    early_stopped: bool = False
    finished: bool = False  # a rerun of a finished fit (a wall-time budget, early stopping) takes no more steps
    over_time: bool = False  # the agreed clock reached ``schedule.max_seconds``
    agreed_wall: float = 0.0  # training time as all ranks agree on it (each rank's own clock differs)
    started: float = 0.0
    loop: TrainingLoop | None = None  # built by :meth:`start`, once the fit has resumed

    @property
    def progress(self) -> ckpt.Progress:
        return self.resumable.progress

    @property
    def bar(self) -> Any:
        """The loop's progress bar (tqdm, or log lines off a terminal)."""
        return self.loop.bar

    @property
    def stopped(self) -> bool:
        """A stop request (on any rank) ended the fit."""
        return self.loop is not None and self.loop.stopped

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total(self) -> int:
        return self.schedule.total_steps(self.steps_per_epoch)

    @property
    def eval_every(self) -> int:
        """Steps between held-out evaluations: ``schedule.eval_every``, else each epoch, or 10 over a shorter budget."""
        return self.schedule.eval_every or min(self.steps_per_epoch, max(1, self.total // 10))

    def wall(self) -> float:
        """This rank's training wall time over all runs of the fit."""
        return self.wall_before + time.perf_counter() - self.started

    def start(self) -> None:
        """Resume from the newest checkpoint in ``resumable.directory``, if any (position and RNG:
        :meth:`Resumable.resume`), then start this run's clock and its loop (the progress bar), the model in
        train mode."""
        loaded = self.resumable.resume(f"delete {self.resumable.directory} to fit '{self.desc}' afresh")
        if loaded:
            state, path = loaded
            self.trainable.load_state_dict(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.curve = [tuple(p) for p in state.get("held_out", [])]
            self.wall_before = float(state.get("wall_s", 0.0))
            self.early_stopped = bool(state.get("early_stopped", False))
            self.finished = bool(state.get("finished", False))
            self.accelerator.print(f"{self.desc}: resumed from {path} (epoch {self.progress.epoch}, step "
                                   f"{self.progress.global_step})")
        self.started, self.agreed_wall = time.perf_counter(), self.wall_before
        self.loop = TrainingLoop(self, self.resumable, steps_per_epoch=self.steps_per_epoch, total_steps=self.total,
                                 epochs=self.schedule.epochs, checkpoint_every=self.schedule.checkpoint_every,
                                 stop=self.stop, desc=self.desc,
                                 checkpoint_every_min=self.schedule.checkpoint_every_min)
        self.model.train()

    def save(self) -> Path | None:
        """A checkpoint (all ranks call; rank 0 writes); its path on rank 0."""
        return self.resumable.save({"trainable": self.trainable.state_dict(), "optimizer": self.optimizer.state_dict(),
                                    "held_out": [list(p) for p in self.curve], "wall_s": self.wall(),
                                    "early_stopped": self.early_stopped, "finished": self.finished})

    def evaluate(self) -> None:
        """Score the held-out images at this step (once per step), and with ``schedule.patience`` end the fit
        when the best score is that many evaluations old."""
        step = self.progress.global_step
        if self.held_out is None or (self.curve and self.curve[-1][0] == step):
            return
        self.curve.append((step, self.held_out(self.accelerator.unwrap_model(self.model))))
        self.model.train()
        best = max(range(len(self.curve)), key=lambda i: self.curve[i][1])  # the first best
        self.early_stopped = bool(self.schedule.patience) and len(self.curve) - 1 - best >= self.schedule.patience

    # ------------------------------------------------------- the loop's hooks (infomax.train.resumable.Trainer)
    def batches(self, epoch: int, start: int) -> Any:
        """The epoch's batches (its shuffle and augmentations seeded by ``epoch``) from batch ``start`` on."""
        self.train_set.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.loader, start) if start else self.loader

    def step(self, batch: dict[str, Any], agree: Agree) -> torch.Tensor:
        """One SGD step at the schedule's lr for this position, then the training clock agreed in the loop's
        collective beside the stop request, so every rank takes the same branch and the same next lr."""
        schedule, progress = self.schedule, self.progress
        lr = schedule.lr * schedule.factor(progress.global_step, self.steps_per_epoch, self.agreed_wall)
        x = batch["views"][0]
        x = x if self.augment is None else self.augment(x, progress.epoch, progress.step_in_epoch)
        loss = sgd_step(self.accelerator, self.model, self.optimizer, x, batch["label"], lr, self.input_fn)
        [self.agreed_wall] = agree(self.wall())
        self.over_time = bool(schedule.max_seconds) and self.agreed_wall >= schedule.max_seconds
        return loss

    def after_step(self, loss: torch.Tensor, last: bool) -> None:
        """Under a time budget the bar's total follows the clock; the loss every 20 steps; the held-out
        evaluation every ``eval_every`` steps unless the fit ends here (:meth:`at_end` evaluates then)."""
        schedule, step = self.schedule, self.progress.global_step
        if schedule.max_seconds:  # the clock ends the fit: show the steps it will reach at this rate
            reach = round(step * schedule.max_seconds / max(self.agreed_wall, 1e-9))
            self.bar.total = max(step, min(self.total, reach))
        if step % 20 == 0:
            self.bar.set_postfix(loss=f"{loss.item():.3f}")
        if not last and not self.over_time and step % self.eval_every == 0:
            self.evaluate()

    def done(self) -> bool:
        """The time cap, early stopping, or a finished fit resumed."""
        return self.over_time or self.early_stopped or self.finished

    def at_end(self) -> None:
        """The final point of the held-out curve; a rerun of a finished fit (a wall-time budget, early stopping)
        takes no more steps."""
        self.evaluate()
        self.finished = True

    def outcome(self) -> FitOutcome:
        """Where the fit ended and what ended it."""
        s = self.schedule
        cap = ("time_cap" if self.over_time else
               "step_cap" if s.max_steps and s.max_steps < s.epochs * self.steps_per_epoch else "epoch_cap")
        return FitOutcome(self.progress, self.curve, round(self.wall(), 1), self.early_stopped, cap)


def fit_classifier(
    accelerator: Accelerator,
    model: nn.Module,
    trainable: nn.Module,
    train_set: MultiViewDataset,
    schedule: SGDSchedule,
    ckpt_dir: Path,
    *,
    desc: str,
    num_workers: int = 0,
    input_fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    stop: StopFlag | None = None,
    held_out: Callable[[nn.Module], float] | None = None,
    drop_last: bool = True,
    augment: Augment | None = None,
) -> FitOutcome | None:
    """Train ``trainable`` (a part of ``model``: B x C x H x W -> B x classes logits) with cross-entropy.

    ``held_out(model)`` (run on every process) scores the model on images it does not train on,
    every ``schedule.eval_every`` steps (default: each epoch end) and at the end; with
    ``schedule.patience`` it also stops training once that score stops improving.
    Returns the outcome, or None when ``stop`` asked to stop (a checkpoint is then saved; calling
    again with the same ``ckpt_dir`` resumes). ``drop_last=False`` trains on every image each epoch,
    the last partial batch included (a linear probe, as MoCo's); a model with BatchNorm in train
    mode keeps ``True``, since a last batch of one image would break its statistics.
    ``augment(images, epoch, step_in_epoch)`` draws the input on the device from a loaded uint8 batch
    (B x C x H x W -> B x C x S x S float, ``BatchViews``) when ``train_set`` has no transforms; it must be
    a pure function of its arguments, so a resumed fit draws the batches the uninterrupted one drew.
    """
    per_process = check_batch(accelerator, train_set, schedule, desc)
    loader = torch.utils.data.DataLoader(train_set, batch_size=per_process, shuffle=True, drop_last=drop_last,
                                         num_workers=num_workers, pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=num_workers > 0)  # not restarted every epoch
    optimizer = build_optimizer(trainable, schedule)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    fit = SGDFit(accelerator, model, trainable, optimizer, loader, train_set, schedule,
                 Resumable(accelerator, ckpt_dir, schedule.keep_checkpoints), desc, input_fn, stop, held_out, augment)
    fit.start()
    fit.loop.run()  # epochs of fit.step to the step cap, a stop, the time cap or early stopping; its last checkpoint
    model.eval()
    return None if fit.stopped else fit.outcome()
