"""The only module that calls torch.distributed.

We deliberately own :func:`gather_with_grad` instead of using a library's: ``accelerator.gather``
carries no gradient, and ``torch.distributed.nn.all_gather`` returned wrong gradients in some
releases. We also own :class:`GlobalBatchNorm`, because torch's SyncBatchNorm runs on GPUs only.
Their exactness is pinned by tests/test_distributed.py (2 processes == 1 process).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from infomax.runtime.hardware import Precision, choose_precision, fit_threads_to_cores, require_the_gpus_given


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


# Backends whose collectives take device tensors only. NCCL refuses a host tensor ("No backend type associated
# with device type cpu"); torch's fake process group stands in for it in the CPU rehearsal of the GPU's rules
# (infomax/runtime/gpu_rehearsal.py) and accepts anything, so we refuse for it. Gloo takes host tensors.
DEVICE_ONLY_BACKENDS = frozenset({"nccl", "fake"})


class HostTensorInCollective(RuntimeError):
    """A collective was handed a host (CPU) tensor on a process group whose backend takes device tensors only."""


def require_device_tensors(*tensors: torch.Tensor) -> None:
    """Refuse a host tensor in a collective on a device-only backend (NCCL, or the fake group rehearsing it).

    Every collective of ours passes its tensors through here, so the CPU rehearsal keeps NCCL's rule; host data
    crosses ranks on purpose instead, through ``gather_object``/``broadcast_object_list`` (docs/DESIGN.md)."""
    if not is_distributed() or dist.get_backend() not in DEVICE_ONLY_BACKENDS:
        return
    host = [tuple(t.shape) for t in tensors if t.device.type == "cpu"]
    if host:
        raise HostTensorInCollective(
            f"a collective on the {dist.get_backend()} backend was given host tensor(s) of shape {host}: "
            "NCCL takes device tensors only. Keep the tensor on the accelerator (a bug in infomax: please report it)")


def own_rows(b: int, device: torch.device) -> torch.Tensor:
    """The indices of this rank's B rows in a gathered W*B tensor: rank*B + i, each query's positive key
    (lightly's ``eye_rank`` in index form)."""
    return torch.arange(b, device=device) + rank() * b


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        require_device_tensors(x)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # never all-reduce autograd's own buffer in place
        require_device_tensors(grad)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B x D per rank) into (W*B x D), rank r's rows at ``r*B : (r+1)*B``.

    Carries gradient to every rank's rows. Rank r's embeddings are keys in every rank's loss,
    so dL_total/dx_r = sum over ranks k of dL_k/dx_r: backward all-reduces (sums) the incoming
    gradient of the gathered tensor and returns this rank's slice. Each rank then holds the
    gradient of the *sum* of all ranks' losses with respect to its own inputs; DDP's gradient
    averaging divides by W, which yields exactly the gradient of the mean loss over the global
    W*B batch, i.e. what one process with the whole batch computes.

    Every rank must pass the same shape. With one process this is the identity.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B x D per rank) into (W*B x D) in rank order, *without* gradient.

    For tensors that carry none by design: a momentum model's keys (infomax.method.momentum).
    """
    if not is_distributed():
        return x
    require_device_tensors(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def wrap_learned_critic(objective: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """A critic with parameters in DDP, so its gradients are averaged, but without DDP's broadcast of rank 0's
    buffers before every forward. We own this one wrap because Accelerate sets ``broadcast_buffers`` for
    every model at once, and the encoder's BatchNorm statistics should still follow rank 0. The critic's
    buffers need no broadcast: each rank pushes the same gathered keys into the key queue and NNCLR's
    support set, and MINE's moving average follows the global batch (infomax.method.bounds.MINE). MoCo's
    65536 x 128 queue alone would be 32 MB sent every step for nothing."""
    objective = objective.to(accelerator.device)
    if accelerator.num_processes == 1:
        return objective
    device_ids = [accelerator.local_process_index] if accelerator.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(objective, device_ids=device_ids, broadcast_buffers=False)


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (used to agree on stop / non-finite flags). No gradient."""
    if is_distributed():
        require_device_tensors(t)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


# A step's agreement: values (floats, or 0-dim tensors on the device) -> their max over ranks, in one collective.
Agree = Callable[..., list[float]]


def agree_max(device: torch.device | str, *values: float | torch.Tensor) -> list[float]:
    """The max over ranks of each value, in one collective read back once, so every rank takes the same
    branch (a stop request, a non-finite loss, a clock). A value may be a 0-dim tensor on ``device`` (a step's
    non-finite flag): nothing is read back before the collective, whose result is the one host sync a
    decision needs (docs/DESIGN.md, invariant 8). Float64, so a clock in seconds keeps its precision."""
    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
    # A number is filled in on the device (torch.as_tensor would copy it from the host, a blocking copy on CUDA)
    flags = torch.stack([v.to(dtype).reshape(()) if isinstance(v, torch.Tensor)
                         else torch.full((), float(v), dtype=dtype, device=device) for v in values])
    return all_reduce_max_(flags).cpu().tolist()  # one copy back: the decision's one host sync


