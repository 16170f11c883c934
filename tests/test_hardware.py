"""The machine decides: run.precision=auto (an explicit choice wins; the choice is printed and recorded), and the
expected duration a run prints after its first steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_main
from infomax.config.pretrain import ConfigError
from infomax.runtime import hardware
from infomax.runtime.hardware import choose_precision

# What an AVX2-only CPU (no AVX-512, no native bf16) looks like to PyTorch and oneDNN on any x86 machine.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


@pytest.mark.parametrize("native, mode", [(True, "bf16"), (False, "no")])
def test_auto_on_a_cpu_takes_bf16_only_where_it_is_native(cpu_only, native: bool, mode: str) -> None:
    cpu_only.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    chosen = choose_precision("auto")
    assert chosen.mode == mode and not chosen.warning
    assert chosen.line() == ("precision: bf16 (auto: this CPU has native bf16)" if native else
                             "precision: no (auto: this CPU has no native bf16; bf16 would run several times slower)")


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_with_a_warning(cpu_only) -> None:
    cpu_only.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    chosen = choose_precision("bf16")
    assert chosen.mode == "bf16" and chosen.reason == "run.precision=bf16"
    assert chosen.warning.startswith("warning: bf16 on a CPU without native bf16") and "\n" not in chosen.warning


def test_a_launchers_low_precision_is_taken_and_its_default_no_leaves_it_to_the_hardware(cpu_only) -> None:
    cpu_only.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert choose_precision("auto", launch="bf16").reason == "accelerate launch --mixed_precision bf16"
    # `no` is also accelerate launch's default, which it prints among its defaults: the line says why it is not taken
    assert choose_precision("auto", launch="no").line() == (
        "precision: bf16 (auto: this CPU has native bf16; accelerate launch's 'no' leaves it to run.precision=auto)")
    assert choose_precision("no", launch="bf16").mode == "no"  # the config's explicit choice wins


def test_fp16_without_a_gpu_is_refused_naming_who_asked_for_it(cpu_only) -> None:
    """The config key (the pretraining's or the eval's own), or the launcher's flag: a user who typed
    `accelerate launch --mixed_precision fp16` never set run.precision, which the line used to name."""
    with pytest.raises(ConfigError, match="'run.precision': fp16 needs a CUDA GPU; use auto, bf16 or no on CPU"):
        choose_precision("fp16")
    with pytest.raises(ConfigError, match="config key 'precision': fp16 needs a CUDA GPU"):
        choose_precision("fp16", key="precision")
    with pytest.raises(ConfigError, match=r"^accelerate launch --mixed_precision fp16 needs a CUDA GPU; launch with "
                                          r"--mixed_precision no on a CPU \(run.precision=auto then picks"):
        choose_precision("auto", "fp16")


def test_the_evals_data_errors_name_its_own_keys(tmp_path) -> None:
    from infomax.config.eval import EvalConfig
    from infomax.data.datasets import DataError
    from infomax.eval.main import open_splits

    with pytest.raises(DataError, match="set root=/dir/with/idx/files") as caught:
        open_splits(EvalConfig(dataset="fashion_mnist", root=str(tmp_path), weights=["x"]))
    assert "data.root" not in str(caught.value)
    with pytest.raises(DataError, match="bad value for config key 'holdout': 5000 held-out images leave none"):
        open_splits(EvalConfig(dataset="synthetic", synthetic_size=96, holdout=5000, weights=["x"]))
    with pytest.raises(ConfigError, match="bad value for config key 'test_beton': '/no/test.beton' is not a file"):
        open_splits(EvalConfig(dataset="synthetic", test_beton="/no/test.beton", weights=["x"]))


@pytest.mark.parametrize("bf16_card, mode", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_takes_bf16_where_the_card_has_it_else_fp16(monkeypatch, bf16_card: bool, mode: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_card)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100" if not bf16_card else "H100")
    chosen = choose_precision("auto")
    assert chosen.mode == mode and ("gradient scaler" in chosen.reason) == (mode == "fp16")


def test_avx2_emulation_reads_as_no_native_bf16() -> None:
    """The variables benchmarks/README.md uses to emulate an AVX2-only CPU mask native bf16 from our check
    (torch.cpu._is_avx512_bf16_supported() alone still reads the hardware)."""
    code = "from infomax.runtime.hardware import cpu_has_native_bf16, describe_cpu; print(cpu_has_native_bf16(), describe_cpu())"
    for env in (AVX2_ONLY, {"ONEDNN_MAX_CPU_ISA": "AVX2"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                             env={**os.environ, **env}).stdout
        assert out.startswith("False ") and "native bf16: no" in out, (env, out)


@pytest.mark.slow
def test_pretraining_on_an_avx2_only_cpu_chooses_fp32_and_records_it(run_dir: Path) -> None:
    proc = run_main(f"run.dir={run_dir}", "run.max_steps=2", "monitor.knn_every=0", env=AVX2_ONLY)
    assert "precision: no (auto: this CPU has no native bf16; bf16 would run several times slower)" in proc.stdout
    summary = json.loads((run_dir / "export" / "config.json").read_text())["summary"]
    assert summary["precision"] == "no" and "no native bf16" in summary["precision_reason"]
    assert ", AVX2, native bf16: no, " in summary["machine"]


@pytest.mark.slow
def test_explicit_bf16_on_an_avx2_only_cpu_warns_and_still_runs(run_dir: Path) -> None:
    proc = run_main(f"run.dir={run_dir}", "run.max_steps=1", "monitor.knn_every=0", "run.precision=bf16",
                    "run.export=false", env=AVX2_ONLY)
    assert "precision: bf16 (run.precision=bf16)" in proc.stdout
    assert "warning: bf16 on a CPU without native bf16 (AVX2) runs several times slower" in proc.stdout


@pytest.mark.parametrize("every, batches, total, epoch, passes", [
    (1, 468, 936, 0, 2),  # the demo: after epochs 1 and 2, the last of which is the final state
    (2, 8, 24, 0, 2),  # after epoch 2, then once more at the end of epoch 3
    (1, 10, 15, 0, 2),  # optim.epochs=1.5: after epoch 1 and at the last step
    (1, 10, 30, 2, 1),  # resumed inside the last epoch
    (0, 10, 30, 0, 0),  # monitor off
])
def test_the_expected_duration_counts_the_knn_passes_still_ahead(every, batches, total, epoch, passes) -> None:
    from types import SimpleNamespace

    from infomax.train.loop import Run

    run = SimpleNamespace(cfg=SimpleNamespace(monitor=SimpleNamespace(knn_every=every)), data=range(batches),
                          total_steps=total, progress=SimpleNamespace(epoch=epoch))
    assert Run.knn_passes_ahead(run) == passes


def test_deterministic_runs_are_refused_on_cuda_in_one_line_and_allowed_on_cpu() -> None:
    """The CUDA half of this is run for real by tests/test_gpu.py::test_deterministic_run_on_cuda_stops_in_one_line."""
    hardware.check_deterministic_supported("cpu")
    with pytest.raises(ConfigError, match="'run.deterministic': true is supported on CPU only"):
        hardware.check_deterministic_supported("cuda")


@pytest.mark.parametrize("environ, sign", [
    ({}, ""), ({"CUDA_VISIBLE_DEVICES": ""}, ""), ({"CUDA_VISIBLE_DEVICES": "-1"}, ""),
    ({"SLURM_GPUS_ON_NODE": "0"}, ""), ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
])
def test_the_signs_that_a_job_was_given_gpus(environ: dict, sign: str) -> None:
    assert hardware.gpus_given(environ) == sign


def test_a_job_given_gpus_that_torch_cannot_see_is_refused_in_one_line(cpu_only, pretrain, run_dir: Path,
                                                                        monkeypatch) -> None:
    """SLURM gave the job GPUs, but this torch sees none (a driver too old for the wheel, a container without
    GPUs): the ranks would silently train on CPUs over gloo. Refused before the run dir is claimed."""
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    proc = pretrain(f"run.dir={run_dir}", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "given GPUs (SLURM_GPUS_ON_NODE=2) but torch sees none" in errors[0] and "driver" in errors[0]
    assert not run_dir.exists()


def test_a_process_bound_to_fewer_cores_than_its_workers_need_is_warned(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    line = hardware.few_cores_warning(num_workers=4)
    assert "1 core(s), fewer than its 4 loader worker(s) + 1" in line and "--cpus-per-task" in line
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(5)))
    assert hardware.few_cores_warning(num_workers=4) == ""


def test_torch_runs_no_more_threads_than_the_cores_it_is_bound_to(monkeypatch) -> None:
    """An OMP_NUM_THREADS exported for a whole node reaches a SLURM task bound to fewer cores: the threads beyond
    them would spin against each other (a small run 7x as long with 2 threads on one core)."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert hardware.fit_threads_to_cores() == "" and torch.get_num_threads() == 2
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        line = hardware.fit_threads_to_cores()
        assert torch.get_num_threads() == 1
        assert line == ("note: torch would run 2 threads (OMP_NUM_THREADS=2) on the 1 core(s) this process is bound "
                        "to; it runs 1, as threads beyond the cores spin against each other")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("files, limit", [
    ({"memory.max": "max\n"}, None),
    ({"job_7/memory.max": "8589934592\n", "memory.max": "max\n"}, 8 * 2**30),  # v2, the job's own cgroup
    ({"memory/job_7/memory.limit_in_bytes": "4294967296\n"}, 4 * 2**30),  # v1
    ({"memory/memory.limit_in_bytes": str(2**63 - 4096)}, None),  # v1's "no limit"
    ({}, None),
])
def test_the_memory_limit_is_read_from_this_process_cgroup(tmp_path: Path, files: dict, limit: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job_7\n" if "job_7/memory.max" in files else "4:memory:/job_7\n")
    assert hardware.memory_limit(tmp_path, proc) == limit


def test_a_beton_larger_than_the_memory_limit_is_warned_when_read_through_the_page_cache() -> None:
    line = hardware.beton_memory_warning(150 * 2**30, 64 * 2**30, os_cache=True)
    assert "150.0 GiB" in line and "64.0 GiB" in line and "--mem" in line
    assert hardware.beton_memory_warning(150 * 2**30, 64 * 2**30, os_cache=False) == ""
    assert hardware.beton_memory_warning(10 * 2**30, 64 * 2**30, os_cache=True) == ""
    assert hardware.beton_memory_warning(10 * 2**30, None, os_cache=True) == ""


def test_a_gpu_run_says_what_its_loader_can_feed() -> None:
    """FFCV's ceiling from its threads (655 images a thread-second with one decode an image: 6,550 with 10; 422
    with a decode per view); an ImageNet-scale folder read per image is pointed at the .beton; nothing on CPUs."""
    line = hardware.loader_line("ffcv", 10, [224, 224], 1_281_167, "cuda")
    assert "10 threads, one decode an image" in line and "6,550 images/s" in line
    line = hardware.loader_line("ffcv", 10, [224, 96, 96], 1_281_167, "cuda")
    assert "3 decodes an image" in line and "2,813 images/s" in line
    line = hardware.loader_line("torchvision", 10, [224, 224], 1_281_167, "cuda")
    assert "1,281,167 images" in line and "data.format=ffcv" in line and "python -m infomax.data.beton" in line
    assert hardware.loader_line("torchvision", 10, [224, 224], 60_000, "cuda") == ""
    assert hardware.loader_line("ffcv", 10, [224, 224], 1_281_167, "cpu") == ""
