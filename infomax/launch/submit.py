"""Send pretraining (and optionally the eval stage after it) to SLURM through submitit.

    python launch/submit.py --config configs/imagenet_resnet50.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 72:00:00 --eval configs/probe_imagenet.yaml --eval-override root=/datasets/imagenet
    python launch/submit.py --config configs/synthetic_tiny.yaml --cluster local      # no SLURM
    python launch/submit.py --config configs/X.yaml --sweep optim.lr=0.1,0.3 --dry-run

One SLURM task per GPU; each task calls the same ``infomax.train.main.train`` as ``accelerate launch``.
Preemption / time limit: checkpoint, requeue, resume (see infomax/launch/jobs.py). Every error a user can
cause is reported in one line before anything is submitted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # first-party modules and submitit load inside the functions, after drop_script_dir()
    import submitit

    from infomax.config.eval import EvalConfig
    from infomax.config.pretrain import Config
    from infomax.launch.sbatch import JobRequest


class SubmitError(ValueError):
    """A request that cannot be submitted; one line with the fix."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Submit infomax pretraining (and eval) to SLURM via submitit.",
                                epilog="Overrides are dotted keys, e.g. optim.lr=0.3 run.dir=runs/x")
    p.add_argument("--config", required=True, help="pretraining YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied after the file")
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    r.add_argument("--tasks-per-node", type=int, default=0, help="default: --gpus-per-node (or 1 without GPUs)")
    r.add_argument("--cpus-per-task", type=int, default=0,
                   help="default: the loader's workers + 1 (data.num_workers, and the eval's num_workers)")
    r.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (0 = the cluster default)")
    r.add_argument("--partition", default="")
    r.add_argument("--account", default="")
    r.add_argument("--qos", default="")
    r.add_argument("--constraint", default="")
    r.add_argument("--time", default="72:00:00",
                   help="time limit, [D-]HH:MM:SS or minutes; 0: none, as SLURM means it")
    r.add_argument("--job-name", default="", help="default: infomax-<run dir name>")
    j = p.add_argument_group("job control")
    j.add_argument("--max-requeues", type=int, default=10, help="preemptions / time limits survived by requeueing")
    j.add_argument("--signal-delay", type=int, default=120, help="seconds before the end SLURM signals the job to save")
    j.add_argument("--eval", default="", help="eval config (configs/probe_*.yaml): a second job after pretraining "
                                              "succeeds")
    j.add_argument("--eval-override", action="append", default=[], help="key=value for the eval config (repeatable)")
    j.add_argument("--eval-nodes", type=int, default=1,
                   help="the eval job's nodes, each with --gpus-per-node (a linear probe needs no more than one node)")
    j.add_argument("--eval-time", default="", help="the eval job's time limit (default: --time)")
    j.add_argument("--eval-only", action="store_true", help="submit only the eval of runs whose export is written "
                                                            "(e.g. to rerun a failed eval), not their pretraining")
    j.add_argument("--sweep", action="append", default=[], help="key=v1,v2,...: one run per value (product of several)")
    j.add_argument("--array-parallelism", type=int, default=16, help="sweep jobs running at once")
    j.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="slurm; local = submitit's local executor (no SLURM); debug = in this process")
    j.add_argument("--logs", default="", help="submitit folder (default: <run dir>/slurm)")
    j.add_argument("--no-data-check", action="store_true",
                   help="submit without looking for data.path / data.root here (data only the compute nodes see)")
    j.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved configs; submit "
                                                          "nothing")
    return p.parse_intermixed_args(argv)


LOCAL_NO_LIMIT_MIN = 366 * 24 * 60  # --time 0 on a local run: no limit, as SLURM means it


