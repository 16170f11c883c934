"""The demo's figures over several pretraining seeds: `make demo` (pretraining, then the eval of
configs/probe_fmnist.yaml on the test split) with ``run.seed`` varied, so its probe and kNN are quoted as mean ± SD.

    .venv/bin/python benchmarks/studies/demo_seeds.py --seeds 0,1,2     # the runs (about 8 min each on 2 cores)
    .venv/bin/python benchmarks/studies/demo_seeds.py --table           # the table of the rows so far

Each seed pretrains into runs/demo_seeds/s<seed> with the demo's launch line and is scored by the demo's eval
(only the pretraining seed changes; the eval's own seed, which draws the probe's held-out part and the label
fractions, stays the config's). One JSON line per seed is appended to benchmarks/out/demo_seeds.jsonl, naming the
machine; a finished seed is reused. Seed 0 is `make demo` itself: its run dir, runs/fmnist_cpu, is used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROWS = REPO / "benchmarks" / "out" / "demo_seeds.jsonl"


def run_seed(seed: int) -> dict:
    run_dir = REPO / "runs" / ("fmnist_cpu" if seed == 0 else f"demo_seeds/s{seed}")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    steps = [[accelerate, "launch", "--config_file", "configs/accelerate/cpu.yaml", "--num_cpu_threads_per_process",
              str(len(os.sched_getaffinity(0))), "pretrain/main.py", "--config", "configs/fmnist_cpu.yaml", f"run.seed={seed}",
              f"run.dir={run_dir}"],
             [sys.executable, "eval/main.py", "--config", "configs/probe_fmnist.yaml", f"weights={run_dir / 'export'}",
              # the random-init and raw-pixel rows do not depend on the pretraining seed: seed 0's eval has them
              *(["random_init=false", "raw_pixels=false"] if seed else [])]]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    report = json.loads((run_dir / "report.json").read_text())
    ours = next(r for r in report["rows"] if r["kind"] == "ours")
    return {"seed": seed, "probe": ours["top1"], "knn20": ours["knn"]["20"],
            "label_fractions": {k: {"probe": v["top1"], "knn20": v["knn"].get("20")}
                                for k, v in (ours.get("label_fractions") or {}).items()},
            "date": time.strftime("%Y-%m-%d"), "machine": report["machine"], "precision": report["precision"]}


def table() -> str:
    rows = list({r["seed"]: r for r in map(json.loads, ROWS.read_text().splitlines())}.values()) if ROWS.is_file() else []
    if not rows:
        return "no rows yet"

    def spread(values: list[float]) -> str:
        sd = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{100 * statistics.fmean(values):.2f}{sd} ({', '.join(f'{100 * v:.2f}' for v in values)})"

    fractions = list(dict.fromkeys(k for r in rows for k in r["label_fractions"]))
    lines = ["| seeds | linear probe | kNN k=20 | " + " | ".join(f"{f} labels: probe | {f} labels: kNN k=20"
                                                             for f in fractions) + " |",
             "|---" * (3 + 2 * len(fractions)) + "|",
             f"| {', '.join(str(r['seed']) for r in rows)} | {spread([r['probe'] for r in rows])} | "
             f"{spread([r['knn20'] for r in rows])} | "
             + " | ".join(spread([r["label_fractions"][f][key] for r in rows if f in r["label_fractions"]])
                          for f in fractions for key in ("probe", "knn20")) + " |"]
    machines = sorted({r["machine"] for r in rows})
    return "\n".join(lines) + f"\n\nMean ± SD over the seeds (each seed's value after it). Machines: {'; '.join(machines)}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated pretraining seeds")
    parser.add_argument("--table", action="store_true", help="print the table of the rows so far and exit")
    args = parser.parse_args()
    if not args.table:
        done = {json.loads(line)["seed"] for line in ROWS.read_text().splitlines()} if ROWS.is_file() else set()
        for seed in (int(s) for s in args.seeds.split(",")):
            if seed not in done:
                row = run_seed(seed)
                ROWS.parent.mkdir(parents=True, exist_ok=True)
                with open(ROWS, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table())


if __name__ == "__main__":
    main()
