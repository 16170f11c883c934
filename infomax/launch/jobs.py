"""What a SLURM (or local) job runs: the same functions as `pretrain/main.py` and `eval/main.py`.

The launcher holds no training logic. Each task exports the torch distributed environment that
submitit derives from SLURM (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that
Accelerate inside ``train`` / ``evaluate`` forms the process group from it.

Preemption and time limits: SLURM sends submitit's signal (USR2, ``--signal-delay`` seconds before
the end). ``train`` installs its stop flag for it, every rank stops at the next step boundary and a
checkpoint is saved; only then does rank 0 hand over to submitit's own handler, which calls
:meth:`PretrainJob.checkpoint` and requeues the job. The requeued job resumes from ``run.dir``.
"""

from __future__ import annotations

import signal
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


class PretrainJob:
    """``infomax.train.main.train`` as a requeueable submitit callable (pickled with its config)."""

    def __init__(self, config_yaml: str, max_requeues: int) -> None:
        self.config_yaml, self.max_requeues, self.requeues = config_yaml, max_requeues, 0

    def __call__(self) -> dict[str, Any]:
        from infomax.config.pretrain import from_yaml
        from infomax.launch.pretrain import eval_clock
        from infomax.runtime.stop import PREEMPT_SIGNAL
        from infomax.train.main import train

        env = export_distributed_env()
        submitit_handler = signal.getsignal(PREEMPT_SIGNAL)  # requeue logic, replaced by our stop flag inside train
        cfg = from_yaml(self.config_yaml)
        if env is not None:
            print(f"infomax job: {env} run dir {cfg.run.dir} (requeued {self.requeues} times)", flush=True)
        summary = train(cfg, eval_clock(cfg))
        if summary.get("stopped_by") == signal.Signals(PREEMPT_SIGNAL).name and callable(submitit_handler):
            # The checkpoint is on disk: now let submitit call checkpoint() and requeue (rank 0 only;
            # its handler ignores the other ranks, which just return).
            submitit_handler(PREEMPT_SIGNAL, None)
        return summary

    def checkpoint(self) -> DelayedSubmission | None:
        """Called by submitit on preemption/time limit: requeue this job unless the budget is spent."""
        if self.requeues >= self.max_requeues:
            print(f"infomax job: not requeued, --max-requeues {self.max_requeues} reached; "
                  "resubmit the same command to continue from the checkpoint", flush=True)
            return None
        self.requeues += 1
        return DelayedSubmission(self)


class EvalJob:
    """``infomax.eval.main.evaluate(cfg)`` as a submitit callable (the eval stage after pretraining)."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def __call__(self) -> list[dict[str, Any]]:
        from omegaconf import OmegaConf

        from infomax.config.eval import EvalConfig
        from infomax.eval.main import evaluate

        export_distributed_env()
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.create(self.config_yaml)))
        return evaluate(cfg)