def on_main_raised_everywhere(work: Callable[[], None], is_main: bool) -> None:
    """``work`` on the main process only; what it raises, every rank raises. The run dir's checks and first writes
    are rank 0's: a refusal there used to leave the other ranks waiting at the next collective until the process
    group's timeout (under srun nothing stops them sooner). The exception crosses as a host object, on purpose
    (``broadcast_object_list``, docs/DESIGN.md); one that does not pickle crosses as its type's name and message."""
    import pickle

    failure: list[BaseException | None] = [None]
    if is_main:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - every kind must reach the other ranks, then it is raised again
            failure[0] = e
    if is_distributed():
        sent = failure[0]
        if sent is not None:
            try:
                pickle.dumps(sent)
            except Exception:  # noqa: BLE001
                sent = RuntimeError(f"rank 0: {type(sent).__name__}: {sent}")
        shared = [sent]
        dist.broadcast_object_list(shared, src=0)
        failure[0] = failure[0] if is_main else shared[0]
    if failure[0] is not None:
        raise failure[0]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks too (every rank's loss
    reads the sum), the same argument as :func:`gather_with_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        require_device_tensors(x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        require_device_tensors(grad)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks, exactly.

    We own it because torch's SyncBatchNorm refuses CPU tensors (gloo ranks); on CUDA, model.sync_bn
    uses torch's. One all-reduce (with gradient) adds up every rank's per-channel sums and counts into
    the global mean, a second one the squared deviations from it into the biased variance, and x is
    normalised with both: the forward and backward of one process holding the whole W*B batch. Running
    statistics use the unbiased global variance, as BatchNorm does. In eval mode, or with one process, it
    is plain BatchNorm.
    Inputs B x C (x L) or B x C x H x W.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # statistics never in bf16/fp16
        dims = [d for d in range(x.dim()) if d != 1]
        c, shape = x.shape[1], [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        sums = _AllReduceSumWithGrad.apply(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:c] / n
        # Two passes (the squared deviations from the global mean), not E[x^2] - E[x]^2, which loses
        # its digits or turns negative in fp32 when a channel's mean is large against its spread.
        var = _AllReduceSumWithGrad.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
        return y.to(dtype)


PLAIN_BATCHNORM = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def convert_global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm1d/2d/3d in ``module`` becomes a :class:`GlobalBatchNorm` with its parameters and buffers.

    Other BatchNorm subclasses (timm's BatchNormAct2d carries an activation inside) would lose what they
    add, so they are refused with the way out."""
    from infomax.config.pretrain import ConfigError

    if type(module) in PLAIN_BATCHNORM:
        like = module.weight if module.affine else module.running_mean
        where = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, **where)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        raise ConfigError(f"model.sync_bn on CPU processes replaces plain BatchNorm layers only, and this model has "
                          f"a {type(module).__name__}; set model.sync_bn=false or use a ResNet (e.g. resnet18)")
    for name, child in module.named_children():
        module.add_module(name, convert_global_batchnorm(child))
    return module


def sync_batchnorm(module: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """BatchNorm statistics over the global batch (``model.sync_bn``): on GPUs timm's
    ``convert_sync_batchnorm``, which turns timm's BatchNormAct2d into SyncBatchNormAct with its
    activation (torch's own conversion makes it a plain SyncBatchNorm and silently drops the ReLU of a
    resnetv2 or efficientnet); on CPU ranks, where torch's SyncBatchNorm does not run, GlobalBatchNorm."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(module) if device_type == "cuda" else convert_global_batchnorm(module)


def make_accelerator(seed: int, precision: str = "auto", timeout_min: float = 15,
                     precision_key: str = "run.precision") -> tuple[Any, Precision]:
    """The Accelerator for this process (GPUs when there are, gloo CPU processes otherwise) and the
    precision it runs in, chosen by :func:`infomax.runtime.hardware.choose_precision` and printed in one line.

    Without a GPU, Accelerate only builds a gloo process group for several processes when told
    ``cpu=True``; otherwise every rank would think it is alone (and the main process). ``seed``: the
    shuffling seed, the same on every rank (each rank reads its own shard of each global batch).
    ``precision``: auto | no | bf16 | fp16, as ``run.precision``. ``timeout_min``: how long a rank waits
    in a collective (``run.dist_timeout_min``). Refuses to start when the job was given GPUs torch cannot see
    (:func:`infomax.runtime.hardware.require_the_gpus_given`), and runs no more torch threads than the cores this
    process is bound to (:func:`infomax.runtime.hardware.fit_threads_to_cores`).
    """
    from datetime import timedelta

    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import InitProcessGroupKwargs

    require_the_gpus_given()
    chosen = choose_precision(precision, os.environ.get("ACCELERATE_MIXED_PRECISION"), precision_key)
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=multi_cpu, mixed_precision=chosen.mode,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_min))])
    if threads := fit_threads_to_cores():  # after Accelerate's own choice for CPU ranks; every rank: binding differs
        print(f"rank {accelerator.process_index}: {threads}", flush=True)
    accelerator.print(chosen.line(), flush=True)
    if chosen.warning:
        accelerator.print(chosen.warning, flush=True)
    return accelerator, chosen
