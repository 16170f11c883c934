"""The GPU's rules on a CPU: a rehearsal that refuses what NCCL and CUDA refuse (for tests and benchmarks).

Our multi-rank tests run real numerics on gloo, which accepts collectives on host tensors, and CPU tensors
never wait on a copy. Here torch's fake process group (world size W, one process, no data moved) runs under
``FakeTensorMode``, so tensors made on ``cuda`` are fake device tensors on a CPU-only build, and one dispatch
mode (:class:`GpuRules`) watches every op:

- a collective (``c10d.*``) handed a host tensor is refused, as NCCL refuses it ("No backend type associated
  with device type cpu"); ours are also refused by ``infomax.runtime.distributed.require_device_tensors``, this
  catches the ones a library makes (Accelerate's gather);
- a read back to the host (``.item()``, ``bool()``, ``.tolist()``: ``_local_scalar_dense``; ``.cpu()``) is
  counted, and answered with 0 (True for a boolean check), since a fake tensor holds no values; so is a
  data-dependent shape (``nonzero``);
- an op on real host tensors runs for real (the host's draws decide shapes: which images a colour step
  takes), so only what reaches the device is fake;
- a blocking host-to-device copy (``.to(cuda)`` / ``copy_`` from a CPU tensor without ``non_blocking``,
  ``torch.tensor(..., device=cuda)``) is counted: on CUDA each one waits for the stream.

What it cannot run: the autograd engine asks the CUDA runtime for a context when it meets a ``cuda`` tensor,
so a backward pass over fake ``cuda`` tensors fails on a CPU-only build. The rehearsed steps run forward,
objective, the step's agreement and the after-step updates; gradients' collectives are checked on gloo.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

CUDA = torch.device("cuda", 0)


class HostTensorToNccl(RuntimeError):
    """A collective got a host tensor where NCCL takes device tensors only."""


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _on_the_host(args: tuple, kwargs: dict) -> bool:
    """Whether an op only touches real host tensors and makes none on the device (it then runs for real)."""
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return False
    return not any(isinstance(t, FakeTensor) for t in _tensors((args, tuple(kwargs.values()))))


class GpuRules(TorchDispatchMode):
    """Counts host reads and blocking host-to-device copies; refuses collectives on host tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.host_reads: Counter[str] = Counter()
        self.blocking_copies: list[tuple[int, ...]] = []
        self.collectives: Counter[str] = Counter()

    def reset(self) -> None:
        self.host_reads.clear()
        self.blocking_copies.clear()
        self.collectives.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace != "c10d" and _on_the_host(args, kwargs):
            with _disable_current_modes():  # host data is real: a step's draws decide its shapes
                return func(*args, **kwargs)
        if func.namespace == "c10d" and name != "barrier":  # a barrier's tensor is torch's, on NCCL's device
            host = [tuple(t.shape) for t in _tensors(args) if t.device.type == "cpu"]
            if host:
                raise HostTensorToNccl(f"c10d.{name} was given host tensor(s) {host}: NCCL refuses them "
                                       "(No backend type associated with device type cpu)")
            self.collectives[name] += 1
        elif name in ("_local_scalar_dense", "is_nonzero") and isinstance(args[0], FakeTensor):
            if args[0].device.type == "cuda":  # a fake host tensor was read back already, by its copy
                self.host_reads[name] += 1
            # A fake tensor holds no value. A check reads True (it passes); a number reads 0 (no stop
            # requested, a finite loss).
            return True if args[0].dtype == torch.bool else 0
        elif name == "index" and args[0].device.type == "cuda" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.host_reads["boolean_index"] += 1  # the mask's count is read back; answered as if all set
            every = [torch.arange(i.numel(), device=i.device) if isinstance(i, torch.Tensor) and i.dtype == torch.bool
                     else i for i in args[1]]
            return func(args[0], every)
        elif name in ("nonzero", "masked_select") and args[0].device.type == "cuda":
            self.host_reads[name] += 1  # its length is read back; answered as if every entry were set
            if name == "nonzero":
                return torch.zeros(args[0].numel(), args[0].dim(), dtype=torch.long, device=args[0].device)
        elif name == "_to_copy" and kwargs.get("device") is not None:
            source, target = args[0].device.type, torch.device(kwargs["device"]).type
            if source == "cpu" and target == "cuda" and not kwargs.get("non_blocking", False):
                self.blocking_copies.append(tuple(args[0].shape))
            elif source == "cuda" and target == "cpu":
                self.host_reads["to_host"] += 1
        elif name == "copy_" and args[0].device.type == "cuda" and args[1].device.type == "cpu" \
                and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
            self.blocking_copies.append(tuple(args[1].shape))
        return func(*args, **kwargs)


