"""End-to-end runs of the entry point: one process, two processes, TensorBoard contents, export round trip."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import ALL_CORES, REPO, TINY, free_port, pretrain_in_process, run_main
from infomax.config.pretrain import load_config
from infomax.export.encoder import export_encoder, load_encoder
from infomax.method.bounds import BOUNDS
from infomax.method.models import MultiViewModel, create_encoder
from infomax.runtime.checkpoint import checkpoint_dirs
from infomax.runtime.hardware import choose_precision

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pretrain_run")]  # one worker builds the module's run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """2 epochs of the tiny synthetic config with timm's standard stem (so timm itself can load the export).

    In fp32: with bf16 on a CPU with AMX (Intel Xeon, family 6 model 167) this toy, 16 px images through a
    224 px stem down to 1 x 1 maps at lr 0.1, diverges (gradient norm 28 -> inf at its third step); the
    tests here are about the run's records and its export, not about that toy's numerics."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_main(f"run.dir={run_dir}", "model.small_input=false", "run.precision=no",
                    env={"INFOMAX_PROGRESS_SECONDS": "0"})
    return run_dir, proc.stdout, proc.stderr


def test_run_prints_summary_and_writes_run_dir(tiny_run) -> None:
    run_dir, out, _ = tiny_run
    assert "infomax pretraining finished: step 16/16, epoch 2/2" in out
    # what trains, on what, for how long: said at start (without --config the defaults trained on synthetic images)
    assert ("pretraining test_resnet on synthetic (256 images, 8 classes), objective contrastive (infonce bound), "
            "global batch 32 (1 x 32), lr 0.1, 16 steps (8 an epoch)") in out
    assert "kNN top-1" in out and "MI bound" in out
    assert (run_dir / "config.yaml").read_text().startswith("# git revision:")
    assert load_config(None, []).__class__ is type(load_config(str(run_dir / "config.yaml")))  # resolved config reloads
    assert checkpoint_dirs(run_dir / "checkpoints")[0].name == "step_00000016"


def test_progress_off_a_terminal_is_plain_lines(tiny_run) -> None:
    """A log file gets one line per report (here every step), never tqdm's carriage-return frames."""
    _, _, err = tiny_run
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("pretrain: step ")]
    assert lines[0].startswith("pretrain: step 1/16 (6%), ") and "ETA" in lines[0]
    assert lines[-1].startswith("pretrain: step 16/16 (100%), ") and "loss=" in lines[-1]


def test_tensorboard_has_diagnostics_and_view_grid(tiny_run) -> None:
    run_dir, _, _ = tiny_run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for name in ["train/loss", "train/mi", "train/log_k", "train/pos", "train/neg", "train/top1", "train/lr",
                 "train/grad_norm", "perf/images_per_s", "perf/data_wait_frac", "monitor/knn_top1",
                 "monitor/online_probe_top1", "train/online_probe_loss"]:
        assert name in tags["scalars"], name
    assert "views/first_batch" in tags["images"]
    log_k = events.Scalars("train/log_k")[-1].value
    assert abs(log_k - torch.log(torch.tensor(32.0)).item()) < 1e-5  # K = batch of 32 on one process
    assert all(s.value <= log_k + 1e-5 for s in events.Scalars("train/mi"))  # InfoNCE never exceeds log K
    # the summary's bound, averaged over the logged steps (one batch's value is noisy), beside the last one
    summary = json.loads((run_dir / "export" / "config.json").read_text())["summary"]
    logged = [s.value for s in events.Scalars("train/mi")]
    assert summary["mi_logged_steps"] == len(logged) == 8
    assert summary["mi_estimate_nats_mean_logged"] == pytest.approx(sum(logged) / len(logged), rel=1e-5)
    lrs = [s.value for s in events.Scalars("train/lr")]
    assert max(lrs) == pytest.approx(0.1) and lrs[0] < max(lrs)  # the warmup reaches optim.lr, then the cosine
    assert any("config" in t for t in tags["tensors"])  # the resolved config as text
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["precision"].string_value == "no"  # the fixture's fp32


def test_run_prints_its_precision_and_why(tiny_run) -> None:
    _, out, _ = tiny_run
    assert choose_precision("no").line() + "\n" in out  # the fixture's explicit choice, and why


