"""What a run reports while it trains: TensorBoard scalars, text and images, and throughput."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid

T = TypeVar("T")


class TensorBoard:
    """Writes only on the main process (docs/DESIGN.md, invariant 4); callers pass values already reduced.

    Logging never stops training. When a write fails (tb/ deleted mid-run, the disk full) it warns once
    and goes on in a new event file in a recreated log dir; when that keeps failing, it goes on without
    TensorBoard and says so. (The writer's own thread raises a failed write at the next call.)"""

    RECOVERIES = 3

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.log_dir, self.recoveries = log_dir, 0
        self.writer: SummaryWriter | None = None
        if enabled:
            _quiet_writer_threads()
            try:
                self.writer = SummaryWriter(str(log_dir))
            except OSError as e:
                self._recover(lambda w: None, e)

    def _write(self, write: Callable[[SummaryWriter], None]) -> None:
        if self.writer is None:
            return
        try:
            write(self.writer)
        except OSError as e:
            self._recover(write, e)

    def _recover(self, write: Callable[[SummaryWriter], None], error: OSError) -> None:
        self._close_quietly()
        while self.recoveries < self.RECOVERIES:
            if self.recoveries == 0:
                _warn(f"a TensorBoard write failed ({error}); training goes on, logging into a new event file "
                      f"in {self.log_dir}")
            self.recoveries += 1
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.writer = SummaryWriter(str(self.log_dir))
                write(self.writer)
                return
            except OSError as e:
                error = e
                self._close_quietly()
        _warn(f"TensorBoard logging stopped ({error}); training goes on without it")

    def _close_quietly(self) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()  # re-raises the writer thread's error
        except OSError:
            pass

    def scalars(self, values: dict[str, float], step: int) -> None:
        def write(w: SummaryWriter) -> None:
            for k, v in values.items():
                w.add_scalar(k, v, step)
        self._write(write)

    def text(self, tag: str, text: str) -> None:
        self._write(lambda w: w.add_text(tag, "```\n" + text + "\n```"))

    def views(self, views: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float], n: int = 8) -> None:
        """One grid: row v = the first n images of view v, un-normalised so a person sees the augmentations."""
        if not self.writer:
            return
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        size = max(v.shape[-1] for v in views)
        rows = [nn.functional.interpolate((v[:n].float().cpu() * s + m).clamp(0, 1), size=size) for v in views]
        grid = make_grid(torch.cat(rows), nrow=min(n, len(rows[0])))
        self._write(lambda w: w.add_image("views/first_batch", grid, 0))

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        def write(w: SummaryWriter) -> None:
            # Written into this run's own event file (add_hparams would open a second writer).
            for summary in hparams_summary(hparams, metrics):
                w.file_writer.add_summary(summary)
            for k, v in metrics.items():
                w.add_scalar(k, v)
        self._write(write)

    def close(self) -> None:
        self._write(lambda w: w.flush())  # a failure here still recovers, so the last values are kept
        self._close_quietly()


def _quiet_writer_threads() -> None:
    """Keep the traceback of TensorBoard's writer thread off the console: the thread stores its OSError
    and the next call raises it again in this thread, where :class:`TensorBoard` recovers with one line.
    Every other thread's exception still reaches the hook that was there before."""
    previous = threading.excepthook
    if getattr(previous, "infomax_quiet", False):
        return

    def hook(args: Any) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.infomax_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Throughput:
    """Images/s and the fraction of wall time spent waiting for the loader, since the last read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.images = 0

    def read(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = self.images / elapsed, self.wait / elapsed
        self.reset()
        return out

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, each one's wait for the loader (from when it is asked for) added to :attr:`wait`."""
        asked = time.perf_counter()
        for batch in batches:
            self.wait += time.perf_counter() - asked
            yield batch
            asked = time.perf_counter()


class LogProgress:
    """tqdm's interface (update, set_postfix, write, close) as plain lines for a log file.

    Off a terminal (SLURM's .err files, ``make demo > log``) tqdm would write a ``\\r`` frame for every
    step; this prints ``desc: step n/total (p%), rate, postfix, ETA`` every ``every_s`` seconds and once
    at the end."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "step", every_s: float = 30.0,
                 file: Any = None) -> None:
        self.total, self.n, self.desc, self.unit, self.every_s = total, initial, desc, unit, every_s
        self.file, self.postfix = file or sys.stderr, ""
        self.start, self.start_n = time.perf_counter(), initial
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        if self.n != self.start_n:
            self._line()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> None:
        now = time.perf_counter()
        self.last = now
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 and self.total else float("nan")
        eta_text = "?" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.unit} {self.n}/{self.total}{percent}, {rate:.2f} {self.unit}/s{postfix}, ETA "
              f"{eta_text}",
              file=self.file, flush=True)


def format_duration(seconds: float) -> str:
    """e.g. 4 min 05 s, 38 s."""
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes else f"{s} s"


def progress_bar(total: int, *, desc: str, unit: str = "step", initial: int = 0, disable: bool = False) -> Any:
    """tqdm on a terminal; :class:`LogProgress` when stderr is not one (every ``INFOMAX_PROGRESS_SECONDS``,
    default 30 s)."""
    from tqdm.auto import tqdm

    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
    return LogProgress(total, initial, desc, unit, progress_seconds())


def progress_seconds(default: float = 30.0) -> float:
    """Seconds between plain progress lines: ``INFOMAX_PROGRESS_SECONDS`` (0: every update), else ``default``."""
    value = os.environ.get("INFOMAX_PROGRESS_SECONDS", "")
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = -1.0
    if 0 <= seconds < float("inf"):
        return seconds
    if value not in _SAID_BAD:  # once a process, not at every bar
        _SAID_BAD.add(value)
        print(f"warning: INFOMAX_PROGRESS_SECONDS={value!r} is not a number of seconds >= 0; a progress line every "
              f"{default:g} s", file=sys.stderr, flush=True)
    return default


_SAID_BAD: set[str] = set()