_META_LIBRARY: list[torch.library.Library] = []


def _sync_batchnorm_shapes() -> None:
    """Shape-only kernels for the three CUDA ops of torch's SyncBatchNorm, which have none, so that fake
    tensors can run it (once per process)."""
    if _META_LIBRARY:
        return
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("batch_norm_stats", lambda x, eps: (x.new_empty(x.shape[1], dtype=torch.float32),
                                                 x.new_empty(x.shape[1], dtype=torch.float32)), "Meta")
    lib.impl("batch_norm_gather_stats_with_counts",
             lambda x, mean, invstd, rm, rv, momentum, eps, counts: (mean.new_empty(mean.shape[-1]),
                                                                     mean.new_empty(mean.shape[-1])), "Meta")
    lib.impl("batch_norm_elemt", lambda x, w, b, mean, invstd, eps: torch.empty_like(x), "Meta")
    _META_LIBRARY.append(lib)


class _ObjectsAsIfAgreed:
    """torch's object collectives on the fake group, which moves no bytes: each object is pickled, as NCCL
    would send it (on the device, which torch chooses itself), and every rank is answered with this rank's
    object, as if all ranks agreed. Counted in ``rules.collectives``."""

    def __init__(self, rules: GpuRules) -> None:
        self.rules = rules

    def all_gather_object(self, object_list: list, obj: object, group=None) -> None:
        pickle.dumps(obj)
        self.rules.collectives["all_gather_object"] += 1
        object_list[:] = [copy.deepcopy(obj) for _ in object_list]

    def broadcast_object_list(self, object_list: list, src: int = 0, group=None, device=None, group_src=None) -> None:
        pickle.dumps(object_list)
        self.rules.collectives["broadcast_object_list"] += 1


@contextmanager
def fake_nccl(world_size: int = 2, rank: int = 0) -> Iterator[GpuRules]:
    """A fake process group of ``world_size`` ranks (this process is ``rank``) under fake ``cuda`` tensors.

    Build models inside it under ``torch.device(CUDA)`` (``Module.to('cuda')`` cannot swap in fake
    parameters). Yields the :class:`GpuRules` that watched the block."""
    if dist.is_initialized():
        raise RuntimeError("fake_nccl needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    patched = {name: getattr(dist, name) for name in ("all_gather_object", "broadcast_object_list")}
    try:
        with fake_cuda() as rules:
            objects = _ObjectsAsIfAgreed(rules)
            for name in patched:
                setattr(dist, name, getattr(objects, name))
            yield rules
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)
        dist.destroy_process_group()


@contextmanager
def fake_cuda() -> Iterator[GpuRules]:
    """Fake ``cuda`` tensors on one process, without a process group: host syncs counted as CUDA counts them."""
    from infomax.runtime.device import _constant

    _constant.cache_clear()  # device constants made here are fake: none may outlive the block
    _sync_batchnorm_shapes()
    load = torch.load

    def real_load(*args: Any, **kwargs: Any) -> Any:  # what a file holds is host data, with its values
        with _disable_current_modes():
            return load(*args, **kwargs)

    torch.load = real_load
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), GpuRules() as rules:
            yield rules
    finally:
        torch.load = load
        _constant.cache_clear()


@contextmanager
def fake_nccl_accelerator(world_size: int = 2, rank: int = 0) -> Iterator[tuple[Any, GpuRules]]:
    """:func:`fake_nccl` with an ``Accelerator`` whose device is ``cuda:0`` (Accelerate reads
    ``ACCELERATE_TORCH_DEVICE``), so code that places tensors on ``accelerator.device`` makes fake device
    tensors. Accelerate's one-per-process state is reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    environ = dict(os.environ)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="29400",
                      ACCELERATE_TORCH_DEVICE=str(CUDA))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with fake_nccl(world_size, rank) as rules:
            accelerator = Accelerator(cpu=True)
            rules.reset()
            yield accelerator, rules
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        os.environ.clear()
        os.environ.update(environ)
