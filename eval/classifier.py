"""A checkpointed, resumable SGD classifier loop under Accelerate, shared by the `imagenet` linear
probe (a linear head on a frozen encoder) and the supervised AlexNet baseline (trained end to end).

Resume follows pretraining: the newest checkpoint in ``ckpt_dir`` holds the trainable weights, the
optimizer, the position inside the epoch and every rank's RNG; augmentations are a pure function of
(seed, epoch, index) (``MultiViewDataset``), so a stopped and resumed fit ends on the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from pretrain import checkpoint as ckpt
from pretrain.data import MultiViewDataset
from pretrain.resumable import Resumable
from pretrain.stop import StopFlag
from pretrain.tracking import progress_bar


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
    checkpoint_every: int = 500
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


# A fit that ran to its cap counts as converged only on a plateau: its last PLATEAU_POINTS held-out
# top-1 values within PLATEAU_TOLERANCE of each other (0.5 points).
PLATEAU_POINTS, PLATEAU_TOLERANCE = 3, 0.005


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
    def converged(self) -> bool | None:
        """True when early stopping ended it, or on a plateau (:data:`PLATEAU_POINTS` held-out points
        within :data:`PLATEAU_TOLERANCE`); None with fewer points than that. A curve that is flat only
        because a cosine lr reached zero at its cap is a plateau too: ``stopped`` says that it was the cap."""
        if self.early_stopped:
            return True
        accs = [a for _, a in self.held_out][-PLATEAU_POINTS:]
        return None if len(accs) < PLATEAU_POINTS else max(accs) - min(accs) <= PLATEAU_TOLERANCE


def fit_label(stopped: str, converged: bool | None) -> str:
    """What ended a fit and whether it converged, for a row's name: ", early-stopped",
    ", stopped at its epoch cap on a plateau", ", stopped at its step cap, not converged", ..."""
    if stopped == "early_stopping":
        return ", early-stopped"
    cap = stopped.replace("_cap", "")
    how = {True: " on a plateau", False: ", not converged", None: ", convergence unknown"}[converged]
    return f", stopped at its {cap} cap{how}"


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
    per_process, rest = divmod(schedule.global_batch_size, accelerator.num_processes)
    if rest or per_process < 1:
        raise NothingToTrain(f"batch size {schedule.global_batch_size} does not split over "
                             f"{accelerator.num_processes} processes")
    if len(train_set) < schedule.global_batch_size:
        raise NothingToTrain(f"{desc}: the train split has {len(train_set)} images, fewer than one batch of "
                             f"{schedule.global_batch_size}; lower the batch size")
    loader = torch.utils.data.DataLoader(train_set, batch_size=per_process, shuffle=True, drop_last=drop_last,
                                         num_workers=num_workers, pin_memory=accelerator.device.type == "cuda")
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay) \
        if schedule.optimizer == "adamw" else \
        torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)
    total = schedule.total_steps(steps_per_epoch)

    eval_every = schedule.eval_every or min(steps_per_epoch, max(1, total // 10))
    loop = Resumable(accelerator, ckpt_dir, schedule.keep_checkpoints)
    curve, wall_before, early_stopped, finished = [], 0.0, False, False
    loaded = loop.resume(f"delete {ckpt_dir} to fit '{desc}' afresh")
    if loaded:
        state, path = loaded
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        curve, wall_before = [tuple(p) for p in state.get("held_out", [])], float(state.get("wall_s", 0.0))
        early_stopped, finished = bool(state.get("early_stopped", False)), bool(state.get("finished", False))
        accelerator.print(f"{desc}: resumed from {path} (epoch {loop.progress.epoch}, step "
                          f"{loop.progress.global_step})")
    progress = loop.progress
    started = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - started

    def evaluate() -> None:
        nonlocal early_stopped
        if held_out is None or (curve and curve[-1][0] == progress.global_step):
            return
        curve.append((progress.global_step, held_out(accelerator.unwrap_model(model))))
        model.train()
        best = max(range(len(curve)), key=lambda i: curve[i][1])  # the first best
        early_stopped = bool(schedule.patience) and len(curve) - 1 - best >= schedule.patience

    def save() -> None:
        loop.save({"trainable": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                   "held_out": [list(p) for p in curve], "wall_s": wall(), "early_stopped": early_stopped,
                   "finished": finished})

    bar = progress_bar(total, initial=progress.global_step, desc=desc, disable=not accelerator.is_main_process)
    stopped = over_time = False
    agreed_wall = wall_before  # training time as all ranks agree on it (each rank's own clock differs)
    model.train()
    while progress.global_step < total and not (stopped or over_time or early_stopped or finished):
        train_set.set_epoch(progress.epoch)
        loader.set_epoch(progress.epoch)
        batches = accelerator.skip_first_batches(loader, progress.step_in_epoch) if progress.step_in_epoch else loader
        for batch in batches:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr * schedule.factor(progress.global_step, steps_per_epoch, agreed_wall)
            x = batch["views"][0]
            x = x if augment is None else augment(x, progress.epoch, progress.step_in_epoch)
            with accelerator.autocast():
                logits = model(input_fn(x))
            loss = F.cross_entropy(logits.float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            progress.step_in_epoch += 1
            progress.global_step += 1
            if progress.step_in_epoch == steps_per_epoch:
                progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            # One collective for the stop flag and the clock, so every rank takes the same branch and lr.
            requested, agreed_wall = loop.agree(float(stop is not None and stop.requested), wall())
            stopped = requested > 0
            over_time = bool(schedule.max_seconds) and agreed_wall >= schedule.max_seconds
            if schedule.max_seconds:  # the clock ends the fit: show the steps it will reach at this rate
                reach = round(progress.global_step * schedule.max_seconds / max(agreed_wall, 1e-9))
                bar.total = max(progress.global_step, min(total, reach))
            if progress.global_step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            if stopped or over_time or progress.global_step >= total:
                break
            if progress.global_step % eval_every == 0:
                evaluate()
                if early_stopped:
                    break
            if progress.global_step % schedule.checkpoint_every == 0:
                save()
    bar.close()
    if not stopped:
        evaluate()  # the final point of the held-out curve
        finished = True  # a rerun of a finished fit (a wall-time budget, early stopping) takes no more steps
    save()
    model.eval()
    cap = ("time_cap" if over_time else
           "step_cap" if schedule.max_steps and schedule.max_steps < schedule.epochs * steps_per_epoch else "epoch_cap")
    return None if stopped else FitOutcome(progress, curve, round(wall(), 1), early_stopped, cap)
