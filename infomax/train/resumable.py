"""What every resumable loop shares: pretraining and the eval stage's SGD fits (the imagenet-protocol
probe, the supervised baselines).

A :class:`Resumable` owns the loop's checkpoint directory and position (:class:`Progress`): it
resumes from the newest intact checkpoint (position and every rank's RNG restored, the caller's
state returned), saves atomically from rank 0 with every rank's RNG and a barrier after, and gives
the ranks one way to agree (the max over ranks of a few flags, e.g. a stop request and a clock), so
every rank takes the same branch.

A :class:`TrainingLoop` is the one loop over it: epochs of steps from the position, one agreement
per step, checkpoints, the step budget and the progress bar. What differs between its callers is a
:class:`Trainer`: pretraining's :class:`infomax.train.loop.Run` and the eval's :class:`infomax.eval.classifier.SGDFit`
supply their batches, their step, and what they do after a step (logging, held-out evaluation), at an
epoch's end (the kNN monitor) and at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from infomax.config.pretrain import ConfigError
from infomax.runtime import checkpoint as ckpt
from infomax.runtime.distributed import Agree, agree_max
from infomax.runtime.stop import StopFlag
from infomax.runtime.tracking import progress_bar


class WorldSizeChanged(ConfigError):
    """A checkpoint resumed under another number of processes than saved it."""


class Resumable:
    def __init__(self, accelerator: Accelerator, directory: Path, keep: int) -> None:
        self.accelerator, self.directory, self.keep = accelerator, directory, keep
        self.progress = ckpt.Progress()

    def resume(self, fresh_start_hint: str) -> tuple[dict[str, Any], Path] | None:
        """(the caller's state, its path) from the newest intact checkpoint, with the position and this
        rank's RNG already restored; None when there is none. All damaged: CheckpointError naming them.

        Rank 0 chooses the checkpoint and every rank loads that one: on a shared filesystem that lags
        (or is not shared) each rank's own newest could be another step, and the job would hang or
        diverge. A rank that cannot read it, or reads another step, stops every rank with RanksDisagree."""
        acc = self.accelerator
        choice: list[Any] = [None]
        if acc.is_main_process:
            for stale in ckpt.remove_stale_temporaries(self.directory):
                print(f"removed {stale}: the partial save of a run that was killed mid-save", flush=True)
            try:
                loaded = ckpt.load_latest(self.directory, fresh_start_hint)
                choice = [("found", str(loaded[1])) if loaded else ("none", "")]
            except ckpt.CheckpointError as e:  # said on every rank, or the others would wait for the choice
                choice = [("error", str(e))]
        kind, detail = broadcast_object_list(choice)[0]
        if kind == "error":
            raise ckpt.DamagedCheckpoints(detail)
        if kind == "none":
            return None
        path = self.directory / Path(detail).name  # rank 0's choice, as this rank sees run.dir
        problem = ""
        if acc.is_main_process:
            state = loaded[0]
        else:
            try:
                state = ckpt.read_intact(path)
            except Exception as e:  # missing here (not yet visible, or another filesystem), or damaged
                problem, state = f"{type(e).__name__}: {str(e).strip()[:160]}", None
        steps = gather_object([(acc.process_index, problem, state["progress"]["global_step"] if state else None)])
        unreadable = [f"rank {r} ({p})" for r, p, _ in steps if p]
        if unreadable or len({s for _, _, s in steps}) > 1:
            found = "cannot read it: " + ", ".join(unreadable) if unreadable else "read different steps from it: " + \
                ", ".join(f"rank {r} step {s}" for r, _, s in steps)
            raise ckpt.RanksDisagree(
                f"rank 0 resumes from {detail}, but {found}. Every rank must see the same checkpoints: put run.dir "
                "on a filesystem all nodes share, or wait for a lagging one to catch up, and resubmit")
        rngs = state["rng"]  # one per rank that saved it
        if len(rngs) != acc.num_processes:
            raise WorldSizeChanged(
                f"{path} was saved by {len(rngs)} process(es) and is resumed on {acc.num_processes}: "
                "the global batch and each rank's share of the data would change silently. Resume it on "
                f"{len(rngs)} process(es) (accelerate launch --num_processes {len(rngs)}, or the SLURM job's "
                "--nodes and --gpus-per-node it was submitted with), or start a new run.dir")
        self.progress = ckpt.Progress(**state["progress"])
        ckpt.set_rng_state(rngs[acc.process_index])
        return state, path

    def save(self, state: dict[str, Any]) -> Path | None:
        """Write ``state`` + position + every rank's RNG (rank 0 writes; all ranks call). Returns the path on rank 0."""
        rngs = gather_object([ckpt.rng_state()])
        path = None
        if self.accelerator.is_main_process:
            path = ckpt.save(self.directory, {**state, "progress": vars(self.progress), "rng": rngs},
                             self.progress.global_step, self.keep)
        self.accelerator.wait_for_everyone()
        return path


class Trainer:
    """What a caller of :class:`TrainingLoop` supplies. ``batches``, ``step`` and ``save`` are its own;
    the other hooks do nothing unless it has something to do there."""

    def batches(self, epoch: int, start: int) -> Iterable[Any]:
        """The batches of ``epoch`` from its batch ``start`` on (resuming inside an epoch)."""
        raise NotImplementedError

    def step(self, batch: Any, agree: Agree) -> Any:
        """Train on ``batch`` at the current position (not yet moved past it); returns what
        :meth:`after_step` gets. ``agree(*values)`` is the step's one collective (:meth:`TrainingLoop.agree`):
        a step with values of its own to agree passes them (pretraining's non-finite flag before backward,
        a fit's clock) and gets their max over ranks; the stop request rides in it. A step that does not
        call it leaves the loop to agree the stop alone after it."""
        raise NotImplementedError

    def after_step(self, result: Any, last: bool) -> None:
        """After each step, the position moved past it and the ranks agreed; ``last``: the loop ends after
        this step (a stop request, the step budget)."""

    def done(self) -> bool:
        """The trainer's own reason to take no more steps (a time cap, early stopping, a finished fit)."""
        return False

    def epoch_end(self) -> None:
        """After an epoch's last step, the position moved to the next epoch; skipped at a stop, which leaves
        the epoch's end to the resumed run."""

    def at_end(self) -> None:
        """After the last step of a loop that no stop request ended (the final measurement)."""

    def save(self) -> Path | None:
        """A checkpoint of everything through :meth:`Resumable.save` (all ranks call; rank 0 writes); its path
        on rank 0."""
        raise NotImplementedError


class TrainingLoop:
    """The one training loop, shared by pretraining and the eval's SGD fits (a :class:`Trainer` each).

    It owns the position (``resumable.progress``: epoch and step inside it), which it moves after each
    step; iterates each epoch's batches from that position; agrees once per step across ranks on the stop
    request (with any values the step adds, :meth:`agree`); checkpoints every ``checkpoint_every`` steps (0: none
    by steps), every ``checkpoint_every_min`` minutes of wall time (agreed in the same collective, so every rank
    saves at the same step), at each epoch end with ``save_at_epoch_end``, and once at the end, a stop included; ends at
    ``total_steps``, ``epochs``, a stop or the trainer's :meth:`Trainer.done`; and draws the progress bar.

    At an epoch's last step the position moves to the next epoch before that step's checkpoint, unless a
    stop request ended the step: then the checkpoint holds the finished epoch (step ``steps_per_epoch``)
    and the resumed run ends it (:meth:`Trainer.epoch_end`, the kNN monitor) as the uninterrupted run would.
    """

    def __init__(self, trainer: Trainer, resumable: Resumable, *, steps_per_epoch: int, total_steps: int,
                 epochs: float, checkpoint_every: int, stop: StopFlag | None, desc: str,
                 save_at_epoch_end: bool = False, checkpoint_every_min: float = 0.0) -> None:
        self.trainer, self.resumable, self.stop = trainer, resumable, stop
        self.steps_per_epoch, self.total_steps, self.epochs = steps_per_epoch, total_steps, epochs
        self.checkpoint_every, self.save_at_epoch_end = checkpoint_every, save_at_epoch_end
        # A large state saved often stops every GPU for its copy, write and barrier: by time, not by epoch.
        self.checkpoint_every_s = checkpoint_every_min * 60
        self.last_save = time.monotonic()
        self.save_due = False  # the time since the last save reached checkpoint_every_min on some rank
        self.steps_this_run = 0
        self.stopped = False  # a stop request on some rank, agreed at the last step
        self._agreed = False  # this step's collective has been made
        self.bar = progress_bar(total_steps, initial=self.progress.global_step, desc=desc,
                                disable=not resumable.accelerator.is_main_process)

    @property
    def progress(self) -> ckpt.Progress:
        return self.resumable.progress

    def over(self) -> bool:
        """Whether no more steps are to be taken: the budget (steps, epochs), a stop, the trainer's own end."""
        p = self.progress
        return p.global_step >= self.total_steps or p.epoch >= self.epochs or self.stopped or self.trainer.done()

    def agree(self, *values: float | torch.Tensor) -> list[float]:
        """This step's one collective: this rank's stop request beside ``values``, each maxed over ranks.
        Records the agreed stop (:attr:`stopped`) and returns the values' maxima. Once per step."""
        if self._agreed:
            raise RuntimeError("a training step agrees across ranks once (one collective per step)")
        self._agreed = True
        votes = self.stop.votes() if self.stop is not None else (0.0, 0.0)
        due = float(0 < self.checkpoint_every_s <= time.monotonic() - self.last_save)
        stop, cause, save, *agreed = agree_max(self.resumable.accelerator.device, *votes, due, *values)
        self.stopped = self.stop.agreed(stop, cause) if self.stop is not None else False
        self.save_due = save > 0
        return agreed

    def run(self) -> Path | None:
        """Train from the position until the loop is :meth:`over`; then, unless stopped, the trainer's
        :meth:`Trainer.at_end`; the bar's last line, and the last checkpoint, whose path (rank 0) it returns."""
        # A run stopped at an epoch's last step resumes with that epoch's end still to do.
        ended_epoch = self.progress.step_in_epoch >= self.steps_per_epoch
        while True:
            if ended_epoch:
                self._end_epoch()
            if self.over():
                break
            ended_epoch = self._train_epoch()
        if not self.stopped:
            self.trainer.at_end()
        self.bar.close()
        return self._save()

    def _save(self) -> Path | None:
        path = self.trainer.save()
        self.last_save = time.monotonic()
        return path

    def _train_epoch(self) -> bool:
        """Steps from the position through the epoch's batches; False when the loop ended inside the epoch
        (a stop at any step of it, or the end of training before its last step)."""
        p = self.progress
        for batch in self.trainer.batches(p.epoch, p.step_in_epoch):
            self._step(batch)
            if self.stopped:
                return False
            if p.step_in_epoch < self.steps_per_epoch:  # the epoch's last step is checkpointed at its end
                if self.over():
                    return False
                if self._steps_due() or self.save_due:
                    self._save()
        return True

    def _step(self, batch: Any) -> None:
        """One step: the trainer's, the position moved past it, the ranks' agreement, the trainer's after-step."""
        p = self.progress
        self._agreed = False
        result = self.trainer.step(batch, self.agree)
        p.step_in_epoch += 1
        p.global_step += 1
        self.steps_this_run += 1
        if not self._agreed:
            self.agree()
        self.trainer.after_step(result, last=self.stopped or p.global_step >= self.total_steps)
        self.bar.update(1)

    def _end_epoch(self) -> None:
        """The position to the next epoch, the trainer's epoch end, and its checkpoint unless the loop is over
        (the last checkpoint follows)."""
        p = self.progress
        p.epoch, p.step_in_epoch = p.epoch + 1, 0
        self.trainer.epoch_end()
        if not self.over() and (self.save_at_epoch_end or self.save_due or self._steps_due()):
            self._save()

    def _steps_due(self) -> bool:
        """The step rule's save: every ``checkpoint_every`` steps (0: no step rule)."""
        return self.checkpoint_every > 0 and self.progress.global_step % self.checkpoint_every == 0
