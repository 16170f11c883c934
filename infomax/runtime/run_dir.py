"""The run directory's rules: one experiment per directory, one writer at a time, nothing foreign overwritten.

Shared by ``pretrain/main.py`` (checked before anything is written) and ``launch/submit.py``
(checked before anything is submitted), so both refuse the same things with the same words.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ruamel.yaml import YAMLError

from infomax.config.pretrain import YAML_1_2, Config, ConfigError, to_yaml, yaml_problem
from infomax.runtime.files import write_atomically

MARKER = "infomax-run.json"  # written into every run dir infomax creates
LOCK_FILE = ".lock"
# Keys that may change between runs of one directory: budgets (a larger one continues the run) and
# settings that leave the trajectory alone. Everything else defines the experiment.
BUDGET_KEYS = frozenset({"optim.epochs", "run.max_steps", "run.log_every", "run.checkpoint_every",
                         "run.checkpoint_every_min", "run.save_at_epoch_end",
                         "run.keep_checkpoints", "run.export", "run.resume", "data.num_workers", "run.dir",
                         "run.dist_timeout_min", "data.batches_ahead", "data.os_cache", "monitor.expect_eval"})
# Where the data lives: a copy elsewhere (node-local scratch, a moved .beton) is the same experiment. What the
# data is goes into DATA_RECORD and is compared instead (check_data_moved).
LOCATION_KEYS = ("data.root", "data.path")
DATA_RECORD = "data.json"


class RunDirError(ConfigError):
    """A run dir that this run must not use; the message says which and what to do instead."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved_yaml: str, cfg: Config) -> list[str]:
    """Dotted keys whose values differ between a saved config.yaml and ``cfg``, budgets excepted."""
    old = flatten(YAML_1_2.load(saved_yaml) or {})
    new = flatten(YAML_1_2.load(to_yaml(cfg)))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in BUDGET_KEYS)


def where_the_data_is(cfg: Config) -> dict[str, str]:
    return {"data.root": cfg.data.root, "data.path": cfg.data.path}


def check_data_moved(run_dir: Path, cfg: Config, identity: dict[str, Any]) -> str:
    """'' when the data is where this run dir's record says, else one line naming the old and new places when the
    data there is the same (its identity: dataset, image and class counts, ...); RunDirError when it is other data."""
    record = run_dir / DATA_RECORD
    if not record.is_file() or not has_checkpointed(run_dir):
        return ""
    old = json.loads(record.read_text())
    moved = {k: (old["where"].get(k, ""), new) for k, new in where_the_data_is(cfg).items()
             if old["where"].get(k, "") != new}
    if not moved:
        return ""
    places = "; ".join(f"{k} {shlex.quote(a)} -> {shlex.quote(b)}" for k, (a, b) in moved.items())
    if differ := [f"{k} {v}, not {old['identity'].get(k)}" for k, v in identity.items()
                  if old["identity"].get(k) != v]:
        now = " and ".join(f"{k}={shlex.quote(b)}" for k, (a, b) in moved.items())
        before = " and ".join(f"{k}={shlex.quote(a)}" for k, (a, b) in moved.items())
        raise RunDirError(f"{now} holds other data than run.dir '{run_dir}' trained on ({', '.join(differ)}); give "
                          f"{before} (or a copy of it), or pick a new run.dir")
    return f"the data moved ({places}); it is the same data ({identity_line(identity)}): resuming on it"


def identity_line(identity: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in identity.items())


def record_data(run_dir: Path, cfg: Config, identity: dict[str, Any]) -> None:
    """Where the data is and what it is, for a later run of this dir that finds it elsewhere."""
    write_atomically(run_dir / DATA_RECORD, json.dumps({"where": where_the_data_is(cfg), "identity": identity},
                                                       indent=2) + "\n")


def is_ours(run_dir: Path) -> bool:
    """True for a run dir infomax created (its marker file)."""
    return (run_dir / MARKER).is_file()


def check_run_dir(cfg: Config) -> None:
    """Refuse a non-empty directory infomax did not create, and one that holds another experiment."""
    run_dir = Path(cfg.run.dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"run.dir '{run_dir}' is a file, not a directory; pick another run.dir")
    # The lock file alone is another run that is starting: the lock, not this check, answers it.
    if any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not is_ours(run_dir):
        raise RunDirError(f"run.dir '{run_dir}' is a non-empty directory that infomax did not create (or an older "
                          "version did, before run dirs were marked); pick a new or empty run.dir (nothing was "
                          "written)")
    saved = run_dir / "config.yaml"
    if not has_checkpointed(run_dir):
        return  # nothing to resume: a run that never saved (e.g. it failed at its first step) may start over
    if not saved.is_file():  # its checkpoints would resume under any config, which config.yaml would then record
        if cfg.run.resume == "never":  # a fresh start moves them aside: nothing of theirs is resumed
            return
        raise RunDirError(f"run.dir '{run_dir}' holds checkpoints but no config.yaml, the record of its experiment; "
                          f"restore it from the newest checkpoint with: python -m infomax.runtime.run_dir "
                          f"--restore-config {shlex.quote(str(run_dir))}, then rerun (or start afresh with "
                          "run.resume=never, or pick a new run.dir)")
    check_saved_config(saved)
    differing = config_differences(saved.read_text(), cfg)
    if (run_dir / DATA_RECORD).is_file():  # where the data is may change: what it is is checked (check_data_moved)
        differing = [k for k in differing if k not in LOCATION_KEYS]
    unknown = sorted(set(differing) - set(flatten(YAML_1_2.load(to_yaml(cfg)))))
    if unknown:
        raise RunDirError(f"run.dir '{run_dir}' was written by an older version of infomax ({saved} has "
                          f"{', '.join(unknown[:3])}, which this one does not know; CHANGELOG.md); pick a new run.dir")
    if differing:
        shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
        raise RunDirError(f"run.dir '{run_dir}' belongs to a different config ({shown} differ); pick a new "
                          f"run.dir, or rerun with the config in {saved} (only budgets such as optim.epochs "
                          "and run.max_steps may change)")


