"""How near its optimum the fast probe gets: fits from zero (protocol fast-v1) against fits warm-started
along the weight-decay path (fast-v2, eval/probe.py), at several L-BFGS budgets, on one export's features.

    .venv/bin/python benchmarks/probe_convergence.py --weights runs/fmnist_cpu/export --steps 50 100 200

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
from eval.rows import norm_of
from pretrain.config import load_config
from pretrain.data.datasets import open_dataset
from pretrain.distributed import make_accelerator
from pretrain.export import load_encoder
from pretrain.features import ImageListDataset, extract_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="an export directory, e.g. runs/fmnist_cpu/export")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200], help="L-BFGS iterations per fit")
    args = parser.parse_args()
    cfg = load_config("configs/probe_fmnist.yaml", [f"weights=[{args.weights}]"], schema=EvalConfig, check=validate_eval)
    encoder, meta = load_encoder(args.weights)
    train, test = open_dataset(cfg.dataset, "train"), open_dataset(cfg.dataset, "test")
    (accelerator, _), size = make_accelerator(0, cfg.precision), meta["input_size"][-1]
    encoder = encoder.to(memory_format=torch.channels_last).eval()  # as the eval stage extracts (eval channels_last)
    (x, y), (tx, ty) = (
        extract_features(encoder, ImageListDataset(split, size, cfg.center_crop_ratio, *norm_of(meta)), accelerator,
                         cfg.batch_size_per_process, cfg.num_workers)
        for split in (train, test))
    grid = tuple(cfg.weight_decays)
    print("| L-BFGS iterations per fit | from zero (fast-v1) | warm-started path (fast-v2) |\n|---|---|---|")
    for steps in args.steps:
        cells = []
        for warm_start in (False, True):
            t0 = time.perf_counter()
            r = linear_probe(x, y, tx, ty, grid, steps=steps, warm_start=warm_start)
            cells.append(f"{100 * r.top1:.2f} (wd {r.weight_decay:g}, {time.perf_counter() - t0:.0f} s, "
                         f"max gradient {r.grad_max:.1e})")
        print(f"| {steps} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
