"""What this machine supports, and the mixed precision it should train and evaluate in.

``run.precision=auto`` (the default) asks :func:`choose_precision`: on CUDA, bf16 where the card has
it, otherwise fp16 with Accelerate's gradient scaler; on a CPU, bf16 only where the CPU computes it
natively (AVX-512 BF16 or AMX), otherwise fp32, since emulated bf16 runs several times slower than
fp32 (benchmarks/results/cpu_speed.md). The same rule serves
``accelerate launch``, plain ``python``, SLURM jobs (which start without a launcher) and the eval stage.

We own this small rule on purpose: Accelerate takes one precision as given and has no hardware default.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from infomax.config.pretrain import ConfigError

# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: under them oneDNN emulates bf16.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class Precision:
    """The precision a run uses: ``mode`` is Accelerate's mixed_precision (no | bf16 | fp16)."""

    mode: str
    reason: str  # why, in a few words
    warning: str = ""  # one line when the choice will be slow or unusual

    def line(self) -> str:
        return f"precision: {self.mode} ({self.reason})"


def cpu_model() -> str:
    """The CPU's marketing name with its family/model numbers (AMD EPYC names one name for several generations)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    known = "cpu family" in info and "model" in info
    family = f" (family {info['cpu family']}, model {info['model']})" if known else ""
    return info.get("model name", platform.machine()) + family


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX in hardware, and not masked by ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA
    (the variables that emulate an older CPU: see benchmarks/results/cpu_speed.md)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def describe_cpu() -> str:
    """One line naming the CPU a figure was measured on: model, the ISA PyTorch dispatches to, native bf16.

    e.g. ``AMD EPYC (family 25, model 17), AVX512, native bf16: yes, 2 cores``."""
    return (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, native bf16: "
            f"{'yes' if cpu_has_native_bf16() else 'no'}, {os.cpu_count()} cores")


def describe_machine() -> str:
    """:func:`describe_cpu`, preceded by the GPUs when there are: the machine a run's times were measured on."""
    if not torch.cuda.is_available():
        return describe_cpu()
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, host {describe_cpu()}"


def choose_precision(requested: str, launch: str | None = None, key: str = "run.precision") -> Precision:
    """The precision for ``run.precision`` (or the eval's ``precision``) on this machine.

    ``requested``: auto | no | bf16 | fp16. ``launch``: what ``accelerate launch --mixed_precision``
    exported (ACCELERATE_MIXED_PRECISION), None without a launcher. Under ``auto`` a launcher's bf16 or
    fp16 is taken as given; its ``no`` is also its default when the flag is absent, so it cannot be told
    from "not set" and the hardware decides (``run.precision=no`` forces fp32). An explicit choice wins.
    ``key``: the config key that asked (the eval's is ``precision``). Raises ConfigError for fp16 without a GPU,
    naming whoever asked: the key, or the launcher's flag."""
    cuda = torch.cuda.is_available()
    if requested != "auto":
        mode, reason = requested, f"{key}={requested}"
    elif launch in ("bf16", "fp16"):
        mode, reason = launch, f"accelerate launch --mixed_precision {launch}"
    elif cuda and torch.cuda.is_bf16_supported():
        mode, reason = "bf16", f"auto: {torch.cuda.get_device_name()} supports bf16"
    elif cuda:
        mode, reason = "fp16", f"auto: {torch.cuda.get_device_name()} has no bf16; fp16 with a gradient scaler"
    elif cpu_has_native_bf16():
        mode, reason = "bf16", "auto: this CPU has native bf16"
    else:
        mode, reason = "no", "auto: this CPU has no native bf16; bf16 would run several times slower"
    if launch == "no" and requested == "auto" and mode != "no":  # its default too, listed among its defaults
        reason += f"; accelerate launch's 'no' leaves it to {key}=auto"
    if mode == "fp16" and not cuda and requested == "auto":  # the launcher asked: name its flag, not our key
        raise ConfigError(f"accelerate launch --mixed_precision fp16 needs a CUDA GPU; launch with --mixed_precision "
                          f"no on a CPU ({key}=auto then picks bf16 where the CPU has it, else fp32)")
    if mode == "fp16" and not cuda:
        raise ConfigError(f"bad value for config key '{key}': fp16 needs a CUDA GPU; use auto, bf16 or no on CPU")
    warning = ""
    if mode == "bf16" and not cuda and not cpu_has_native_bf16():
        warning = (f"warning: bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}) runs "
                   f"several times slower than fp32; {key}=auto picks fp32 here")
    return Precision(mode, reason, warning)


def check_deterministic_supported(device_type: str) -> None:
    """``run.deterministic=true`` is for CPU runs (bit-identical resume, tested there). On CUDA the
    encoder's AdaptiveAvgPool2d has no deterministic backward and cuBLAS would need
    CUBLAS_WORKSPACE_CONFIG set before it starts, so it is refused there in one line instead of
    raising at the first backward."""
    if device_type == "cuda":
        raise ConfigError("bad value for config key 'run.deterministic': true is supported on CPU only; on CUDA "
                          "AdaptiveAvgPool2d's backward has no deterministic kernel. Set run.deterministic=false "
                          "(CUDA runs then resume exactly in position and data order, not bit for bit)")


# Where a job learns that it was given GPUs: SLURM's own count, and the devices the scheduler or user exposed.
_NO_DEVICES = {"", "-1", "none", "NoDevFiles", "void"}


