"""Pretraining: :func:`train` (the command is :mod:`infomax.launch.pretrain`).

Re-running with the same ``run.dir`` resumes from its newest checkpoint. ``train`` reads top to
bottom: run-dir guard, accelerator, data, model, objective, optimizer, resume, epochs, export; the
run's parts are in :mod:`infomax.train.loop`, the epochs in :class:`infomax.train.resumable.TrainingLoop`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infomax.config.pretrain import Config
    from infomax.runtime.run_dir import RunDirLock
    from infomax.train.loop import EvalClock


def train(cfg: Config, eval_clock: EvalClock | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining as configured; returns the summary. Callable from SLURM jobs.
    ``eval_clock``: the eval to come (``monitor.expect_eval``), reckoned for the expected-duration line
    (:func:`infomax.launch.pretrain.eval_clock` builds it).

    Every process checks the run dir before anything is written (another experiment's or a foreign
    dir is refused); the global rank 0 holds its lock for the whole run, so a second run on the
    same dir stops at once instead of racing this one."""
    from infomax.runtime.run_dir import RunDirLock, check_run_dir

    check_run_dir(cfg)
    lock = RunDirLock(Path(cfg.run.dir))  # taken by rank 0 just before its first write
    try:
        return _train(cfg, lock, eval_clock)
    finally:
        lock.release()


def _train(cfg: Config, lock: RunDirLock, eval_clock: EvalClock | None = None) -> dict[str, Any]:
    """The run, as a table of contents: processes, data, model, optimizer, resume, epochs, export."""
    from infomax.data.train_loader import build_train_data
    from infomax.runtime.distributed import make_accelerator
    from infomax.train.loop import Run, already_complete, build_optimizer, build_parts, finish, start_lines
    from infomax.train.resumable import Resumable

    run_dir = Path(cfg.run.dir)
    # prints its precision choice and why
    accelerator, precision = make_accelerator(cfg.run.seed, cfg.run.precision, cfg.run.dist_timeout_min)
    seed_and_check_the_process(cfg, accelerator)

    # ------------------------------------------------------------------ data, model, objective, optimizer
    data = build_train_data(cfg, accelerator)  # every data error is raised here, before the model
    parts = build_parts(cfg, data, accelerator)
    optimizer, scheduler, lr = build_optimizer(cfg, parts, accelerator, len(data))
    total_steps = max(1, round(cfg.optim.epochs * len(data)))
    if cfg.run.max_steps:
        total_steps = min(total_steps, cfg.run.max_steps)

    # ------------------------------------------------------------------ claim the run dir, resume
    claim_run_dir(cfg, lock, accelerator, data)
    resumable = Resumable(accelerator, run_dir / "checkpoints", cfg.run.keep_checkpoints)
    run = Run(cfg, accelerator, data, parts, optimizer, scheduler, lr, resumable, total_steps, eval_clock)
    loaded = resume(run, run_dir)
    if loaded and (summary := already_complete(run, run_dir)) is not None:
        accelerator.end_training()  # nothing trains, so the record keeps the budget it was trained for
        return summary
    for line in start_lines(cfg, data, lr, accelerator, total_steps):  # what trains, on what; the loader's ceiling
        accelerator.print(line, flush=True)
    if change := run.progress.enter_precision(precision.mode):  # auto may choose otherwise on this machine
        accelerator.print(change, flush=True)
    if accelerator.is_main_process:  # once resuming is certain to work and there is work to do
        record_config(cfg, run_dir)

    # ------------------------------------------------------------------ epochs
    run.start_reporting(run_dir)  # TensorBoard, stop signals, the loop and its progress bar
    progress = run.progress
    if cfg.monitor.knn_every and progress.global_step == 0:
        run.run_knn()  # the untrained encoder's score: the floor the monitor should climb from
    parts.model.train()
    # Epochs of Run.step from the position, checkpoints by the run.checkpoint_every* rules, the kNN monitor at epoch
    # ends and at the last step, until the budget or a stop; then the last checkpoint.
    checkpoint_path = run.loop.run()
    if progress.unreadable_count:
        accelerator.print(f"warning: {progress.unreadable_count} unreadable images were skipped, e.g. "
                          + ", ".join(progress.unreadable[:3]))

    # ------------------------------------------------------------------ summary and export
    summary = finish(run, run_dir, checkpoint_path, precision)
    accelerator.end_training()
    return summary