def trained_encoder(run_dir: Path) -> torch.nn.Module:
    cfg = load_config(str(run_dir / "config.yaml"))
    model = MultiViewModel(cfg.model, in_chans=3, num_views=2)
    state = torch.load(checkpoint_dirs(run_dir / "checkpoints")[0] / "state.pt", weights_only=True)["model"]
    model.load_state_dict(state)
    return model.encoders[0].eval()


def test_export_loads_in_timm_and_load_encoder_with_identical_features(tiny_run) -> None:
    run_dir, _, _ = tiny_run
    meta = json.loads((run_dir / "export" / "config.json").read_text())
    assert meta["architecture"] == "test_resnet" and meta["in_chans"] == 3 and meta["input_size"] == [3, 16, 16]
    assert meta["num_features"] == 96 and len(meta["sha256"]) == 64 and meta["summary"]["steps"] == 16
    assert meta["summary"]["precision"] == "no"  # the fixture's fp32, recorded (auto's: test_hardware.py)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = trained_encoder(run_dir)(x)
        timm_model = timm.create_model(
            "test_resnet", pretrained=True, num_classes=0,
            pretrained_cfg_overlay=dict(file=str(run_dir / "export" / "encoder.safetensors")),
        ).eval()
        loaded, _ = load_encoder(run_dir / "export")
        assert torch.equal(timm_model(x), expected)
        assert torch.equal(loaded(x), expected)


def test_load_encoder_rebuilds_small_input_stem_and_checks_hash(tmp_path: Path) -> None:
    encoder = create_encoder("resnet18", 1, small_input=True).eval()
    export_encoder(encoder, tmp_path, arch="resnet18", in_chans=1, input_size=28, mean=[0.5], std=[0.5],
                   small_input=True, summary={})
    loaded, meta = load_encoder(tmp_path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))
    assert loaded.conv1.kernel_size == (3, 3) and meta["small_input"] is True
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(Exception, match="does not match the sha256"):
        load_encoder(tmp_path)


def test_two_process_accelerate_launch_on_cpu(run_dir: Path) -> None:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_main(f"run.dir={run_dir}", "run.max_steps=4", launcher=launcher, timeout=300)
    assert proc.stdout.count("infomax pretraining finished") == 1  # rank 0 prints, rank 1 does not
    assert "on 2 process(es)" in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "data.json", "export",
                                                          "infomax-run.json", "tb"]
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1  # one set of logs
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    log_k = events.Scalars("train/log_k")[-1].value
    assert abs(log_k - torch.log(torch.tensor(64.0)).item()) < 1e-5  # keys gathered from both ranks: K = 2 x 32
    assert (run_dir / "export" / "encoder.safetensors").is_file()


@pytest.mark.parametrize("bound", [name for name in BOUNDS if name != "infonce"])  # the registry's
def test_every_bound_pretrains_and_logs_its_mi_estimate(bound: str, run_dir: Path, capsys) -> None:
    proc = pretrain_in_process(capsys, f"run.dir={run_dir}", f"objective.bound={bound}", "run.max_steps=4",
                               "monitor.knn_every=0", "run.export=false")
    # only InfoNCE's value has the ceiling log K; these are printed without one, and DV's family said to read high
    reading = BOUNDS[bound].minibatch
    assert f"nats ({bound}: no ceiling; {reading}" in proc.stdout and "ceiling log K" not in proc.stdout
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert len(events.Scalars("train/mi")) == 2 and len(events.Scalars("train/log_k")) == 2
    state = torch.load(checkpoint_dirs(run_dir / "checkpoints")[0] / "state.pt", weights_only=True)
    if bound == "mine":
        assert torch.isfinite(state["objective"]["bound.per_pair.0.log_ema"])  # the EMA is checkpointed


def test_learned_critic_trains_across_two_processes(run_dir: Path) -> None:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_main(f"run.dir={run_dir}", "run.max_steps=3", "objective.critic=bilinear", "monitor.knn_every=0",
             launcher=launcher, timeout=300)
    state = torch.load(checkpoint_dirs(run_dir / "checkpoints")[0] / "state.pt", weights_only=True)
    weight = state["objective"]["critic.weight"]
    assert not torch.equal(weight, torch.eye(weight.shape[0]))  # the critic was optimised