def has_checkpointed(run_dir: Path) -> bool:
    """Whether any save finished in ``run_dir`` (an intact checkpoint or not: its config still binds the dir)."""
    return any((run_dir / "checkpoints").glob("step_*/state.pt"))


def check_saved_config(saved: Path) -> None:
    """RunDirError, with the way to restore it, when ``saved`` (a run dir's config.yaml) is not a config."""
    text = saved.read_text(errors="replace")
    try:
        tree = YAML_1_2.load(text)
        problem = ("" if isinstance(tree, dict) and tree else "is empty" if tree is None
                   else f"holds a {type(tree).__name__}")
    except YAMLError as e:
        problem = f"is not valid YAML ({yaml_problem(e)})"
    if not problem and not text.endswith("\n"):  # to_yaml ends every file with one; a cut can still parse
        problem = "is cut short (its last line has no end)"
    known, saved_keys = flatten(YAML_1_2.load(to_yaml(Config()))), flatten(tree) if isinstance(tree, dict) else {}
    missing, unknown = [k for k in known if k not in saved_keys], [k for k in saved_keys if k not in known]
    # A cut at a line end parses too, and then lacks the last keys of every config, in their order (a key added by
    # a later version is missing from the middle, and a renamed one leaves an unknown key: the caller says those).
    if not problem and missing and not unknown and missing == list(known)[-len(missing):]:
        problem = f"is cut short ({len(missing)} keys missing, from {missing[0]} on)"
    if problem:
        restore = f"python -m infomax.runtime.run_dir --restore-config {shlex.quote(str(saved.parent))}"
        raise RunDirError(f"{saved} {problem}: the run dir's record of its experiment is damaged. Restore it from the "
                          f"newest checkpoint with: {restore}")


def restore_config(run_dir: Path) -> Path:
    """Rewrite ``run_dir/config.yaml`` from the config its newest intact checkpoint holds."""
    from infomax.runtime import checkpoint as ckpt

    loaded = ckpt.load_latest(run_dir / "checkpoints", "")
    if loaded is None:
        raise RunDirError(f"'{run_dir}' has no checkpoint to restore config.yaml from; pick a new run.dir")
    state, path = loaded
    saved = run_dir / "config.yaml"
    write_atomically(saved, f"# git revision: restored from {path.name}\n" + state["config"])
    return saved


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and its checkpoints/ and write a file in each, so an unwritable place is found
    at the start, not at the first save after hours of training."""
    for d in (run_dir, run_dir / "checkpoints"):
        try:
            ensure_writable(d)
        except OSError as e:
            raise not_writable(d, e) from None


def ensure_writable(d: Path) -> None:
    """Create ``d`` if needed and write a file in it; the OSError says why not (root ignores chmod, so
    only a real write proves it)."""
    d.mkdir(parents=True, exist_ok=True)
    probe = d / f".write_test_{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def not_writable(path: Path, e: OSError) -> RunDirError:
    return RunDirError(f"'{path}' is not a writable directory ({e.strerror}), so no checkpoint could be saved; "
                       "fix its permissions or pick another run.dir")


def mark_ours(run_dir: Path) -> None:
    """Create ``run_dir`` (if needed) and record that infomax owns it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    if not marker.exists():
        write_atomically(marker, json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                             "host": socket.gethostname(), "pid": os.getpid()}) + "\n")


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` for the life of the run.

    The kernel drops it when the process dies (even by SIGKILL), so a stale lock never blocks a
    resume. The file names the holder, so the refusal can say who it is.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: Any = None

    def acquire(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise not_writable(self.path.parent, e) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"run.dir '{self.path.parent}' is in use by {holder}; wait for it to finish or stop it "
                              "(a stopped run resumes when rerun), or pick another run.dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # Lustre without -o flock, some FUSE and old NFS mounts: the run is still worth training.
            print(f"warning: the filesystem of '{self.path.parent}' does not support file locks ({e.strerror}), as on "
                  "Lustre mounted without -o flock: nothing stops a second run on this dir, so start only one "
                  "(or put run.dir on a filesystem with locks)", file=sys.stderr, flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infomax.runtime.run_dir", description="Repair a run dir.")
    parser.add_argument("--restore-config", type=Path, metavar="RUN_DIR", required=True,
                        help="rewrite RUN_DIR/config.yaml from its newest intact checkpoint")
    args = parser.parse_args(argv)
    from infomax.runtime.checkpoint import CheckpointError

    try:
        saved = restore_config(args.restore_config)
    except (RunDirError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"restored {saved} from the newest checkpoint; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
