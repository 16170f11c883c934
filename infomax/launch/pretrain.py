"""The pretraining command (``pretrain/main.py``, ``infomax-pretrain``, ``python -m infomax.launch.pretrain``).

    accelerate launch pretrain/main.py --config configs/fmnist_cpu.yaml optim.lr=0.3 run.dir=runs/x
    python pretrain/main.py --config ...          # one process

It sits above both stages: the eval to come (``monitor.expect_eval``) is loaded here and reaches training as a
clock (:func:`eval_clock`), so that training imports nothing of the eval.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from infomax.train.loop import EvalClock
from infomax.train.main import train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Self-supervised pretraining by maximising an MI lower bound between views.",
        epilog="Overrides are dotted keys, e.g. optim.lr=0.3 run.dir=runs/x data.views.0.size=64",
    )
    parser.add_argument("--config", help="YAML file with differences from the defaults (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied after the file")
    return parser.parse_args(argv)


def eval_clock(cfg: Any) -> EvalClock | None:
    """The eval ``monitor.expect_eval`` names, loaded and checked now (before any work: a wrong one is said in one
    line), as the clock that reckons it on the export still to be written; None when no eval is named."""
    if not cfg.monitor.expect_eval:
        return None
    from infomax.eval.expected import check_expected_eval, expected_eval_seconds, load_expected_eval

    plan = load_expected_eval(cfg.monitor.expect_eval, str(Path(cfg.run.dir) / "export"))
    check_expected_eval(plan, cfg)
    return functools.partial(expected_eval_seconds, plan)


def main(argv: Sequence[str] | None = None) -> int:
    """The pretraining command; returns its exit code (2: a config or data error, 3: a non-finite loss, 130: a
    second Ctrl-C, 1: a damaged checkpoint or a full disk)."""
    from infomax.config.pretrain import ConfigError, load_config
    from infomax.data.datasets import DataError
    from infomax.export.encoder import ExportFailed
    from infomax.runtime.checkpoint import SECOND_CTRL_C, CheckpointError, SaveInterrupted, make_room, no_room
    from infomax.runtime.stop import SecondCtrlC
    from infomax.train.engine import NonFiniteLoss

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, eval_clock(cfg))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (SaveInterrupted, SecondCtrlC) as e:  # a second Ctrl-C: the user would not wait for the save
        print(f"error: {str(e) or SECOND_CTRL_C}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the stop handler was installed
        print("error: stopped by Ctrl-C while starting, before the first step; rerun the same command to start",
              file=sys.stderr)
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
    sys.exit(main())