def seed_and_check_the_process(cfg: Config, accelerator: Any) -> None:
    """Seeds (each rank its own), the cores this rank was bound to, determinism where asked."""
    import torch
    from accelerate.utils import set_seed

    from infomax.runtime.hardware import check_deterministic_supported, few_cores_warning

    set_seed(cfg.run.seed + accelerator.process_index)
    if warning := few_cores_warning(cfg.data.num_workers):  # every rank: binding differs from node to node
        print(f"rank {accelerator.process_index}: {warning}", flush=True)
    if cfg.run.deterministic:
        check_deterministic_supported(accelerator.device.type)
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic


def claim_run_dir(cfg: Config, lock: RunDirLock, accelerator: Any, data: Any) -> None:
    """The run's first writes, once everything before can no longer fail: every rank checks that the data is the
    run dir's own (moved is fine, other data is refused); rank 0 takes the lock, checks again under it, marks the
    dir and records where the data is."""
    from infomax.data.train_loader import data_identity
    from infomax.runtime.distributed import on_main_raised_everywhere
    from infomax.runtime.run_dir import check_data_moved, check_run_dir, check_writable, mark_ours, record_data

    run_dir, main = Path(cfg.run.dir), accelerator.is_main_process
    identity = data_identity(cfg, data.images)
    if (moved := check_data_moved(run_dir, cfg, identity)) and main:
        print(moved, flush=True)

    def claim() -> None:
        lock.acquire()
        check_run_dir(cfg)  # again under the lock: the run that held it may have just written config.yaml
        mark_ours(run_dir)
        check_writable(run_dir)
        record_data(run_dir, cfg, identity)

    on_main_raised_everywhere(claim, main)  # a refusal stops every rank, not rank 0 alone


def resume(run: Any, run_dir: Path) -> Any:
    """The newest intact checkpoint restored into ``run`` ((state, path), or None for a fresh start); with
    run.resume=never the earlier run's checkpoints, TensorBoard events, export and eval report go aside, not mixed in
    (an eval would otherwise score the earlier run's export until the fresh one ends, and its report read as the
    fresh run's)."""
    from infomax.runtime import checkpoint as ckpt

    cfg, accelerator, loaded = run.cfg, run.accelerator, None
    if cfg.run.resume == "never":
        # the eval's kept rows (rows/) may stay: they are keyed by the export's sha256
        earlier = [run.resumable.directory, run_dir / "tb", run_dir / "export",
                   *(run_dir / f"report.{ext}" for ext in ("md", "json", "png"))]
        moved = [ckpt.move_aside(p) for p in earlier] if accelerator.is_main_process else []
        if aside := [p for p in moved if p]:
            print(f"run.resume=never: starting afresh; the earlier run is kept in {', '.join(map(str, aside))}",
                  flush=True)
    else:
        loaded = run.resumable.resume("rerun with run.resume=never to start afresh (they are moved aside, not "
                                      "deleted), or copy an intact checkpoint back into that dir")
    if loaded:
        run.restore(*loaded)
        p = run.progress
        accelerator.print(f"resumed from {loaded[1]} (epoch {p.epoch}, batch {p.step_in_epoch}, step {p.global_step})")
    run.scheduler.step_update(run.progress.global_step)
    return loaded


def record_config(cfg: Config, run_dir: Path) -> None:
    """config.yaml (with the git revision), written only when new or with a new budget, atomically."""
    from infomax.config.pretrain import to_yaml
    from infomax.runtime.files import write_atomically
    from infomax.runtime.revision import git_revision

    saved, current = run_dir / "config.yaml", to_yaml(cfg)
    if not saved.is_file() or saved.read_text().partition("\n")[2] != current:
        write_atomically(saved, f"# git revision: {git_revision()}\n" + current)