def gpus_given(environ: dict[str, str] | None = None) -> str:
    """The sign that this process was given GPUs ("SLURM_GPUS_ON_NODE=4"), or "" when there is none."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get("SLURM_GPUS_ON_NODE", "0").strip() not in ("", "0"):
        return f"SLURM_GPUS_ON_NODE={environ['SLURM_GPUS_ON_NODE']}"
    if environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in _NO_DEVICES:
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}"
    return ""


def require_the_gpus_given(environ: dict[str, str] | None = None) -> None:
    """Refuse in one line to start when the job was given GPUs that torch cannot see: the ranks would
    otherwise train on CPUs over gloo, silently, hundreds of times slower."""
    sign = gpus_given(environ)
    if not sign or torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        cause = f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA wheel"
    else:
        cause = (f"this torch is built for CUDA {torch.version.cuda}: the NVIDIA driver is missing or older than it "
                 "needs (nvidia-smi shows the driver's CUDA version), or the container was started without GPUs "
                 "(docker --gpus all, apptainer --nv)")
    raise ConfigError(f"this job was given GPUs ({sign}) but torch sees none: {cause}. To run on CPUs on purpose, "
                      "unset CUDA_VISIBLE_DEVICES and submit without --gpus-per-node")


def usable_cores() -> int:
    """The cores this process may run on: those it is bound to (srun, taskset, a container), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_threads_to_cores() -> str:
    """Lowers torch's intra-op threads to :func:`usable_cores` when it would run more, and says so in one line
    ("" when they fit).

    An OMP_NUM_THREADS exported for a whole node (a shell profile, an HPC module) reaches every SLURM task, since
    sbatch exports the submitting shell's environment, while srun binds each task to its --cpus-per-task cores;
    without it, Accelerate gives each of several CPU ranks the node's cores divided by the ranks on it, whatever
    they are bound to. OpenMP threads beyond the cores spin against each other (benchmarks/results/cpu_speed.md,
    "Threads beyond the cores"). FFCV's loader later sets torch's threads to its own workers (``data.num_workers``);
    :func:`few_cores_warning` says when those are more than the cores."""
    cores, threads = usable_cores(), torch.get_num_threads()
    if threads <= cores:
        return ""
    torch.set_num_threads(cores)
    asked = os.environ.get("OMP_NUM_THREADS")
    return (f"note: torch would run {threads} threads{f' (OMP_NUM_THREADS={asked})' if asked else ''} on the "
            f"{cores} core(s) this process is bound to; it runs {cores}, as threads beyond the cores spin against "
            "each other")


def few_cores_warning(num_workers: int) -> str:
    """One line when this process may run on fewer cores than its main loop and ``num_workers`` loader workers
    need (a scheduler that binds tasks to cores, e.g. srun without --cpus-per-task); "" otherwise."""
    cores = usable_cores()
    if cores >= num_workers + 1:
        return ""
    return (f"warning: this process may run on {cores} core(s), fewer than its {num_workers} loader worker(s) + 1 "
            "need: the loader will starve the step. Give each task more cores (srun/sbatch --cpus-per-task) or "
            "lower data.num_workers")


def memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup"),
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """This process's memory limit in bytes from its cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``,
    a SLURM job's or a container's), or None when there is none or it cannot be read."""
    own = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" or "memory" in controllers.split(","):
                own = path.lstrip("/")
                break
    except (OSError, ValueError):
        pass
    candidates = [cgroup_root / own / "memory.max", cgroup_root / "memory" / own / "memory.limit_in_bytes",
                  cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= 1 << 60 else value  # v1 writes "no limit" as a huge number
    return None


def beton_memory_warning(beton_bytes: int, limit: int | None, os_cache: bool) -> str:
    """One line when a .beton read through the page cache cannot stay in it: every epoch then reads the whole
    file again from its filesystem (a shared one, on a cluster)."""
    if not os_cache or limit is None or beton_bytes <= limit:
        return ""
    gib = 2 ** 30
    return (f"warning: the .beton is {beton_bytes / gib:.1f} GiB and this job may hold {limit / gib:.1f} GiB of "
            "memory: with data.os_cache=true every epoch reads the file again from disk. Ask for more memory "
            "(--mem), copy the .beton to node-local disk, or write a smaller one (--max-resolution 256)")


# Images a second that one FFCV thread turns into two 224 px views, from 500 x 375 sources (half stored as JPEG):
# with one decode an image (views of one side) and with a decode per view. Measured on a 2-core Intel Xeon
# (AVX512) by benchmarks/loader.py decode-once (benchmarks/results/gpu.md, "Expected on GPUs").
FFCV_TWO_VIEWS_PER_THREAD_S = {True: 655, False: 422}
IMAGENET_SCALE = 100_000  # images: where the per-image loader's cost decides a run's length


def loader_line(data_format: str, num_workers: int, view_sizes: list[int], images: int, device_type: str) -> str:
    """What a GPU run's loader can feed, said at start: FFCV's ceiling from its thread count, or on an
    ImageNet-scale image folder read per image, that the .beton path is several times faster. "" on CPUs."""
    if device_type != "cuda":
        return ""
    if data_format == "ffcv":
        once = len(set(view_sizes)) == 1
        # measured for two views; with a decode per view each further view costs as much again
        ceiling = FFCV_TWO_VIEWS_PER_THREAD_S[once] * max(1, num_workers) * (1 if once else 2 / len(view_sizes))
        decodes = "one decode an image" if once else f"{len(view_sizes)} decodes an image (views of several sides)"
        return (f"loader: FFCV, {num_workers} threads, {decodes}: up to about {ceiling:,.0f} images/s a process on "
                "a CPU like the one measured (benchmarks/results/gpu.md)")
    if images >= IMAGENET_SCALE:
        return (f"loader: {images:,} images decoded per image by torchvision, about 3x slower than FFCV at 224 px "
                "(benchmarks/results/loading.md): write a .beton once (python -m infomax.data.beton --dataset "
                "imagefolder --root DIR --out train.beton) and pass data.format=ffcv data.path=train.beton")
    return ""
