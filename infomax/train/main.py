"""Pretraining entry point.

    accelerate launch pretrain/main.py --config configs/fmnist_cpu.yaml optim.lr=0.3 run.dir=runs/x
    python pretrain/main.py --config ...          # one process

Re-running with the same ``run.dir`` resumes from its newest checkpoint. ``train`` reads top to
bottom: run-dir guard, accelerator, data, model, objective, optimizer, resume, epochs, export; the
run's parts are in :mod:`infomax.train.loop`, the epochs in :class:`infomax.train.resumable.TrainingLoop`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from infomax.config.pretrain import Config
    from infomax.eval.progress import EvalToCome
    from infomax.runtime.run_dir import RunDirLock


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Self-supervised pretraining by maximising an MI lower bound between views.",
        epilog="Overrides are dotted keys, e.g. optim.lr=0.3 run.dir=runs/x data.views.0.size=64",
    )
    parser.add_argument("--config", help="YAML file with differences from the defaults (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied after the file")
    return parser.parse_args(argv)


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) pretraining as configured; returns the summary. Callable from SLURM jobs.

    Every process checks the run dir before anything is written (another experiment's or a foreign
    dir is refused); the global rank 0 holds its lock for the whole run, so a second run on the
    same dir stops at once instead of racing this one."""
    from infomax.runtime.run_dir import RunDirLock, check_run_dir

    eval_to_come = None
    if cfg.monitor.expect_eval:  # loaded and checked before any work, for the expected-duration line
        from infomax.eval.progress import load_expected_eval

        eval_to_come = load_expected_eval(cfg.monitor.expect_eval, str(Path(cfg.run.dir) / "export"))
    check_run_dir(cfg)
    lock = RunDirLock(Path(cfg.run.dir))  # taken by rank 0 just before its first write
    try:
        return _train(cfg, lock, eval_to_come)
    finally:
        lock.release()


def _train(cfg: Config, lock: RunDirLock, eval_to_come: EvalToCome | None = None) -> dict[str, Any]:
    """The run, as a table of contents: processes, data, model, optimizer, resume, epochs, export."""
    import torch
    from accelerate.utils import set_seed

    from infomax.config.pretrain import to_yaml
    from infomax.data.train_loader import build_train_data
    from infomax.runtime import checkpoint as ckpt
    from infomax.runtime.distributed import make_accelerator
    from infomax.runtime.hardware import check_deterministic_supported, few_cores_warning, loader_line
    from infomax.runtime.revision import git_revision
    from infomax.runtime.run_dir import check_run_dir, check_writable, mark_ours
    from infomax.train.loop import Run, already_complete, build_optimizer, build_parts, finish
    from infomax.train.resumable import Resumable

    run_dir = Path(cfg.run.dir)
    # ------------------------------------------------------------------ processes, precision, seeds
    # prints its precision choice and why
    accelerator, precision = make_accelerator(cfg.run.seed, cfg.run.precision, cfg.run.dist_timeout_min)
    set_seed(cfg.run.seed + accelerator.process_index)
    if warning := few_cores_warning(cfg.data.num_workers):  # every rank: binding differs from node to node
        print(f"rank {accelerator.process_index}: {warning}", flush=True)
    if cfg.run.deterministic:
        check_deterministic_supported(accelerator.device.type)
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic
    main = accelerator.is_main_process

    # ------------------------------------------------------------------ data, model, objective, optimizer
    data = build_train_data(cfg, accelerator)  # every data error is raised here, before the model
    if line := loader_line(cfg.data.format, cfg.data.num_workers, [v.size for v in cfg.data.views], len(data.images),
                           accelerator.device.type):
        accelerator.print(line, flush=True)
    parts = build_parts(cfg, data, accelerator)
    optimizer, scheduler, lr = build_optimizer(cfg, parts, accelerator, len(data))
    total_steps = max(1, round(cfg.optim.epochs * len(data)))
    if cfg.run.max_steps:
        total_steps = min(total_steps, cfg.run.max_steps)

    # ------------------------------------------------------------------ claim the run dir, resume
    if main:  # the first write of the run: everything above can still fail with a clean run dir
        lock.acquire()
        check_run_dir(cfg)  # again under the lock: the run that held it may have just written config.yaml
        mark_ours(run_dir)
        check_writable(run_dir)
    accelerator.wait_for_everyone()
    resumable = Resumable(accelerator, run_dir / "checkpoints", cfg.run.keep_checkpoints)
    run = Run(cfg, accelerator, data, parts, optimizer, scheduler, lr, resumable, total_steps, eval_to_come)
    loaded = None
    if cfg.run.resume == "never":
        if main and (aside := ckpt.move_aside(resumable.directory)):
            print(f"run.resume=never: starting afresh; the earlier checkpoints are kept in {aside}", flush=True)
    else:
        loaded = resumable.resume("rerun with run.resume=never to start afresh (they are moved aside, not "
                                  "deleted), or copy an intact checkpoint back into that dir")
    if loaded:
        run.restore(*loaded)
        p = run.progress
        accelerator.print(f"resumed from {loaded[1]} (epoch {p.epoch}, batch {p.step_in_epoch}, step {p.global_step})")
    scheduler.step_update(run.progress.global_step)
    if main:  # written once resuming is certain to work, and only when new or with a new budget
        saved, current = run_dir / "config.yaml", to_yaml(cfg)
        if not saved.is_file() or saved.read_text().partition("\n")[2] != current:
            saved.write_text(f"# git revision: {git_revision()}\n" + current)
    if loaded and (summary := already_complete(run, run_dir)) is not None:
        accelerator.end_training()
        return summary

    # ------------------------------------------------------------------ epochs
    run.start_reporting(run_dir)  # TensorBoard, stop signals, the loop and its progress bar
    progress = run.progress
    if cfg.monitor.knn_every and progress.global_step == 0:
        run.run_knn()  # the untrained encoder's score: the floor the monitor should climb from
    parts.model.train()
    # Epochs of Run.step from the position, checkpoints every run.checkpoint_every steps and at each epoch end, the
    # kNN monitor at epoch ends and at the last step, until the budget or a stop; then the last checkpoint.
    checkpoint_path = run.loop.run()
    if progress.unreadable_count:
        accelerator.print(f"warning: {progress.unreadable_count} unreadable images were skipped, e.g. "
                          + ", ".join(progress.unreadable[:3]))

    # ------------------------------------------------------------------ summary and export
    summary = finish(run, run_dir, checkpoint_path, precision)
    accelerator.end_training()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from infomax.config.pretrain import ConfigError, load_config
    from infomax.data.datasets import DataError
    from infomax.export.encoder import ExportFailed
    from infomax.runtime.checkpoint import SECOND_CTRL_C, CheckpointError, SaveInterrupted, make_room, no_room
    from infomax.train.engine import NonFiniteLoss

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (SaveInterrupted, KeyboardInterrupt) as e:  # a second Ctrl-C: the user would not wait for the save
        print(f"error: {str(e) or SECOND_CTRL_C}", file=sys.stderr)
        return 130
    except (CheckpointError, ExportFailed) as e:  # every checkpoint damaged, or the disk full at a save or export
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # any other write that found no room (config.yaml, the run-dir marker)
        if not (reason := no_room(e)):
            raise
        print(f"error: {reason} while writing {e.filename or 'a file of the run'}; {make_room(reason)} and rerun "
              "the same command: it resumes from the last checkpoint", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