def minutes(text: str) -> int:
    """A SLURM time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up as SLURM rounds it (its
    time limits have a resolution of one minute: ``1:30`` is a two-minute limit)."""
    try:
        if "-" in text:
            days, clock = text.split("-", 1)
            h, m, sec = ([int(x) for x in clock.split(":")] + [0, 0])[:3]
        else:
            days, parts = "0", [int(x) for x in text.split(":")]
            h, m, sec = {1: [0, *parts, 0], 2: [0, *parts], 3: parts}[len(parts)]
        return int(days) * 1440 + h * 60 + m + (sec > 0)
    except (ValueError, KeyError):
        raise SubmitError(f"--time '{text}' is not a SLURM time: use HH:MM:SS, D-HH:MM:SS or minutes") from None


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> the product as override lists ``[["a=1", "b=x"], ...]``."""
    axes = []
    for s in sweeps:
        key, sep, values = s.partition("=")
        if not sep or not values:
            raise SubmitError(f"--sweep '{s}' is not key=v1,v2,..., e.g. --sweep optim.lr=0.1,0.3")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def remove_empty_tree(top: Path) -> None:
    """Remove ``top`` and the directories under it, if they hold no file (a non-empty one stays)."""
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def known_partitions() -> list[str]:
    """The cluster's partitions; asking also proves that a controller answers, before anything is written."""
    way_out = "is SLURM reachable from here (scontrol ping, SLURM_CONF)? Use --cluster local to run without SLURM"
    try:
        # -a: hidden partitions too, which sbatch takes from those allowed to use them
        out = subprocess.run(["sinfo", "-a", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SubmitError(f"sbatch is on PATH but sinfo is not: {way_out}") from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"sinfo got no answer from the SLURM controller in 60 s: {way_out}") from None
    if out.returncode != 0:
        problem = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise SubmitError(f"sinfo failed ({problem}): {way_out}")
    return [p.rstrip("*") for p in out.stdout.split()]


def check_run_data(d: Any) -> None:
    """The pretraining's data is where ``data.*`` says, as the job would look for it at its start (a missing .beton
    or root used to fail the job once it had queued, and cancel its eval). Lists no files: a login node need not
    walk ImageNet. ``--no-data-check`` skips it, for data that only the compute nodes see."""
    from infomax.data.beton_file import BetonInfo
    from infomax.data.datasets import REGISTRY, root_named

    if d.format == "ffcv":
        BetonInfo(d.path).require_dataset(d.dataset, "data.path", "data.dataset")
    else:
        with root_named("data.root"):
            REGISTRY[d.dataset].find("train", d.root)


def resolve_runs(args: argparse.Namespace) -> list[Config]:
    """One resolved pretraining config per sweep point, each with its own absolute run dir, checked as ours."""
    from infomax.config.pretrain import load_config
    from infomax.data.train_loader import check_dataset_use
    from infomax.method.objectives import objective_class
    from infomax.runtime.run_dir import check_run_dir

    points = sweep_points(args.sweep)
    runs = []
    for point in points:
        cfg = load_config(args.config, [*args.overrides, *point])
        check_dataset_use(cfg.data)  # what the job would refuse at its start, refused before it queues
        if not args.no_data_check:
            check_run_data(cfg.data)
        objective_class(cfg.objective.name).check_config(cfg.objective)
        if len(points) > 1:  # one run dir per sweep value, under the configured one
            cfg.run.dir = str(Path(cfg.run.dir) / "_".join(o.replace("/", "-") for o in point))
        cfg.run.dir = str(Path(cfg.run.dir).resolve())
        check_run_dir(cfg)
        runs.append(cfg)
    return runs


def resolve_evals(args: argparse.Namespace, runs: list[Config]) -> list[EvalConfig]:
    """With ``--eval``: one eval config per run, probing that run's export; otherwise none."""
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config

    if not args.eval:
        return []
    from infomax.eval.expected import check_submitted_eval  # the eval's modules: imported only when it is chained

    evals = [load_config(args.eval, [*args.eval_override, f"weights=[{Path(cfg.run.dir) / 'export'}]"],
                         schema=EvalConfig, check=validate_eval) for cfg in runs]
    for cfg, ecfg in zip(runs, evals):
        check_submitted_eval(ecfg, cfg, f"--eval {args.eval}")
        if args.eval_only:
            check_export_written(Path(cfg.run.dir))
    if len(evals) > 1 and evals[0].out:  # each point's report would overwrite the last one's
        raise SubmitError(f"--eval {args.eval}: out={evals[0].out} is one directory for the {len(evals)} runs of the "
                          "sweep; leave out empty (--eval-override out=), and each report lands in its own run dir")
    return evals


def check_export_written(run_dir: Path) -> None:
    """``--eval-only``: the run's export is there and intact, as the eval will read it."""
    from infomax.export.encoder import export_problem

    if problem := export_problem(run_dir / "export"):
        raise SubmitError(f"--eval-only: run dir {run_dir} has no usable export ({problem}); submit without "
                          "--eval-only to pretrain it first")


def check_eval_batches(evals: list[EvalConfig], processes: int, asked: str) -> None:
    """The eval job's fits split their global batches over its processes: a batch that does not split used to fail
    the eval only once pretraining had ended. The probe's is refused; a baseline's is warned of, since a stored
    result (baselines.use_stored) needs no fit, which only the eval can tell."""
    for ecfg in evals:
        b = ecfg.baselines
        fits = {"sgd.global_batch_size": (ecfg.sgd.global_batch_size if ecfg.protocol == "imagenet" else 0, ""),
                "baselines.alexnet_global_batch_size":
                    (b.alexnet_global_batch_size if b.alexnet_supervised else 0, "baselines.alexnet_supervised"),
                "baselines.supervised_encoder_global_batch_size":
                    (b.supervised_encoder_global_batch_size if b.supervised_encoder else 0,
                     "baselines.supervised_encoder")}
        for key, (batch, switch) in fits.items():
            if batch % processes == 0:
                continue
            fix = f"--eval-override {key}=<a multiple of {processes}>" + (f" or {switch}=false" if switch else "")
            if not switch:
                raise SubmitError(f"--eval {asked}: {key}={batch} does not split over the eval job's {processes} "
                                  f"processes; pass {fix}")
            print(f"warning: --eval {asked}: {key}={batch} does not split over the eval job's {processes} "
                  f"processes: unless a stored result is reported, that fit will fail the eval; pass {fix}",
                  file=sys.stderr, flush=True)


def check_numbers(args: argparse.Namespace) -> None:
    """The resource flags' ranges, and what a cluster other than SLURM can run, before any config is read
    (submitit and sbatch would otherwise refuse them with a traceback, or only once the job is queued)."""
    least = {"--nodes": (args.nodes, 1), "--gpus-per-node": (args.gpus_per_node, 0),
             "--tasks-per-node": (args.tasks_per_node, 0), "--cpus-per-task": (args.cpus_per_task, 0),
             "--mem-gb": (args.mem_gb, 0), "--max-requeues": (args.max_requeues, 0),
             "--signal-delay": (args.signal_delay, 0), "--array-parallelism": (args.array_parallelism, 1),
             "--eval-nodes": (args.eval_nodes, 1)}
    for flag, (value, lowest) in least.items():
        if value < lowest:
            raise SubmitError(f"{flag} must be >= {lowest}, got {value}")
    if args.eval_only and not args.eval:
        raise SubmitError("--eval-only needs --eval configs/probe_X.yaml, the eval to submit")
    for flag, nodes in (("--nodes", args.nodes), ("--eval-nodes", args.eval_nodes)):
        if args.cluster != "slurm" and nodes > 1:
            raise SubmitError(f"{flag} {nodes} needs SLURM: --cluster {args.cluster} runs on this machine alone; "
                              f"use {flag} 1, or --cluster slurm")


def tasks_per_node(args: argparse.Namespace) -> int:
    """One task per GPU (``--tasks-per-node`` may only repeat it); one task without GPUs unless told."""
    gpus = args.gpus_per_node
    tasks = args.tasks_per_node or max(1, gpus)
    if gpus and tasks != gpus:
        raise SubmitError(f"--tasks-per-node {tasks} with --gpus-per-node {gpus}: infomax runs one task per GPU")
    return tasks


def check_cluster(args: argparse.Namespace) -> None:
    """The cluster can take the request: this machine has the GPUs (local), or a SLURM controller answers
    and knows the partition (not needed for a dry run, which asks SLURM nothing)."""
    gpus = args.gpus_per_node
    if args.cluster == "local" and gpus:
        import torch

        if torch.cuda.device_count() < gpus:
            raise SubmitError(f"--cluster local asks for {gpus} GPUs but this machine has {torch.cuda.device_count()}; "
                              "use --gpus-per-node 0 (CPU processes) or submit to SLURM")
    if args.cluster == "slurm" and not args.dry_run:
        if shutil.which("sbatch") is None:
            raise SubmitError("sbatch is not on PATH: run this on a SLURM login node, or use --cluster local")
        parts = known_partitions()  # also fails, in one line, when no controller answers
        for asked in args.partition.split(",") if args.partition else []:  # sbatch takes a list: the first free
            if asked not in parts:
                raise SubmitError(f"--partition '{asked}' is not a partition of this cluster "
                                  f"(sinfo knows: {', '.join(parts)})")


def cpus_per_task(args: argparse.Namespace, runs: list[Config], evals: list[EvalConfig]) -> int:
    """``--cpus-per-task``, by default the loader's workers + 1: each task runs its loader's workers beside
    its main process, and with fewer cores they share and the GPU waits (a SLURM task gets 1 CPU unless told)."""
    workers = max([cfg.data.num_workers for cfg in runs] + [e.num_workers for e in evals])
    cpus = args.cpus_per_task or workers + 1
    if cpus < workers + 1:
        raise SubmitError(f"--cpus-per-task {cpus} is too few for the loader: {workers} workers and the main process "
                          f"need {workers + 1} cores per task; leave --cpus-per-task out (it then asks for "
                          f"{workers + 1}) or lower data.num_workers to {max(0, cpus - 1)}")
    return cpus


def time_limit(args: argparse.Namespace, text: str, flag: str) -> int:
    """``text``, the value of ``flag`` (``--time`` or ``--eval-time``), in minutes, checked against
    ``--signal-delay``."""
    timeout = minutes(text)
    if 0 < timeout * 60 <= args.signal_delay:  # each run would be told to save at once, requeued without progress
        raise SubmitError(f"--signal-delay {args.signal_delay} s is not shorter than {flag} ({timeout} min): SLURM "
                          "would signal the job to save and requeue as it starts; lower --signal-delay (default 120)")
    if timeout == 0 and args.cluster != "slurm":  # SLURM reads --time 0 as no limit; submitit's local executor
        timeout = LOCAL_NO_LIMIT_MIN  # would kill the job at once, with empty logs
    return timeout


def job_request(args: argparse.Namespace, runs: list[Config], tasks: int, cpus: int) -> JobRequest:
    """What each pretraining job asks of the scheduler."""
    from infomax.launch.sbatch import JobRequest

    timeout = time_limit(args, args.time, "--time")
    return JobRequest(name=args.job_name or f"infomax-{Path(runs[0].run.dir).name}", nodes=args.nodes,
                      tasks_per_node=tasks, cpus_per_task=cpus, timeout_min=timeout,
                      gpus_per_node=args.gpus_per_node, mem_gb=args.mem_gb, partition=args.partition,
                      account=args.account, qos=args.qos, constraint=args.constraint,
                      signal_delay_s=args.signal_delay, array_parallelism=args.array_parallelism)


def runs_parent(runs: list[Config]) -> Path:
    """The run dir, or for a sweep the directory that holds its run dirs."""
    first = Path(runs[0].run.dir)
    return first if len(runs) == 1 else first.parent


def log_folder(args: argparse.Namespace, runs: list[Config]) -> Path:
    """submitit's folder: ``--logs``, or ``slurm/`` beside the runs; each job logs in ``<folder>/<job id>``."""
    return Path(args.logs).resolve() if args.logs else runs_parent(runs) / "slurm"


def make_executor(cluster: str, folder: Path, max_requeues: int, request: JobRequest) -> submitit.AutoExecutor:
    """submitit's executor for ``cluster``, logging in ``folder``/<job id>, set up for ``request``."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster, slurm_max_num_timeout=max_requeues)
    executor.update_parameters(**request.executor_parameters())
    return executor


def print_dry_run(args: argparse.Namespace, runs: list[Config], evals: list[EvalConfig], request: JobRequest,
                  eval_job: JobRequest, folder: Path) -> None:
    """What would be submitted: the sbatch script and the resolved configs. Writes nothing.

    The SLURM script is rendered by infomax/launch/sbatch.py (submitit can neither show it publicly nor be
    built without srun). The local and debug executors are built, so that they check the request
    (the local one takes one node) as a submission would; the local one makes its log folder, which goes again.
    """
    from infomax.config.pretrain import to_yaml

    if args.cluster == "slurm":
        script = request.sbatch_script(folder / "%j")
    else:
        made = next((d for d in reversed([folder, *folder.parents]) if not d.exists()), None)
        try:
            make_executor(args.cluster, folder, args.max_requeues, request)
        finally:
            if made is not None:
                remove_empty_tree(made)
        script = f"({args.cluster} executor: no sbatch script)"
    jobs = "1 job" if len(runs) == 1 else (f"{len(runs)} jobs: a job array of this script, --array=0-{len(runs) - 1}"
                                            f"%{args.array_parallelism}, each job's logs under %A_%a, not %j")
    print(f"# sbatch script ({jobs})\n{script}")
    for cfg in runs:
        print(f"# resolved config for {cfg.run.dir}\n{to_yaml(cfg)}")
    for ecfg in evals:
        print(f"# eval job (after pretraining succeeds): --nodes={eval_job.nodes} --ntasks-per-node="
              f"{eval_job.tasks_per_node} --time={eval_job.timeout_min}\n{to_yaml(ecfg)}")


def submit_jobs(args: argparse.Namespace, executor: submitit.AutoExecutor, runs: list[Config],
                evals: list[EvalConfig], eval_job: JobRequest) -> tuple[list[submitit.Job], list[submitit.Job]]:
    """Submit one pretraining job per run (a job array for a sweep), then each run's eval after it.

    Returns the pretraining jobs and the eval jobs. On SLURM an eval waits for its pretraining
    (``afterok``); local and debug have no scheduler to hold it back, so this waits for the pretraining.
    """
    from infomax.config.pretrain import to_yaml
    from infomax.launch.jobs import PretrainJob
    from infomax.runtime.run_dir import mark_ours

    for cfg in runs:  # the job's own check then knows the dir (and its slurm/ logs) as infomax's
        mark_ours(Path(cfg.run.dir))
    jobs = [] if args.eval_only else [PretrainJob(to_yaml(cfg), args.max_requeues) for cfg in runs]
    if len(jobs) > 1:  # a sweep: one job array
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
    else:
        submitted = [executor.submit(job) for job in jobs]
    return submitted, submit_evals(args, executor, submitted, evals, eval_job)


def eval_request(args: argparse.Namespace, request: JobRequest) -> JobRequest:
    """The eval job's request: the pretraining's, on ``--eval-nodes`` for ``--eval-time``."""
    timeout = time_limit(args, args.eval_time, "--eval-time") if args.eval_time else request.timeout_min
    return dataclasses.replace(request, name=f"{request.name}-eval", nodes=args.eval_nodes, timeout_min=timeout)


def submit_evals(args: argparse.Namespace, executor: submitit.AutoExecutor, submitted: list[submitit.Job],
                 evals: list[EvalConfig], eval_job: JobRequest) -> list[submitit.Job]:
    """Each run's eval job, after its pretraining job (``submitted``; none with ``--eval-only``); on local and
    debug, once it has ended."""
    from infomax.config.pretrain import to_yaml
    from infomax.launch.jobs import EvalJob

    eval_jobs = []
    for job, ecfg in zip(submitted or [None] * len(evals), evals):
        executor.update_parameters(name=eval_job.name, nodes=eval_job.nodes, timeout_min=eval_job.timeout_min, **(
            # A failed pretraining (a lost node, a killed rank) cancels its eval instead of leaving it pending.
            {"slurm_additional_parameters": {"dependency": f"afterok:{job.job_id}", "kill_on_invalid_dep": "yes"}}
            if args.cluster == "slurm" and job is not None else {}))
        if args.cluster != "slurm" and job is not None:
            job.result()  # local/debug: no scheduler to hold the eval back, so wait here
        eval_jobs.append(executor.submit(EvalJob(to_yaml(ecfg), args.max_requeues)))
    if args.cluster == "debug":  # in this process: the jobs run when their results are asked for
        for job in submitted + eval_jobs:
            job.result()
    return eval_jobs


def print_follow_up(cluster: str, runs: list[Config], submitted: list[submitit.Job],
                    eval_jobs: list[submitit.Job]) -> None:
    """Each job's id and logs, then the commands to follow (and on SLURM to cancel) them."""
    for cfg, job in zip(runs, submitted):
        print(f"submitted {job.job_id}: run dir {cfg.run.dir}\n"
              f"  logs     {job.paths.stdout}\n           {job.paths.stderr}")
    for job in eval_jobs:
        print(f"submitted {job.job_id}: eval {'of the written export' if not submitted else 'after pretraining'}; "
              f"report beside the export\n  logs     {job.paths.stderr}")
    ids = ",".join(j.job_id for j in submitted + eval_jobs)
    # progress lines and errors go to stderr: the .err log is the one that moves
    logdir, log = shlex.quote(str(runs_parent(runs))), shlex.quote(str((submitted or eval_jobs)[0].paths.stderr))
    if cluster == "slurm":
        print(f"follow:   squeue -j {ids}   |   sacct -j {ids} -X -o JobID,JobName,State,Elapsed\n"
              f"          tail -f {log}   |   tensorboard --logdir {logdir}\n"
              f"cancel:   scancel {ids}  (a cancelled run keeps its checkpoint: resubmit the same command to resume)")
        if eval_jobs and submitted:
            print("if pretraining fails (a lost node, a killed rank), SLURM cancels its eval: resubmit the same "
                  "command to resume pretraining from its checkpoint and chain the eval again; if the eval alone "
                  "fails, resubmit with --eval-only")
    else:
        print(f"follow:   tail -f {log}   |   tensorboard --logdir {logdir}")


STALE_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
SITE_SLURM_ENV = ("SLURM_CONF", "SLURM_CLUSTERS", "SLURM_TIME_FORMAT", "SLURM_DEBUG_FLAGS")  # a site's, not a job's


@contextlib.contextmanager
def job_environment() -> Iterator[None]:
    """While submitting: this shell's environment, which the jobs get (sbatch's --export=ALL), without what a torchrun
    or an salloc left in it (the process group's variables, a job's SLURM_*, SRUN_*, SUBMITIT_*), which would meet
    submitit's own rank set-up; restored as it was after. Our own, not submitit's ``clean_env``: that one drops
    SLURM_CONF and SLURM_CLUSTERS, with which sbatch finds the controller and the cluster."""
    kept = dict(os.environ)
    for k in kept:
        if k in STALE_ENV or (k.startswith(("SLURM_", "SRUN_", "SUBMITIT_")) and k not in SITE_SLURM_ENV):
            del os.environ[k]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(kept)


def sbatch_test_only(script: str, which: str) -> None:
    """``sbatch --test-only`` on a script to be submitted (``which``, for the message): what the scheduler refuses
    (an unknown constraint, account or QOS, more CPUs or memory than a node has) is refused here in one line, before
    a run dir is made."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(script)
        f.flush()
        try:
            out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise SubmitError("sbatch --test-only got no answer from the SLURM controller in 60 s") from None
    if out.returncode != 0:
        said = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1].removeprefix("sbatch: error: ")
        raise SubmitError(f"SLURM refuses {which} ({said}); change the flag it names, or see "
                          "--dry-run's sbatch script")


def submit(args: argparse.Namespace) -> list[submitit.Job]:
    """Check everything (configs, run dirs, resources, the cluster) before anything is submitted; then
    print the dry run, or submit and print how to follow the jobs. Returns the jobs (none for a dry run)."""
    check_numbers(args)
    runs = resolve_runs(args)
    evals = resolve_evals(args, runs)
    tasks = tasks_per_node(args)
    check_eval_batches(evals, args.eval_nodes * tasks, args.eval)
    check_cluster(args)
    request = job_request(args, runs, tasks, cpus_per_task(args, runs, evals))
    eval_job = eval_request(args, request)  # a bad --eval-time is refused here, before anything is written
    folder = log_folder(args, runs)
    if args.dry_run:
        print_dry_run(args, runs, evals, request, eval_job, folder)
        return []
    executor = make_executor(args.cluster, folder, args.max_requeues, request)
    with job_environment():
        if args.cluster == "slurm":
            sbatch_test_only(request.sbatch_script(folder / "%j"), "this request")
            if evals:
                sbatch_test_only(eval_job.sbatch_script(folder / "%j"), "the eval job's request")
        submitted, eval_jobs = submit_jobs(args, executor, runs, evals, eval_job)
    print_follow_up(args.cluster, runs, submitted, eval_jobs)
    return submitted + eval_jobs


def main(argv: Sequence[str] | None = None) -> int:
    from infomax.config.pretrain import ConfigError
    from infomax.data.datasets import DataError

    args = parse_args(argv)
    try:
        submit(args)
    except (ConfigError, DataError, SubmitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
