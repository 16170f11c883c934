"""What one job asks of the scheduler, as submitit's parameters and as the sbatch script it writes.

The script rendering is ours, deliberately. ``--dry-run`` prints the sbatch script a submission
would send, but submitit (1.5) has no public way to show it: ``SlurmExecutor`` writes it inside
``submit`` through private helpers (``_make_submission_file_text``, ``_make_sbatch_string``), and the
executor cannot even be built where ``srun`` is not on PATH, while a dry run should work on a
laptop. Calling those helpers, or patching ``affinity`` so that the executor builds, would break on
any submitit release that renames them. :meth:`JobRequest.sbatch_script` calls no submitit code but
the public ``JobEnvironment.USR_SIG``: it writes sbatch's own flags and the command line submitit's
script runs (srun, then submitit's job entry module). What keeps it honest is
``tests/test_slurm.py::test_dry_run_script_is_the_script_submitit_submits``: that test submits
through submitit's public API to a stand-in ``sbatch`` and compares the script submitit handed it
with this one, so a submitit that writes its script differently fails there instead of the dry run
quietly showing something other than what is submitted.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit


@dataclass(frozen=True)
class JobRequest:
    """The resources of a pretraining job, once checked (launch/submit.py builds it from its flags)."""

    name: str
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    timeout_min: int
    gpus_per_node: int = 0  # 0 = do not ask for GPUs
    mem_gb: int = 0  # per node; 0 = the cluster's default
    partition: str = ""  # "" = the cluster's default (also account, qos, constraint)
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_delay_s: int = 120  # SLURM signals the job this long before its time limit, to save
    array_parallelism: int = 16  # sweep jobs running at once

    def srun_args(self) -> list[str]:
        """srun's own flags. Since SLURM 22.05 srun no longer inherits sbatch's ``--cpus-per-task``: under
        task/affinity or task/cgroup each rank would get one core for itself and all its loader workers.
        ``--kill-on-bad-exit=1``: one dead rank ends the step, instead of the others waiting in a collective
        until the process group's timeout."""
        return [f"--cpus-per-task={self.cpus_per_task}", "--kill-on-bad-exit=1"]

    def executor_parameters(self) -> dict[str, Any]:
        """Keyword arguments for ``submitit.AutoExecutor.update_parameters`` (generic names, ``slurm_`` extras)."""
        params: dict[str, Any] = {"nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
                                  "cpus_per_task": self.cpus_per_task, "timeout_min": self.timeout_min,
                                  "name": self.name}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        slurm = {"partition": self.partition, "account": self.account, "qos": self.qos,
                 "constraint": self.constraint}
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v})
        params.update(slurm_signal_delay_s=self.signal_delay_s, slurm_array_parallelism=self.array_parallelism,
                      slurm_srun_args=self.srun_args())
        return params

    def sbatch_script(self, folder: Path) -> str:
        """The sbatch script submitit's SlurmExecutor writes for this request, one job (not an array),
        with its logs in ``folder`` (the executor's folder, ``%j`` in it)."""
        folder = Path(folder).expanduser().absolute()
        stdout, stderr = str(folder / "%j_%t_log.out"), str(folder / "%j_%t_log.err")
        flags: dict[str, Any] = {  # sbatch's long options, "_" for "-"; sorted as submitit sorts them
            "job_name": self.name, "time": self.timeout_min, "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node, "cpus_per_task": self.cpus_per_task,
            "gpus_per_node": self.gpus_per_node or None, "mem": f"{self.mem_gb}GB" if self.mem_gb else None,
            "partition": self.partition or None, "account": self.account or None, "qos": self.qos or None,
            "constraint": self.constraint or None, "wckey": "submitit",
            "signal": f"{submitit.JobEnvironment.USR_SIG}@{self.signal_delay_s}",
            "output": stdout.replace("%t", "0"), "error": stderr.replace("%t", "0"), "open-mode": "append"}
        directives = [f"#SBATCH --{key.replace('_', '-')}={shlex.quote(str(flags[key]))}"
                      for key in sorted(flags) if flags[key] is not None]
        srun = shlex.join(["srun", "--unbuffered", "--output", stdout, "--error", stderr, *self.srun_args()])
        command = f"{srun} {shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        return "\n".join(["#!/bin/bash", "", "# Parameters", *directives,
                          "", "# command", "export SUBMITIT_EXECUTOR=slurm", command, ""])
