"""launch/submit.py against a real one-node SLURM (slurm-wlm + munge + slurmdbd/MariaDB), started
by the `slurm_cluster` fixture: completion, two ranks, preemption + requeue, eval chain, sweep,
cancel + resume, dry run and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROCESS_GROUP_ENV, REPO, TINY, in_process

# One worker runs them all: the cluster is one per session, on fixed ports (tests/slurm/start.sh).
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def submit(*args: str, check: bool = True, env: dict[str, str] | None = None
           ) -> tuple[subprocess.CompletedProcess, list[str]]:
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--config", str(TINY), "--time", "20", *args]
    # A progress line per step in the job's .err log (off a terminal, every INFOMAX_PROGRESS_SECONDS)
    env = {**os.environ, "INFOMAX_PROGRESS_SECONDS": "0", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, re.findall(r"^submitted (\S+):", proc.stdout, flags=re.M)


def sacct(job: str, *extra: str) -> list[str]:
    out = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State,Start,End", *extra],
                         capture_output=True, text=True, timeout=30)
    return [line for line in out.stdout.splitlines() if line]


def wait_done(job: str, timeout: float = 240) -> str:
    """The job's final state (sacct), once it has one."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = {line.split("|")[0]: line.split("|")[1] for line in sacct(job)}
        if states.get(job, "").startswith(TERMINAL):
            return states[job].split()[0]
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish in {timeout}s: {sacct(job)}")


def wait_for_step(run_dir: Path, job: str, step: int, timeout: float = 180) -> None:
    """Until the job's rank-0 progress lines have passed ``step`` (written to the .err log)."""
    log = run_dir / "slurm" / job / f"{job}_0_log.err"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.is_file() and re.search(rf"^pretrain: step {step}/\d+", log.read_text(errors="replace"), flags=re.M):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} never reached step {step}: "
                         f"{log.read_text(errors='replace')[-2000:] if log.is_file() else 'no log'}")


def log_of(run_dir: Path, job: str, rank: int = 0) -> str:
    return (run_dir / "slurm" / job / f"{job}_{rank}_log.out").read_text(errors="replace")


def test_tiny_run_completes_and_leaves_an_export(slurm_cluster: Path, tmp_path: Path) -> None:
    """Submitted from a shell a torchrun and an salloc left their variables in: the job must not take them (a
    one-task job waited out the timeout for WORLD_SIZE=4 ranks), while sbatch still finds the cluster (SLURM_CONF)."""
    run = tmp_path / "run"
    stale = {"WORLD_SIZE": "4", "RANK": "0", "MASTER_PORT": "1", "SLURM_JOB_ID": "99999", "SLURM_NTASKS": "4",
             "SLURM_PROCID": "3"}
    proc, (job,) = submit(f"run.dir={run}", "run.max_steps=4", "run.dist_timeout_min=1", env=stale)
    assert f"run dir {run}" in proc.stdout and "sacct -j" in proc.stdout
    # the log that moves: progress lines go to stderr (it followed the .out, quiet for the whole run)
    assert f"tail -f {run}/slurm/{job}/{job}_0_log.err" in proc.stdout, proc.stdout
    assert wait_done(job) == "COMPLETED", log_of(run, job)
    assert (run / "export" / "encoder.safetensors").is_file()


