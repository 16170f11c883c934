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
from accelerate.utils import gather_object

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
        rank's RNG already restored; None when there is none. All damaged: CheckpointError naming them."""
        if self.accelerator.is_main_process:
            for stale in ckpt.remove_stale_temporaries(self.directory):
                print(f"removed {stale}: the partial save of a run that was killed mid-save", flush=True)
        loaded = ckpt.load_latest(self.directory, fresh_start_hint)
        if loaded:
            state, path = loaded
            rngs = state["rng"]  # one per rank that saved it
            if len(rngs) != self.accelerator.num_processes:
                raise WorldSizeChanged(
                    f"{path} was saved by {len(rngs)} process(es) and is resumed on {self.accelerator.num_processes}: "
                    "the global batch and each rank's share of the data would change silently. Resume it on "
                    f"{len(rngs)} process(es) (accelerate launch --num_processes {len(rngs)}, or the SLURM job's "
                    "--nodes and --gpus-per-node it was submitted with), or start a new run.dir")
            self.progress = ckpt.Progress(**state["progress"])
            ckpt.set_rng_state(rngs[self.accelerator.process_index])
        return loaded

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
