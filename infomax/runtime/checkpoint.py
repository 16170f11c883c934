"""Full training state: atomic save, keep the last K, resume from the newest intact checkpoint.

We own this instead of ``accelerator.save_state`` because we need atomic directories, the
position inside the epoch, a checksum that catches bit rot, a fallback past a damaged newest
checkpoint, and loading with ``weights_only=True`` throughout (no pickle code runs on load).
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"  # size and sha256 of state.pt, written last


class CheckpointError(RuntimeError):
    """A checkpoint problem the user has to act on; the message is one line that says how."""


class DamagedCheckpoints(CheckpointError):
    """Checkpoints exist but none of them is intact."""


class RanksDisagree(CheckpointError):
    """The ranks of one job cannot resume from the same checkpoint (a lagging or unshared filesystem)."""


class DiskFull(CheckpointError):
    """A save ran out of space; the previous checkpoints are untouched."""


class PartMismatch(CheckpointError):
    """A checkpoint's part does not fit the module this version builds from the run's config."""


def load_part(module: torch.nn.Module, state: dict[str, Any], part: str, path: Path) -> None:
    """``module.load_state_dict(state)``, a mismatch said in one line instead of torch's key listing: the
    checkpoint was written by an older version of infomax, whose parts were laid out differently."""
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = (", ".join(keys[:3]) or "-" for keys in (result.missing_keys, result.unexpected_keys))
    if result.missing_keys or result.unexpected_keys:
        raise PartMismatch(f"{path}: its '{part}' state does not fit this version's (missing {missing}; not expected "
                           f"{unexpected}): written by an older version of infomax, which this one does not load; "
                           "start a new run.dir")


@dataclass
class Progress:
    """Where training is: ``step_in_epoch`` batches of ``epoch`` are done; ``global_step`` in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped_steps: int = 0  # non-finite steps skipped (optim.skip_nonfinite)
    unreadable: list[str] = field(default_factory=list)  # distinct unreadable image paths, in the order seen
    unreadable_count: int = 0  # len(unreadable)
    train_seconds: float = 0.0  # wall time of the training loop over all resumes (checkpointed when saved)
    # [mode, first step] of each stretch of steps run in one precision: run.precision=auto may choose another on
    # the machine a run resumes on (bf16 on one with native bf16, fp32 on one without)
    precision: list[list] = field(default_factory=list)

    def enter_precision(self, mode: str) -> str:
        """Record that the steps from here on run in ``mode``; one line when that is a change, else ''."""
        if self.precision and self.precision[-1][0] == mode:
            return ""
        if self.precision and self.precision[-1][1] > self.global_step:  # a stretch that ran no step: not one
            self.precision.pop()
            return self.enter_precision(mode)
        self.precision.append([mode, self.global_step + 1])
        if len(self.precision) == 1:
            return ""
        (before, first), step = self.precision[-2], self.global_step
        return (f"precision changes from {before} to {mode} at step {step + 1} (run.precision=auto on this machine): "
                f"steps {first}-{step} ran in {before}; the summary and the model card list each stretch")

    def precision_line(self, last_step: int | None = None) -> str:
        """'bf16' for one precision, else 'bf16 for steps 1-16, no for 17-24'."""
        if len(self.precision) <= 1:
            return self.precision[0][0] if self.precision else ""
        ends = [first - 1 for _, first in self.precision[1:]] + [last_step or self.global_step]
        parts = [f"{mode} for {'steps ' if i == 0 else ''}{first}-{end}"
                 for i, ((mode, first), end) in enumerate(zip(self.precision, ends))]
        return ", ".join(parts)

    def note_unreadable(self, paths: list[str]) -> None:
        """Record skipped images; a file skipped again (next epoch, or past a bad neighbour) counts once."""
        seen = set(self.unreadable)
        self.unreadable += [p for p in dict.fromkeys(paths) if p not in seen]
        self.unreadable_count = len(self.unreadable)


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


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete ``.tmp_step_*`` dirs that a killed save (SIGKILL, a lost node) left in ``root``; returns them.

    Call only from the loop that owns ``root`` before it saves: pretraining holds the run-dir lock,
    and an eval owns its output dir. So no live save can be writing one of these.
    """
    stale = sorted(root.glob(".tmp_step_*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


SECOND_CTRL_C = ("stopped by a second Ctrl-C without saving; the checkpoints already written are kept. "
                 "Rerun the same command to resume")


class SaveInterrupted(CheckpointError):
    """A second Ctrl-C during a save; the partial save was removed, earlier checkpoints are intact."""


def _interrupted(e: BaseException | None) -> bool:
    """A KeyboardInterrupt anywhere in the chain: torch's zip writer turns one raised mid-write into
    a RuntimeError ("enforce fail at inline_container.cc") whose context is the interrupt."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