def test_two_tasks_form_one_process_group(slurm_cluster: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, (job,) = submit(f"run.dir={run}", "run.max_steps=4", "--tasks-per-node", "2")
    assert wait_done(job) == "COMPLETED", log_of(run, job)
    assert "step 4/4" in log_of(run, job) and "on 2 process(es)" in log_of(run, job)
    assert "global_rank=1(2)" in log_of(run, job, rank=1)  # the second task is rank 1 of 2
    assert (run / "export" / "encoder.safetensors").is_file()


def test_the_test_cluster_binds_each_task_to_its_own_cores(slurm_cluster: Path) -> None:
    """As a real cluster (task/affinity or task/cgroup): srun gives each task the cores it asked for, no more;
    the scheduler of this suite used to leave every task on every core (task/none), hiding a missing
    --cpus-per-task on the srun line."""
    code = "import os; print(os.environ['SLURM_PROCID'], sorted(os.sched_getaffinity(0)))"
    proc = subprocess.run(["srun", "-n2", "--cpus-per-task=1", sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120)
    cores = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert proc.returncode == 0 and set(cores) == {"0", "1"}, proc.stderr
    assert all(len(eval(c)) == 1 for c in cores.values()) and cores["0"] != cores["1"], cores


def test_a_rank_bound_to_fewer_cores_than_its_loader_needs_warns(slurm_cluster: Path, tmp_path: Path) -> None:
    """A hand-written srun line without --cpus-per-task: the rank is bound to one core for itself and its loader
    worker, and says so in one line at start (launch/submit.py's own srun line carries the flag). The
    submitting shell's OMP_NUM_THREADS, which srun passes on, asks for more threads than that core: the rank runs
    one and says so."""
    proc = subprocess.run(["srun", "-n1", "--cpus-per-task=1", sys.executable, str(REPO / "pretrain" / "main.py"),
                           "--config", str(TINY), f"run.dir={tmp_path / 'run'}", "run.max_steps=1",
                           "data.num_workers=1", "monitor.knn_every=0"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stdout.splitlines() if "may run on 1 core(s)" in line]
    assert len(warned) == 1 and warned[0].startswith("rank 0: warning:") and "--cpus-per-task" in warned[0]
    threads = [line for line in proc.stdout.splitlines() if "threads beyond the cores" in line]
    assert threads == ["rank 0: note: torch would run 2 threads (OMP_NUM_THREADS=2) on the 1 core(s) this process "
                       "is bound to; it runs 1, as threads beyond the cores spin against each other"], proc.stdout


def test_a_job_whose_rank_dies_ends_at_once_instead_of_waiting_for_the_timeout(slurm_cluster: Path,
                                                                                tmp_path: Path) -> None:
    """srun's --kill-on-bad-exit=1: when one of two ranks is killed (a node's OOM killer, a hardware fault), the
    step ends within seconds; without it the other rank waits in its next collective until
    run.dist_timeout_min runs out (15 minutes), holding the node. Its chained eval is then cancelled by SLURM
    (kill-on-invalid-dep) instead of pending forever, as the submission said it would be."""
    run = tmp_path / "run"
    probe = tmp_path / "probe.yaml"
    probe.write_text(yaml.safe_dump({"dataset": "synthetic", "num_workers": 0}))
    proc, (job, eval_job) = submit(f"run.dir={run}", "optim.epochs=50", "run.checkpoint_every=1000",
                                   "--tasks-per-node", "2", "--eval", str(probe))
    assert "SLURM cancels its eval: resubmit the same command" in proc.stdout
    wait_for_step(run, job, 3)
    ranks = subprocess.run(["pgrep", "-f", f"submitit.core._submit {run / 'slurm'}"], capture_output=True, text=True)
    rank1 = [pid for pid in ranks.stdout.split()
             if b"SLURM_PROCID=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    assert rank1, ranks.stdout
    killed = time.monotonic()
    os.kill(int(rank1[0]), 9)
    state = wait_done(job, timeout=120)
    assert state in ("FAILED", "CANCELLED") and time.monotonic() - killed < 90, (state, log_of(run, job)[-2000:])
    assert wait_done(eval_job, timeout=60) == "CANCELLED"


def test_preempted_job_saves_requeues_and_resumes_without_losing_steps(slurm_cluster: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, (job,) = submit(f"run.dir={run}", "optim.epochs=5", "run.checkpoint_every=1000")  # 40 steps
    wait_for_step(run, job, 3)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # what SLURM sends before preempting
    assert wait_done(job, timeout=300) == "COMPLETED", log_of(run, job)
    log = log_of(run, job)  # both runs of the job append to the same log
    stopped = re.search(r"infomax pretraining stopped \(SIGUSR2\): step (\d+)/40", log)
    resumed = re.search(r"resumed from \S+step_(\d+) \(epoch \d+, batch \d+, step (\d+)\)", log)
    finished = re.search(r"infomax pretraining finished: step 40/40, epoch 5/5, (\d+) steps in", log)
    assert stopped and resumed and finished, log[-3000:]
    k = int(stopped.group(1))
    assert k >= 3 and int(resumed.group(1)) == int(resumed.group(2)) == k  # resumed from the step it stopped at
    assert int(finished.group(1)) == 40 - k  # no step ran twice, none was skipped
    assert "requeued 1 times" in log
    assert any("REQUEUED" in line for line in sacct(job, "-D"))  # sacct's history holds the requeue


def test_a_job_preempted_by_a_higher_tier_saves_requeues_and_resumes(slurm_cluster: Path, tmp_path: Path) -> None:
    """Preemption as SLURM does it by default: a job of the urgent partition takes the cores, and the debug job
    gets SIGTERM (not USR2) and GraceTime to save. It used to save and exit 0 as if cancelled: SLURM ended it
    COMPLETED, not requeued, and a chained eval started on a run with no export."""
    run = tmp_path / "run"
    _, (job,) = submit(f"run.dir={run}", "optim.epochs=5", "run.checkpoint_every=1000")  # 40 steps
    wait_for_step(run, job, 3)
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=30).stdout.split()[0]
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", cpus, "-o", str(tmp_path / "urgent.out"),
                             "--wrap", "sleep 2"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    assert wait_done(urgent, timeout=300) == "COMPLETED"
    assert wait_done(job, timeout=300) == "COMPLETED", log_of(run, job)
    log = log_of(run, job)
    stopped = re.search(r"infomax pretraining stopped \(SIGTERM\): step (\d+)/40", log)
    assert stopped and "the SIGTERM was SLURM preempting the job; requeueing it" in log, log[-3000:]
    resumed = re.search(r"resumed from \S+step_(\d+) ", log)
    assert resumed and int(resumed.group(1)) == int(stopped.group(1)), log[-3000:]  # no step lost
    assert "infomax pretraining finished: step 40/40" in log and "requeued 1 times" in log, log[-3000:]
    assert any("REQUEUED" in line or "PREEMPTED" in line for line in sacct(job, "-D"))


def test_eval_job_waits_for_pretraining_and_writes_the_report(slurm_cluster: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    probe = tmp_path / "probe.yaml"
    probe.write_text(yaml.safe_dump({"dataset": "synthetic", "synthetic_size": 96, "synthetic_image_size": 16,
                                     "num_workers": 0, "probe_steps": 20, "knn_k": [5],
                                     "baselines": {"alexnet_supervised": False, "supervised_encoder": False}}))
    _, (job, eval_job) = submit(f"run.dir={run}", "run.max_steps=4", "data.num_workers=1", "--eval", str(probe),
                                "--eval-time", "7")
    assert wait_done(eval_job) == "COMPLETED" and wait_done(job) == "COMPLETED"
    assert [sacct(j, "-o", "Timelimit")[0].split("|")[-1] for j in (job, eval_job)] == ["00:20:00", "00:07:00"]
    (pre,), (post,) = sacct(job), sacct(eval_job)
    assert post.split("|")[2] >= pre.split("|")[3]  # the eval started after pretraining ended (afterok)
    # A loader worker beside the main loop: the srun step was given 2 cores, and the rank, bound to them, found
    # its affinity large enough (it warns in one line when not: the test above)
    steps = dict(line.split("|") for line in subprocess.run(
        ["sacct", "-j", job, "-n", "-P", "-o", "JobID,AllocCPUS"], capture_output=True, text=True, timeout=30).stdout.split())
    assert steps.get(f"{job}.0") == "2", steps
    assert "may run on" not in log_of(run, job), log_of(run, job)[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert [r["kind"] for r in report["rows"]] == ["ours", "random_init", "raw_pixels"]
    # the eval again, alone (a failed eval used to need the whole command, which queued the pretraining job first)
    (run / "report.json").unlink()
    proc, (again,) = submit(f"run.dir={run}", "run.max_steps=4", "data.num_workers=1", "--eval", str(probe),
                            "--eval-only")
    assert "eval of the written export" in proc.stdout and wait_done(again) == "COMPLETED"
    assert [r["kind"] for r in json.loads((run / "report.json").read_text())["rows"]] == [
        "ours", "random_init", "raw_pixels"]


def test_sweep_gives_one_run_per_value(slurm_cluster: Path, tmp_path: Path) -> None:
    base = tmp_path / "sweep"
    _, jobs = submit(f"run.dir={base}", "run.max_steps=2", "--sweep", "optim.lr=0.05,0.2")
    assert len(jobs) == 2 and all("_" in j for j in jobs)  # one job array
    for job in jobs:
        assert wait_done(job) == "COMPLETED"
    lrs = sorted(yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"] for d in base.glob("optim.lr=*"))
    assert lrs == [0.05, 0.2]
    assert all((d / "export" / "encoder.safetensors").is_file() for d in base.glob("optim.lr=*"))


def test_cancelled_run_resumes_when_resubmitted(slurm_cluster: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = (f"run.dir={run}", "optim.epochs=5", "run.checkpoint_every=1000")
    _, (job,) = submit(*args)
    wait_for_step(run, job, 3)
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert wait_done(job) == "CANCELLED"
    # sacct says CANCELLED at once, while the job, sent SIGTERM, still saves: up to KillWait (30 s) before SIGKILL
    end = time.monotonic() + 45
    while not list((run / "checkpoints").glob("step_*")) and time.monotonic() < end:
        time.sleep(0.5)
    assert list((run / "checkpoints").glob("step_*")), f"the cancelled run left no checkpoint: {log_of(run, job)}"
    _, (again,) = submit(*args)
    assert wait_done(again, timeout=300) == "COMPLETED", log_of(run, again)
    assert "resumed from" in log_of(run, again) and "step 40/40" in log_of(run, again)


def test_hidden_partitions_and_partition_lists_are_known(slurm_cluster: Path) -> None:
    """sinfo without -a hid Hidden=YES partitions, and '--partition debug,urgent' (sbatch's list) was refused whole."""
    from argparse import Namespace

    from infomax.launch.submit import check_cluster, known_partitions

    assert {"debug", "urgent", "hidden"} <= set(known_partitions())
    check_cluster(Namespace(cluster="slurm", gpus_per_node=0, dry_run=False, partition="debug,hidden"))


@pytest.mark.parametrize("scontrol, expected", [
    ("JobId=7 JobState=RUNNING StartTime=2026-12-08T10:00:00 PreemptTime=2026-12-08T11:00:00", True),
    ("JobId=7 JobState=CANCELLED StartTime=2026-12-08T10:00:00 PreemptTime=None", False),  # scancel's SIGTERM
    # requeued after a preemption at 09:00 and started again at 10:00: this SIGTERM is not that preemption's
    ("JobId=7 JobState=RUNNING StartTime=2026-12-08T10:00:00 PreemptTime=2026-12-08T09:00:00", False),
    # an array's first task, asked for by the array's id: scontrol prints every task; its own line decides
    ("JobId=7 ArrayJobId=7 ArrayTaskId=0 StartTime=2026-12-08T10:00:00 PreemptTime=None\n"
     "JobId=8 ArrayJobId=7 ArrayTaskId=1 StartTime=2026-12-08T10:00:00 PreemptTime=2026-12-08T11:00:00", False),
    ("", False),  # scontrol without an answer: a cancel, saved and not requeued
])
def test_a_sigterm_is_a_preemption_when_scontrol_shows_one_since_the_job_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scontrol: str, expected: bool) -> None:
    from infomax.launch.jobs import being_preempted

    (tmp_path / "scontrol").write_text("#!/bin/sh\ncat " + str(tmp_path / "out.txt") + "\n")
    (tmp_path / "out.txt").write_text(scontrol + "\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert being_preempted() is expected


def test_dry_run_prints_resources_and_submits_nothing(tmp_path: Path) -> None:
    proc, jobs = submit(f"run.dir={tmp_path / 'run'}", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                        "--account", "acct", "--time", "2-00:00:00", "--signal-delay", "300", "--dry-run",
                        "--eval", str(REPO / "configs" / "probe_fmnist.yaml"), "--eval-override", "dataset=synthetic")
    assert not jobs and not (tmp_path / "run").exists()
    # the eval job asks for one node, not the pretraining's two (--eval-nodes), for as long (--eval-time)
    assert "# eval job (after pretraining succeeds): --nodes=1 --ntasks-per-node=4 --time=2880" in proc.stdout
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=acct",
                 "--time=2880", "--signal=USR2@300"):
        assert f"#SBATCH {line}" in proc.stdout, line
    # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05); one dead rank ends the step
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("srun "))
    cpus = next(line for line in proc.stdout.splitlines() if line.startswith("#SBATCH --cpus-per-task="))
    assert f" --cpus-per-task={cpus.split('=')[1]} " in srun and " --kill-on-bad-exit=1 " in srun, srun
    assert f"dir: {tmp_path / 'run'}" in proc.stdout


@pytest.mark.parametrize("extra", [
    {},
    {"name": "infomax-optim.lr=0.1 x", "gpus_per_node": 4, "mem_gb": 64, "partition": "gpu", "account": "acct",
     "qos": "high", "constraint": "a100", "signal_delay_s": 300},
])
def test_dry_run_script_is_the_script_submitit_submits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       extra: dict) -> None:
    """The dry run renders its sbatch script itself (infomax/launch/sbatch.py: submitit has no public way to show
    one). Submitting the same request through the launcher's executor to a stand-in sbatch (and srun,
    which submitit's SlurmExecutor looks for) must hand sbatch exactly that script."""
    from infomax.launch.sbatch import JobRequest
    from infomax.launch.submit import make_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("srun", "exit 1"), ("sbatch", 'cp "$1" "$(dirname "$0")/got.sh"; echo "Submitted batch job 4242"')):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    request = JobRequest(**{"name": "infomax-run", "nodes": 2, "tasks_per_node": 4, "cpus_per_task": 11,
                            "timeout_min": 2880, **extra})
    job = make_executor("slurm", tmp_path / "slurm", 3, request).submit(print)
    assert job.job_id == "4242"
    assert (bin_dir / "got.sh").read_text() == request.sbatch_script(tmp_path / "slurm" / "%j")


@pytest.mark.parametrize("args, needle", [
    (["optim.lrr=1"], "optim.lrr"),
    (["--cluster", "local", "--gpus-per-node", "2"], "has 0"),
    (["--partition", "nope"], "is not a partition of this cluster"),
    (["--partition", "debug,nope"], "'nope' is not a partition"),  # a list: each one is checked, a known one passes
    (["--eval-only"], "--eval-only needs --eval"),
    (["--eval", str(REPO / "configs" / "probe_fmnist.yaml"), "--eval-override", "dataset=synthetic", "--eval-only"],
     "has no usable export"),
    (["--constraint", "nosuchfeature"], "SLURM refuses this request (allocation failure: Invalid feature specification)"),
    (["data.format=ffcv", "data.path=/nowhere.beton"], "'/nowhere.beton' is not a file"),  # failed once queued
    (["--tasks-per-node", "3", "--eval", str(REPO / "configs" / "probe_fmnist.yaml"), "--eval-override",
      "dataset=synthetic", "--eval-override", "protocol=imagenet", "--eval-override", "label_fractions=[]"],
     "sgd.global_batch_size=256 does not split over the eval job's 3 processes"),  # failed the eval after pretraining
    (["--time", "soon"], "is not a SLURM time"),
    (["--sweep", "optim.lr"], "is not key=v1,v2"),
    (["objective.name=dim", "objective.bound=mine"], "dim supports"),  # what the job refuses at start, up front
])
def test_bad_input_fails_before_submitting(slurm_cluster: Path, tmp_path: Path, args: list[str], needle: str,
                                           capsys) -> None:
    """In-process: what the launcher checks, not its interpreter (test_faults.py runs one case as a process)."""
    from infomax.launch.submit import main

    code, out, err = in_process(capsys, main, ["--config", str(TINY), "--time", "20", f"run.dir={tmp_path / 'run'}",
                                               *args])
    lines = err.strip().splitlines()
    assert code == 2 and "submitted" not in out and len(lines) == 1 and needle in lines[0], err[-2000:]
    assert not (tmp_path / "run").exists()


def test_run_dir_of_another_config_is_refused(slurm_cluster: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, (job,) = submit(f"run.dir={run}", "run.max_steps=2")
    wait_done(job)
    proc, jobs = submit(f"run.dir={run}", "run.max_steps=2", "optim.lr=0.5", check=False)
    assert proc.returncode == 2 and not jobs and "belongs to a different config (optim.lr differ)" in proc.stderr
    _, (again,) = submit(f"run.dir={run}", "run.max_steps=4")  # a longer budget is the same experiment
    assert wait_done(again) == "COMPLETED"


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_same_callable_without_slurm(tmp_path: Path, cluster: str) -> None:
    """Also from a shell that a torchrun left its variables in: the one-task job used to take WORLD_SIZE=4 from it
    and wait out the process group's timeout for three ranks that never came."""
    run = tmp_path / "run"
    stale = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc, (job,) = submit(f"run.dir={run}", "run.max_steps=2", "run.dist_timeout_min=1", "--cluster", cluster,
                          env=stale)
    assert "squeue" not in proc.stdout
    export = run / "export" / "encoder.safetensors"
    end = time.monotonic() + 180  # the local executor's job runs on after the command returns
    while not export.is_file() and time.monotonic() < end:
        time.sleep(1)
    assert export.is_file(), (run / "slurm").exists() and list((run / "slurm").rglob("*log*"))


def test_a_two_node_jobs_tasks_derive_one_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment every task of a 2-node, 8-GPU-per-node job exports for Accelerate, from the
    variables SLURM sets: one master (the first node) and port for all 16 tasks, each its own global rank."""
    from infomax.launch.jobs import export_distributed_env

    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for key in PROCESS_GROUP_ENV:  # registered with monkeypatch, so what export_distributed_env sets is undone afterwards
        monkeypatch.setenv(key, "")
    seen = []
    for node, local in ((0, 0), (0, 7), (1, 0), (1, 7)):
        for key in PROCESS_GROUP_ENV:
            monkeypatch.delenv(key)
        for key, value in {**slurm, "SLURM_NODEID": str(node), "SLURM_PROCID": str(8 * node + local),
                           "SLURM_LOCALID": str(local)}.items():
            monkeypatch.setenv(key, value)
        assert export_distributed_env() is not None
        seen.append({k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    assert [(s["RANK"], s["LOCAL_RANK"]) for s in seen] == [("0", "0"), ("7", "7"), ("8", "0"), ("15", "7")]
    assert {(s["WORLD_SIZE"], s["MASTER_ADDR"], s["MASTER_PORT"]) for s in seen} == {("16", "gpu07", seen[0]["MASTER_PORT"])}
