"""How near its optimum the fast probe gets: fits from zero (protocol fast-v1) against fits warm-started
along the weight-decay path (fast-v2, eval/probe.py), at several L-BFGS budgets, on one export's features
(or, with --random-init, a random-init encoder of its architecture, the row that gains most from iterations).
With --path-steps N a third column gives fast-v2 with N iterations for each fit along the path (which only
chooses the weight decay) and the row's budget for the final fit (eval ``probe_path_steps``).

    .venv/bin/python benchmarks/probe_convergence.py --weights runs/fmnist_cpu/export --steps 50 100 200
    .venv/bin/python benchmarks/probe_convergence.py --weights runs/fmnist_cpu/export --steps 100 --path-steps 50 [--random-init]

Both follow the same protocol otherwise: standardised features, the weight decay chosen on a held-out
10 % of train from configs/probe_fmnist.yaml's grid (extended at its edge), a refit on all of train,
top-1 on the test split. A probe that is still far from its optimum reads low, and not by the same
amount for every row of a report.
"""

from __future__ import annotations

import argparse
import time

import torch

from eval.config import EvalConfig, validate_eval
from eval.probe import linear_probe
from eval.rows import norm_of, random_like
from pretrain.config import load_config
from pretrain.data.datasets import open_dataset
from pretrain.distributed import make_accelerator
from pretrain.export import load_encoder
from pretrain.features import ImageListDataset, extract_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="an export directory, e.g. runs/fmnist_cpu/export")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200], help="L-BFGS iterations per fit")
    parser.add_argument("--path-steps", type=int, default=0, help="add a column: this many iterations per path fit")
    parser.add_argument("--random-init", action="store_true", help="score a random-init encoder of the export's architecture")
    args = parser.parse_args()
    cfg = load_config("configs/probe_fmnist.yaml", [f"weights=[{args.weights}]"], schema=EvalConfig, check=validate_eval)
    encoder, meta = load_encoder(args.weights)
    if args.random_init:
        torch.manual_seed(cfg.seed)
        encoder = random_like(meta, meta["in_chans"])
    train, test = open_dataset(cfg.dataset, "train"), open_dataset(cfg.dataset, "test")
    (accelerator, _), size = make_accelerator(0, cfg.precision), meta["input_size"][-1]
    encoder = encoder.to(memory_format=torch.channels_last).eval()  # as the eval stage extracts (eval channels_last)
    (x, y), (tx, ty) = (
        extract_features(encoder, ImageListDataset(split, size, cfg.center_crop_ratio, *norm_of(meta)), accelerator,
                         cfg.batch_size_per_process, cfg.num_workers)
        for split in (train, test))
    grid = tuple(cfg.weight_decays)
    columns = [("from zero (fast-v1)", dict(warm_start=False)), ("warm-started path (fast-v2)", dict(warm_start=True))]
    if args.path_steps:
        columns.append((f"fast-v2, {args.path_steps} per path fit", dict(warm_start=True, path_steps=args.path_steps)))
    print(f"| L-BFGS iterations per fit | {' | '.join(name for name, _ in columns)} |\n|---{'|---' * len(columns)}|")
    for steps in args.steps:
        cells = []
        for _, options in columns:
            t0 = time.perf_counter()
            r = linear_probe(x, y, tx, ty, grid, steps=steps, **options)
            cells.append(f"{100 * r.top1:.2f} (wd {r.weight_decay:g}, {time.perf_counter() - t0:.0f} s, "
                         f"max gradient {r.grad_max:.1e})")
        print(f"| {steps} | {' | '.join(cells)} |", flush=True)

if __name__ == "__main__":
    main()