def test_demo_recipe_runs_on_colour_images(run_dir: Path, capsys) -> None:
    """configs/fmnist_cpu.yaml on 3-channel images: the batch path draws the default saturation, hue and
    grayscale too (they have no effect on grey images), so a recipe never has to change with the data."""
    proc = pretrain_in_process(capsys, f"run.dir={run_dir}", "data.dataset=synthetic", "data.synthetic_size=256",
                               "run.max_steps=2", "monitor.knn_every=0", "monitor.expect_eval=''",
                               config=REPO / "configs" / "fmnist_cpu.yaml")
    assert "infomax pretraining finished: step 2/" in proc.stdout
    assert json.loads((run_dir / "export" / "config.json").read_text())["in_chans"] == 3


def test_demo_recipe_learns_on_real_fashion_mnist(run_dir: Path) -> None:
    """The demo's own config (its augmentations, encoder, optimizer and precision) on 3840 real Fashion-MNIST
    images for 60 steps: the kNN monitor must rise well above its untrained floor (69.3 -> 77.5 when
    written; solarizing every image of both views instead reached only 73.3)."""
    proc = run_main(f"run.dir={run_dir}", "data.limit=3840", "optim.epochs=2", "monitor.knn_bank=2000",
                    "monitor.knn_queries=1000", "monitor.online_probe=false", config=REPO / "configs" / "fmnist_cpu.yaml",
                    env={"INFOMAX_PROGRESS_SECONDS": "0", **ALL_CORES})
    assert re.search(r"expected: pretraining ends in about [\d a-z]+ \(39 steps at [\d.]+ s, 2 kNN passes of \d+ s\) on .*"
                     r"native bf16: (yes|no)", proc.stdout), proc.stdout[:2000]  # after 1 + 20 of 60 steps
    # ... and, as the demo's config names its eval, the whole demo: 60000 + 10000 images for ours and random init;
    # the row planner finds the supervised encoder of 2 epochs of this architecture stored (baselines/)
    assert re.search(r"; the eval \(configs/probe_fmnist.yaml\) then takes up to [\d a-z]+ \(3 rows: 2 x 70000 images to "
                     r"extract at [\d.]+ ms, 3 probes of up to 7 fits and kNN votes; stored baselines\), so "
                     r"the whole run ends within about", proc.stdout)
    knn = [float(m) for m in re.findall(r"epoch \d \(step \d+\): kNN top-1 ([\d.]+)%", proc.stdout)]
    assert len(knn) == 3, proc.stdout[-2000:]
    assert knn[-1] > knn[0] + 6, knn  # percentage points over the untrained floor


def test_two_machines_of_one_process_each_train_as_two_processes_on_one(tmp_path: Path) -> None:
    """`accelerate launch --num_machines 2 --machine_rank {0,1}` (one process each, here on one
    host, the run dir shared as on a cluster) gives the losses and weights of 2 processes on one machine."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    common = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    settings = ["run.max_steps=4", "run.log_every=1", "monitor.knn_every=0", "run.deterministic=true",
                "run.export=false"]
    run_main(f"run.dir={tmp_path / 'one'}", *settings, launcher=[accelerate, "launch", *common, "--num_machines", "1"])
    port = free_port()
    machines = [subprocess.Popen(
        [accelerate, "launch", *common, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
         "127.0.0.1", "--main_process_port", str(port), str(REPO / "pretrain" / "main.py"), "--config", str(TINY),
         f"run.dir={tmp_path / 'two'}", *settings], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "on 2 process(es)" in outputs[0]

    def trained(run: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
        losses = [e.value for e in EventAccumulator(str(run / "tb")).Reload().Scalars("train/loss")]
        return losses, torch.load(checkpoint_dirs(run / "checkpoints")[0] / "state.pt", weights_only=True)["model"]

    (one_losses, one_model), (two_losses, two_model) = trained(tmp_path / "one"), trained(tmp_path / "two")
    assert len(one_losses) == 4 and one_losses == two_losses
    assert one_model.keys() == two_model.keys() and all(torch.equal(one_model[k], two_model[k]) for k in one_model)
