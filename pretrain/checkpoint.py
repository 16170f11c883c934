"""Full training state: atomic save, keep the last K, resume from the newest loadable checkpoint.

We own this instead of ``accelerator.save_state`` because we need atomic directories, the
position inside the epoch, a fallback past a damaged newest checkpoint, and loading with
``weights_only=True`` throughout (invariant 6).
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


@dataclass
class Progress:
    """Where training is: ``step_in_epoch`` batches of ``epoch`` are done; ``global_step`` in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped_steps: int = 0  # non-finite steps skipped (optim.skip_nonfinite)
    unreadable: list[str] = field(default_factory=list)  # first unreadable image paths seen
    unreadable_count: int = 0
    train_seconds: float = 0.0  # wall time of the training loop over all resumes (checkpointed when saved)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors / plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_dirs(root: Path) -> list[Path]:
    """Completed checkpoint directories, newest first (temp dirs of interrupted saves excluded)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if (p / STATE_FILE).is_file()), reverse=True)


def save(root: Path, state: dict[str, Any], global_step: int, keep: int) -> Path:
    """Write ``state`` to ``root/step_XXXXXXXX/`` atomically (temp dir, then rename); prune to ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{global_step:08d}"
    tmp = root / f".tmp_step_{global_step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # e.g. epoch end and step interval coincide after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; a damaged one is skipped with a warning. None if none."""
    for path in checkpoint_dirs(root):
        try:
            return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True), path
        except Exception as e:  # truncated zip, bad pickle, ...
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "falling back to the previous one", stacklevel=2)
    return None
