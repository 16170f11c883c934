"""What a run reports while it trains: TensorBoard scalars, text and images, and throughput."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid


class TensorBoard:
    """Writes only on the main process (invariant 4); callers pass values already reduced."""

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
