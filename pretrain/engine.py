"""One training step under Accelerate, the stop flag, metrics and TensorBoard, the kNN monitor."""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid

from pretrain.data import ImageDataset, build_eval_transform
from pretrain.data.multiview import load_readable
from pretrain.distributed import all_reduce_max_
from pretrain.knn import knn_predict
from pretrain.momentum import MomentumKeys
from pretrain.online_probe import probe_accuracy, probe_step


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and what to change."""


# submitit's preemption / time-limit signal (SLURM sends it `--signal-delay` seconds before the end).
PREEMPT_SIGNAL = signal.SIGUSR2


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or SIGUSR2 (cancel, preemption, time limit, a scheduler's stop) and by
    Ctrl-C (SIGINT; a second Ctrl-C aborts at once, without saving).

    The handler only sets a flag; ranks agree on it at the next step boundary (one all-reduce),
    then all save a checkpoint and exit cleanly together.
    """

    def __init__(self) -> None:
        self.signal_name = ""
        self._signalled = False
        # Under `accelerate launch` / torchrun the launcher is our parent. If it dies (kill -9), the
        # ranks are re-parented and would run on unseen, racing any rerun: treat that as a stop.
        launched = "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
        self._launcher = os.getppid() if launched else None

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1, PREEMPT_SIGNAL, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    @property
    def requested(self) -> bool:
        if not self._signalled and self._launcher is not None and os.getppid() != self._launcher:
            self._signalled, self.signal_name = True, "launcher exited"
        return self._signalled

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._signalled:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
        self._signalled = True
        self.signal_name = signal.Signals(signum).name


@dataclass
class StepResult:
    loss: torch.Tensor  # detached scalar
    diag: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None  # None when the step was skipped
    stop: bool  # some rank asked to stop
    probe_loss: torch.Tensor | None = None  # the online probe's cross-entropy, when it trained


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    views: Sequence[torch.Tensor],
    *,
    grad_clip: float,
    skip_nonfinite: bool,
    stop_requested: bool,
    step: int,
    channels_last: bool = False,
    key_model: MomentumKeys | None = None,
    probe: tuple[nn.Module, torch.optim.Optimizer, torch.Tensor] | None = None,
) -> StepResult:
    """Forward V views, InfoNCE in fp32, agree across ranks on (non-finite, stop), backward, clip, step.

    With ``key_model`` (the momentum queue) the keys come from it, and after the optimizer step it
    moves towards the online model. Raises NonFiniteLoss on a NaN/inf loss unless ``skip_nonfinite``
    (then no update is made). ``probe`` = (online probe, its optimizer, labels): it trains on view 0's
    detached encoder features after the encoder's step.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = [v.to(memory_format=fmt) for v in views]
    with accelerator.autocast():
        z, features = model(views, with_features=True) if probe is not None else (model(views), None)
        keys = key_model(views) if key_model is not None else None
    loss, diag = objective(z) if keys is None else objective(z, keys)
    # One collective for both decisions, so every rank takes the same branch (no DDP hang).
    flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, float(stop_requested)], device=loss.device)
    nonfinite, stop = (bool(f) for f in all_reduce_max_(flags))
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if not skip_nonfinite:
            raise NonFiniteLoss(
                f"loss is not finite at step {step} (local loss {loss.item()}): lower optim.lr, set optim.grad_clip, "
                "prefer run.precision=bf16 over fp16, or set optim.skip_nonfinite=true to skip such steps"
            )
        return StepResult(loss.detach(), diag, None, stop)
    accelerator.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # model and any learned critic
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if key_model is not None:
        key_model.update(accelerator.unwrap_model(model))
        accelerator.unwrap_model(objective).enqueue_pending()
    probe_loss = probe_step(*probe[:2], features, probe[2]) if probe is not None else None
    return StepResult(loss.detach(), diag, torch.as_tensor(grad_norm).detach(), stop, probe_loss)


class ImageListDataset(torch.utils.data.Dataset):
    """An ImageDataset seen through the deterministic eval transform (kNN monitor, eval stage),
    normalised with ``mean``/``std`` (an export's own; default: the dataset's)."""

    def __init__(self, base: ImageDataset, size: int, crop_ratio: float = 1.0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.base = base
        self.transform = build_eval_transform(size, mean or base.mean, std or base.std, crop_ratio)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label, _ = load_readable(self.base, i)
        return self.transform(image), label


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: torch.utils.data.Dataset, accelerator: Accelerator,
                     batch_size: int = 256, num_workers: int = 0,
                     input_fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                     shard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N x F, fp32, CPU) and labels (N) of a labelled dataset, in eval mode.

    ``input_fn`` maps a device batch to the encoder's input (e.g. the L channel of Lab for CMC).
    With ``shard`` every process computes its shard and all receive the whole split:
    ``gather_for_metrics`` drops the samples the sharded loader repeats to even out the last
    batch, so each image counts exactly once whatever the process count. Without it the calling
    process computes everything alone (the main-process kNN monitor).
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    if shard:
        loader = accelerator.prepare_data_loader(loader)
    feats, labels = [], []
    was_training = encoder.training
    encoder.eval()
    for x, y in loader:
        with accelerator.autocast():
            out = encoder(input_fn(x.to(accelerator.device))).float()
        if shard:
            out, y = accelerator.gather_for_metrics((out, y.to(accelerator.device)))
        feats.append(out.cpu())
        labels.append(y.cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_monitor(encoder: nn.Module, bank: torch.utils.data.Dataset, queries: torch.utils.data.Dataset,
                accelerator: Accelerator, k: int, temperature: float, num_workers: int,
                input_fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                probe: nn.Module | None = None) -> tuple[float, float | None]:
    """Top-1 of a weighted kNN classifier on frozen features (monitoring, not eval), and the online
    probe's top-1 on the same held-out queries (None without a probe)."""
    fb, lb = extract_features(encoder, bank, accelerator, num_workers=num_workers, input_fn=input_fn)
    fq, lq = extract_features(encoder, queries, accelerator, num_workers=num_workers, input_fn=input_fn)
    num_classes = int(max(lb.max(), lq.max())) + 1
    pred = knn_predict(fb, lb, fq, k, temperature, num_classes)
    return (pred == lq).float().mean().item(), probe_accuracy(probe, fq, lq) if probe is not None else None


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
