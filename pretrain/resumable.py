"""What every resumable loop shares: pretraining and the eval stage's SGD fits (the imagenet-protocol
probe, the supervised baselines).

A :class:`Resumable` owns the loop's checkpoint directory and position (:class:`Progress`): it
resumes from the newest intact checkpoint (position and every rank's RNG restored, the caller's
state returned), saves atomically from rank 0 with every rank's RNG and a barrier after, and gives
the ranks one way to agree (the max over ranks of a few flags, e.g. a stop request and a clock), so
every rank takes the same branch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError
from pretrain.distributed import all_reduce_max_


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

    def agree(self, *values: float) -> list[float]:
        """The max over ranks of each value: one collective, so every rank decides alike."""
        flags = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return all_reduce_max_(flags).tolist()
