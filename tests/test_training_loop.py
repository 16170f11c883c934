"""The one training loop (infomax.train.resumable.TrainingLoop) that pretraining and the eval's SGD fits share: where
it checkpoints, what it calls when, and that a stop at an epoch's last step resumes as if never stopped
(docs/DESIGN.md, invariant 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from accelerate import Accelerator

from infomax.runtime.stop import StopFlag
from infomax.train.resumable import Resumable, Trainer, TrainingLoop


class StopAt(StopFlag):
    """A stop request first seen at the ``n``-th read (the loop reads it once per step)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.signal_name = n, "SIGTERM"

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n <= 0


class Recorder(Trainer):
    """Records what the loop calls, each with the position it is called at."""

    def __init__(self, resumable: Resumable, steps_per_epoch: int) -> None:
        self.resumable, self.steps_per_epoch, self.events, self.steps = resumable, steps_per_epoch, [], []

    def where(self) -> tuple[int, int, int]:
        p = self.resumable.progress
        return p.epoch, p.step_in_epoch, p.global_step

    def batches(self, epoch: int, start: int) -> range:
        return range(start, self.steps_per_epoch)

    def step(self, batch: Any, agree) -> int:
        self.steps.append(self.where()[:2])
        assert batch == self.where()[1]
        return batch

    def epoch_end(self) -> None:
        self.events.append(("epoch_end", *self.where()))

    def at_end(self) -> None:
        self.events.append(("at_end", *self.where()))

    def save(self) -> Path | None:
        self.events.append(("save", *self.where()))
        return self.resumable.save({})


def loop_over(directory: Path, stop: StopAt | None = None, *, total: int = 7,
              save_at_epoch_end: bool = True) -> tuple[TrainingLoop, Recorder]:
    resumable = Resumable(Accelerator(cpu=True), directory, keep=10)
    trainer = Recorder(resumable, 3)
    resumable.resume("start afresh")
    return TrainingLoop(trainer, resumable, steps_per_epoch=3, total_steps=total, epochs=3, checkpoint_every=2,
                        stop=stop, desc="t", save_at_epoch_end=save_at_epoch_end), trainer


@pytest.mark.parametrize("save_at_epoch_end", [True, False])
def test_checkpoints_every_n_steps_at_epoch_ends_and_at_the_end(tmp_path: Path, save_at_epoch_end: bool) -> None:
    loop, trainer = loop_over(tmp_path, save_at_epoch_end=save_at_epoch_end)
    loop.run()
    assert trainer.steps == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    epoch_ends = [("epoch_end", 1, 0, 3), ("save", 1, 0, 3)] if save_at_epoch_end else [("epoch_end", 1, 0, 3)]
    # the epoch's last step is checkpointed after its end, with the position in the next epoch
    assert trainer.events == [("save", 0, 2, 2), *epoch_ends, ("save", 1, 1, 4), ("epoch_end", 2, 0, 6),
                              ("save", 2, 0, 6), ("at_end", 2, 1, 7), ("save", 2, 1, 7)]
    assert loop.steps_this_run == 7 and not loop.stopped


def test_a_stop_at_an_epochs_last_step_leaves_its_end_to_the_resumed_run(tmp_path: Path) -> None:
    straight, whole = loop_over(tmp_path / "a")
    straight.run()
    stopped, first = loop_over(tmp_path / "b", StopAt(3))
    stopped.run()
    assert stopped.stopped and first.events == [("save", 0, 2, 2), ("save", 0, 3, 3)]  # no epoch end, no at_end
    resumed, rest = loop_over(tmp_path / "b")
    resumed.run()
    assert rest.events[0] == ("epoch_end", 1, 0, 3)
    assert first.steps + rest.steps == whole.steps and rest.events[-1] == whole.events[-1]
    assert resumed.steps_this_run == 4


def test_a_step_agrees_once_and_reads_the_stop_request_once(tmp_path: Path) -> None:
    stop = StopAt(10**6)
    loop, trainer = loop_over(tmp_path, stop, total=2)
    loop.run()
    assert stop.n == 10**6 - 2  # one read per step, from the loop's one collective

    class TwiceAgreed(Recorder):
        def step(self, batch: Any, agree) -> int:
            agree(1.0)
            agree(2.0)
            return batch

    loop.trainer = TwiceAgreed(loop.resumable, 3)
    loop.total_steps = 4
    with pytest.raises(RuntimeError, match="agrees across ranks once"):
        loop.run()


def test_checkpoints_by_time_bound_the_saves_per_hour_of_steps(tmp_path: Path, monkeypatch) -> None:
    """With checkpoint_every_min, saves follow the clock, not the steps: 120 steps of a minute each, no step rule
    and no epoch-end saves, save every 30 minutes of training: at steps 30, 60, 90 and the end (at most 2 an
    hour). The time is agreed in the step's one collective, so every rank saves at the same step."""
    from infomax.train import resumable as module

    clock = iter(range(0, 10_000 * 60, 60))  # each read of the clock is a minute later
    monkeypatch.setattr(module.time, "monotonic", lambda: next(clock))
    resumable = Resumable(Accelerator(cpu=True), tmp_path, keep=10)
    trainer = Recorder(resumable, 40)
    resumable.resume("start afresh")
    loop = TrainingLoop(trainer, resumable, steps_per_epoch=40, total_steps=120, epochs=3, checkpoint_every=0,
                        stop=None, desc="t", checkpoint_every_min=30)
    loop.run()
    saves = [global_step for event, _, _, global_step in trainer.events if event == "save"]
    assert saves == [30, 60, 90, 120], trainer.events
