"""What a run reports while it trains: TensorBoard scalars, text and images, and throughput."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid


class TensorBoard:
    """Writes only on the main process (docs/DESIGN.md, invariant 4); callers pass values already reduced."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = SummaryWriter(str(log_dir)) if enabled else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, "```\n" + text + "\n```")

    def views(self, views: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float], n: int = 8) -> None:
        """One grid: row v = the first n images of view v, un-normalised so a person sees the augmentations."""
        if not self.writer:
            return
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        size = max(v.shape[-1] for v in views)
        rows = [nn.functional.interpolate((v[:n].float().cpu() * s + m).clamp(0, 1), size=size) for v in views]
        self.writer.add_image("views/first_batch", make_grid(torch.cat(rows), nrow=min(n, len(rows[0]))), 0)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer:
            # Written into this run's own event file (add_hparams would open a second writer).
            for summary in hparams_summary(hparams, metrics):
                self.writer.file_writer.add_summary(summary)
            for k, v in metrics.items():
                self.writer.add_scalar(k, v)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


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

    def _line(self) -> None:
        now = time.perf_counter()
        self.last = now
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 and self.total else float("nan")
        eta_text = "?" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.unit} {self.n}/{self.total}{percent}, {rate:.2f} {self.unit}/s{postfix}, ETA {eta_text}",
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
    return LogProgress(total, initial, desc, unit, float(os.environ.get("INFOMAX_PROGRESS_SECONDS", "30")))