class _HashingWriter(io.RawIOBase):
    """A file that hashes what is written to it, so the checksum costs no second read."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        self.sha.update(memoryview(data)[:n])
        self.size += n
        return n


def save(root: Path, state: dict[str, Any], global_step: int, keep: int) -> Path:
    """Write ``state`` to ``root/step_XXXXXXXX/`` atomically (temp dir, then rename); prune to ``keep``.

    The manifest (size and sha256 of state.pt) is written last, so an intact manifest vouches for
    the whole file. Out of disk space, the temp dir is removed and ``DiskFull`` says how much is needed.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{global_step:08d}"
    tmp = root / f".tmp_step_{global_step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = None
    try:
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        manifest = {STATE_FILE: {"bytes": writer.size, "sha256": writer.sha.hexdigest()}, "step": global_step}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError, KeyboardInterrupt) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _interrupted(e):
            raise SaveInterrupted(f"the save of {final.name} was interrupted by a second Ctrl-C and removed; "
                                  f"{_what_is_safe(checkpoint_dirs(root))}. "
                                  "Rerun the same command to resume") from None
        if not (reason := no_room(e)):
            raise
        raise _disk_full(root, final, reason, max(writer.size if writer else 0, _state_bytes(state))) from None
    if final.exists():  # e.g. epoch end and step interval coincide after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# Why a write found no room, by errno. Python ignores SIGXFSZ, so a file-size limit (ulimit -f) is EFBIG.
NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "the file-size limit (ulimit -f) was reached"}


def no_room(e: BaseException | None) -> str | None:
    """Why a write found no room (:data:`NO_ROOM`), looked for anywhere in the chain because torch's zip
    writer re-raises a failed write as a RuntimeError; None for any other error."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            return NO_ROOM[e.errno]
        e = e.__cause__ or e.__context__
    return None


def make_room(reason: str) -> str:
    """What to do about :func:`no_room`'s ``reason``."""
    return "raise the limit (ulimit -f unlimited)" if "ulimit" in reason else "free some space"


def format_size(n: float) -> str:
    """Bytes as a person reads them: KB below 1 MB (so a small need never reads "0 MB"), then MB, GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.{1 if n < 10 * scale else 0}f} {unit}"
    return f"{max(1, round(n / 1e3))} KB"


def _state_bytes(state: Any) -> int:
    """The tensors' bytes in a (nested) state: what torch.save will need at least, before it has written it."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _what_is_safe(previous: list[Path]) -> str:
    """What a failed save leaves to resume from, given the checkpoints newest first."""
    return f"the last checkpoint {previous[0]} is intact" if previous else "no earlier checkpoint exists"


def _disk_full(root: Path, final: Path, reason: str, needed: int) -> DiskFull:
    previous = checkpoint_dirs(root)
    # Checkpoints of one run are all about the same size: the last one is the best estimate of the need.
    needed = max(needed, (previous[0] / STATE_FILE).stat().st_size if previous else 0)
    free = "" if "ulimit" in reason else f", {format_size(shutil.disk_usage(root).free)} are free"
    return DiskFull(f"{reason} in {root} while writing {final.name}: it needs about {format_size(needed)}{free}; "
                    f"{_what_is_safe(previous)} and the partial save was removed. {make_room(reason).capitalize()} "
                    "and rerun the same command to resume")


def read_intact(path: Path) -> dict[str, Any]:
    """Load ``path/state.pt`` after checking it against the manifest. Raises on any damage, and on a
    checkpoint without a manifest (every save writes one before the rename that finishes it, so only an
    older version's checkpoint lacks it)."""
    data = (path / STATE_FILE).read_bytes()
    if not (path / MANIFEST).is_file():
        raise ValueError(f"no {MANIFEST}: written by an older version of infomax, which this one does not load")
    expected = json.loads((path / MANIFEST).read_text())[STATE_FILE]
    if len(data) != expected["bytes"]:
        raise ValueError(f"{len(data)} bytes, the manifest says {expected['bytes']}")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise ValueError("sha256 differs from the manifest (bit rot or a partial copy)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_latest(root: Path, fresh_start_hint: str) -> tuple[dict[str, Any], Path] | None:
    """The newest intact checkpoint; a damaged one is skipped with a warning. None if there are none.

    If checkpoints exist but none is intact, ``DamagedCheckpoints`` stops the caller: silently
    starting from step 0 would throw a long job's progress away. ``fresh_start_hint`` says how
    to start afresh instead."""
    damaged = []
    for path in checkpoint_dirs(root):
        try:
            return read_intact(path), path
        except Exception as e:  # empty or truncated file, bad zip, checksum mismatch, ...
            reason = (str(e).strip().splitlines() or ["empty file"])[0][:120]
            print(f"warning: checkpoint {path} is damaged ({type(e).__name__}: {reason}); trying the one before it",
                  file=sys.stderr, flush=True)  # one line, not a UserWarning with its source line
            damaged.append(path.name)
    if damaged:
        raise DamagedCheckpoints(f"every checkpoint in {root} is damaged ({', '.join(damaged)}), so there is nothing "
                                 f"to resume from and nothing was changed; {fresh_start_hint}")
    return None


def move_aside(root: Path) -> Path | None:
    """Rename ``root`` (a checkpoints dir, TensorBoard's tb/, the export, an eval's report.md) to
    ``root.old-TIMESTAMP`` (``report.old-TIMESTAMP.md`` for a file) so a fresh start cannot prune or mix with it,
    nor be read as its; the old files stay on disk. Returns the new name, or None if there was nothing."""
    is_file = root.is_file()
    if not is_file and (not root.is_dir() or not any(root.iterdir())):
        return None
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for n in itertools.count():  # two fresh starts within a second keep both earlier runs
        old = f"old-{stamp}" + (f"-{n}" if n else "")
        target = root.with_name(f"{root.stem}.{old}{root.suffix}" if is_file else f"{root.name}.{old}")
        if not target.exists():
            break
    os.replace(root, target)
    return target
