"""Pretraining speed on this CPU: how to split the cores between compute and loading, channels_last.

    .venv/bin/python benchmarks/cpu_split.py --steps 20 --rounds 3

Runs the demo's pretraining (configs/fmnist_cpu.yaml) for ``--steps`` optimizer steps per variant,
monitors off, rounds interleaved so that drift hits every variant alike, and prints the median
images/s of the training loop (from the run's own summary line, which excludes start-up).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "loader augment, 2 workers": ["data.augment=loader", "data.num_workers=2"],
    "loader augment, 1 worker": ["data.augment=loader", "data.num_workers=1"],
    "batch augment, 0 workers": ["data.augment=batch", "data.num_workers=0"],
    "batch augment, 1 worker": ["data.augment=batch", "data.num_workers=1"],
    "batch augment, 0 workers, channels_last": ["data.augment=batch", "data.num_workers=0", "model.channels_last=true"],
}


def images_per_s(overrides: list[str], steps: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "pretrain/main.py", "--config", "configs/fmnist_cpu.yaml", f"run.dir={tmp}/run",
               f"run.max_steps={steps}", "monitor.knn_every=0", "monitor.online_probe=false", "run.export=false",
               *overrides]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}).stdout
    done, seconds = re.search(r"(\d+) steps in (\d+)s", out).groups()
    return int(done) * batch / float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="must equal optim.batch_size_per_process of the config")
    parser.add_argument("overrides", nargs="*", help="applied to every variant, e.g. model.width=0.5")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, over in VARIANTS.items():
            rates[name].append(images_per_s([*args.overrides, *over], args.steps, args.batch))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(rates[next(iter(VARIANTS))])
    print("| variant | images/s (median) | vs first |\n|---|---|---|")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
