"""What a SLURM (or local) job runs: the same functions as `pretrain/main.py` and `eval/main.py`.

The launcher holds no training logic. Each task exports the torch distributed environment that
submitit derives from SLURM (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that
Accelerate inside ``train`` / ``evaluate`` forms the process group from it.

Preemption and time limits: SLURM sends submitit's signal (USR2, ``--signal-delay`` seconds before
the time limit; on preemption SIGTERM and the partition's GraceTime, unless the cluster sets
``PreemptParameters=send_user_signal``). ``train`` installs its stop flag for both, every rank stops at the next
step boundary and a checkpoint is saved; only then does rank 0 hand over to submitit's own handler, which calls
:meth:`RequeueableJob.checkpoint` and requeues the job. A SIGTERM is a preemption only when SLURM says the job is
being preempted (:func:`being_preempted`): scancel sends SIGTERM too, and a cancel is not requeued. The
requeued job resumes from ``run.dir``. ``evaluate`` does the same: its probe fit saves and stops, and the
requeued eval resumes it and keeps the rows already scored.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission


def export_distributed_env() -> submitit.JobEnvironment | None:
    """RANK, WORLD_SIZE, ... from the SLURM/local job (no-op outside a submitit job)."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # in-process (debug executor) or not under submitit
        return None
    if env.num_tasks > 1:
        # Every task sees all of its node's GPUs (we ask for --gpus-per-node); Accelerate picks
        # cuda:LOCAL_RANK, so CUDA_VISIBLE_DEVICES is left alone.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env


def submitits_handler(env: submitit.JobEnvironment | None) -> Any:
    """The preemption signal's handler submitit installed for this job (None outside a submitit job, where the
    handler found is no requeue)."""
    from infomax.runtime.stop import PREEMPT_SIGNAL

    return signal.getsignal(PREEMPT_SIGNAL) if env is not None else None


def being_preempted(job_id: str | None = None) -> bool:
    """Whether SLURM is preempting job ``job_id`` (this job's by default): scontrol shows the time it was chosen
    (``PreemptTime``), since this run of the job started, from the preemption's SIGTERM on; a cancel or a time limit
    sets none. False outside SLURM, or when scontrol does not answer (the stop is then a cancel's: saved, not
    requeued)."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    for line in out.stdout.splitlines():  # an array's first task is asked for by the array's id: one line per task
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        if fields.get("JobId") == job_id:
            preempt, start = fields.get("PreemptTime", "None"), fields.get("StartTime", "")
            # ISO times compare as text; a requeued job starts again after an earlier preemption
            return preempt not in ("None", "Unknown", "") and preempt >= start
    return False


class RequeueableJob:
    """A submitit callable that survives ``max_requeues`` preemptions or time limits.

    Our stop flag replaces submitit's USR2 handler while the job runs, so that every rank saves first; the
    job then hands the signal to submitit's handler (kept from before), which on rank 0 calls
    :meth:`checkpoint`, requeues the job and exits; the other ranks return."""

    def __init__(self, config_yaml: str, max_requeues: int) -> None:
        self.config_yaml, self.max_requeues, self.requeues = config_yaml, max_requeues, 0

    @staticmethod
    def hand_over(stopped_by: str | None, submitit_handler: Any, said: str = "", rank: int = 0) -> bool:
        """Pass a preemption's signal on to submitit once the checkpoint is on disk (``said`` first: rank 0 exits
        in submitit's handler, which requeues the job): USR2, or a SIGTERM SLURM sent to preempt the job, which
        rank 0 alone asks SLURM about (the other ranks leave the job's fate to it). False for any other stop (a
        cancel's SIGTERM, Ctrl-C) or outside a submitit job (``submitit_handler`` None). The ranks agreed on the
        cause (``StopFlag.agreed``)."""
        from infomax.runtime.stop import PREEMPT_SIGNAL

        if not callable(submitit_handler):
            return False
        if stopped_by == "SIGTERM":
            if rank != 0:
                return True  # no error of theirs may end the step (--kill-on-bad-exit) while rank 0 requeues
            if not being_preempted():
                return False
            print("infomax job: the SIGTERM was SLURM preempting the job; requeueing it", flush=True)
        elif stopped_by != PREEMPT_SIGNAL.name:
            return False
        if said:
            print(said, flush=True)
        submitit_handler(PREEMPT_SIGNAL, None)
        return True

    def checkpoint(self) -> DelayedSubmission | None:
        """Called by submitit on preemption/time limit: requeue this job unless the budget is spent."""
        if self.requeues >= self.max_requeues:
            print(f"infomax job: not requeued, --max-requeues {self.max_requeues} reached; "
                  "resubmit the same command to continue from the checkpoint", flush=True)
            return None
        self.requeues += 1
        return DelayedSubmission(self)


class PretrainJob(RequeueableJob):
    """``infomax.train.main.train`` as a requeueable submitit callable (pickled with its config)."""

    def __call__(self) -> dict[str, Any]:
        from infomax.config.pretrain import from_yaml
        from infomax.launch.pretrain import eval_clock
        from infomax.train.main import train

        env = export_distributed_env()
        submitit_handler = submitits_handler(env)  # replaced by our stop flag inside train
        cfg = from_yaml(self.config_yaml)
        if env is not None:
            print(f"infomax job: {env} run dir {cfg.run.dir} (requeued {self.requeues} times)", flush=True)
        summary = train(cfg, eval_clock(cfg))
        self.hand_over(summary.get("stopped_by"), submitit_handler, rank=getattr(env, "global_rank", 0))
        return summary


class EvalJob(RequeueableJob):
    """``infomax.eval.main.evaluate(cfg)`` as a requeueable submitit callable (the eval stage after pretraining):
    a preempted probe fit resumes from its checkpoint, and rows already scored are kept."""

    def __call__(self) -> list[dict[str, Any]]:
        from omegaconf import OmegaConf

        from infomax.config.eval import EvalConfig
        from infomax.eval.main import evaluate
        from infomax.eval.rows import Stopped

        env = export_distributed_env()
        submitit_handler = submitits_handler(env)  # replaced by the eval's stop flag
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.create(self.config_yaml)))
        if env is not None:
            print(f"infomax eval job: {env} out {cfg.out or 'beside the export'} (requeued {self.requeues} times)",
                  flush=True)
        try:
            return evaluate(cfg)
        except Stopped as e:
            if not self.hand_over(e.signal_name, submitit_handler, said=f"infomax eval job: {e}",
                                  rank=getattr(env, "global_rank", 0)):
                raise
            return []  # the other ranks; rank 0 has exited in submitit's handler
