"""One row of the Fashion-MNIST recipe study: pretrain a recipe, probe its export, record the figures.

    .venv/bin/python benchmarks/recipe_study.py --name r10t_s2_e4 model.arch=resnet10t model.stem_stride=2 optim.epochs=4

Pretrains ``configs/fmnist_study_base.yaml`` (or ``--config``) with the given overrides into ``runs/study/<name>``
on the train images less a validation split (``--holdout``, 10k evenly spaced train images: ``data.holdout``),
then runs the eval stage's fast protocol with ``holdout`` (fit on the other 50k, score the 10k; our encoder's
row only), and appends a JSON line (recipe, seconds per epoch, linear probe, kNN k=20, the split scored) to
``benchmarks/out/recipe_study.jsonl``. The test split is for the demo's final figure only; ``--holdout 0``
scores it, as the study's rows before 2026-12-03 did. The table in benchmarks/README.md is made from that file
(``--table``). Seconds per epoch are only comparable between rows run alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only; recipe_fields imports the config where it reads one
    from pretrain.config import ViewConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "out" / "recipe_study.jsonl"
BASE = "configs/fmnist_study_base.yaml"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def study_row(name: str, overrides: list[str], config: str, holdout: int) -> dict:
    run_dir = REPO / "runs" / "study" / name
    t0 = time.perf_counter()
    if not (run_dir / "export" / "config.json").is_file():  # a finished pretraining (and its eval) is reused
        run([sys.executable, "pretrain/main.py", "--config", config, f"run.dir={run_dir}", f"data.holdout={holdout}",
             *overrides])
    pretrain_s = time.perf_counter() - t0
    meta = json.loads((run_dir / "export" / "config.json").read_text())
    summary = meta["summary"]
    eval_dir = run_dir / "eval"
    report = eval_dir / "report.json"
    if not report.is_file() or report.stat().st_mtime < (run_dir / "export" / "config.json").stat().st_mtime:
        evaluate(run_dir, eval_dir, holdout)
    report_json = json.loads(report.read_text())
    ours = report_json["rows"][0]
    epochs = summary.get("epochs_trained", summary["epochs_completed"])  # runs before fractional epochs: whole ones
    row = {"recipe": recipe_fields(run_dir / "config.yaml"),
        "name": name, "config": config, "overrides": overrides, "date": time.strftime("%Y-%m-%d"),
        "epochs": epochs, "steps": summary["steps"], "seconds_per_epoch": round(summary["seconds_this_run"] / epochs, 1),
        "pretrain_wall_s": round(pretrain_s, 1) if pretrain_s > 60 else None, "knn_monitor_top1": summary["knn_top1"],
        "probe_top1": ours["top1"], "knn20_top1": ours["knn"]["20"], "loss": summary["final_loss"],
        "mi_estimate_nats": summary.get("mi_estimate_nats"), "log_k": summary.get("log_k"),
        "skipped_steps": summary.get("skipped_steps", 0), "seed": seed_of(run_dir / "config.yaml"),
        "probe_protocol": report_json["protocol"], "scored_on": "validation" if holdout else "test",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def seed_of(config_yaml: Path) -> int:
    from pretrain.config import from_yaml

    return from_yaml(config_yaml.read_text().split("\n", 1)[1]).run.seed


def evaluate(run_dir: Path, eval_dir: Path, holdout: int) -> None:
    """The eval stage's fast protocol on the export, our encoder's row only, on the validation split (or test)."""
    run([sys.executable, "eval/main.py", "--config", "configs/probe_fmnist.yaml", f"weights={run_dir / 'export'}",
         f"out={eval_dir}", "random_init=false", "raw_pixels=false", "baselines.alexnet_supervised=false",
         "baselines.supervised_encoder=false", "knn_k=[20]", "precision=no", f"holdout={holdout}"])  # fp32 features, as every row before


def view_text(v: ViewConfig) -> str:
    """One view recipe as the study table's augment column writes it (the fields Fashion-MNIST recipes vary)."""
    extra = (f", gamma {v.gamma:g}" if v.gamma else "") + (f", tone {v.tone:g}" if v.tone else "")
    blur = f", blur {v.blur_p:g} (sigma 0.1-{v.blur_sigma_max:g})" if v.blur_p else ""
    solarize = f", solarize {v.solarize_p:g}" if v.solarize_p else ""
    return (f"crop {v.crop_scale_min:g}-{v.crop_scale_max:g}, flip {v.flip_p:g}, jitter {v.jitter_p:g} "
            f"(b {v.brightness:g}, c {v.contrast:g}{extra}){blur}{solarize}")


def recipe_fields(config_yaml: Path) -> dict[str, str]:
    """The study table's columns, read from a run's resolved config."""
    from pretrain.config import from_yaml

    c = from_yaml(config_yaml.read_text().split("\n", 1)[1])  # first line: the git revision
    m, (v, *others), o = c.model, c.data.views, c.optim
    stem = f"3x3 s{m.stem_stride} stem" if m.small_input else "timm stem"
    ob, b = c.objective, o.batch_size_per_process
    if ob.queue_size:
        negatives = f"{b - 1} batch + {ob.queue_size} queue (m={m.momentum})"
    elif ob.intra_view_negatives:
        negatives = f"{2 * b - 2} batch, both views"
    else:
        negatives = f"{b - 1} batch"
    if ob.name != "contrastive":
        negatives += f", every position ({ob.name})"
    if ob.nn_support_size:
        negatives += f", NN positives from {ob.nn_support_size}"
    if ob.debias_tau_plus:
        negatives += f", debiased (tau+ {ob.debias_tau_plus:g})"
    augment = f"{view_text(v)}, {c.data.augment}"
    if others and view_text(others[0]) != view_text(v):  # an asymmetric pair (BYOL-style)
        augment += f"; view 1: {view_text(others[0])}"
    augment += "".join(f"; + {w.size} px crop {w.crop_scale_min:g}-{w.crop_scale_max:g}" for w in others[1:])
    precision = f", {c.run.precision}" if c.run.precision in ("bf16", "fp16") else ""
    scaling = f" ({o.lr_scaling} scaling)" if o.lr_scaling != "none" else ""
    return {"encoder": f"{m.arch} w{m.width:g}, {stem}{precision}", "size": str(v.size), "epochs": f"{o.epochs:g}",
            "batch": str(b), "optimizer": f"{o.optimizer} {o.lr:g}{scaling}",
            "temperature": f"{ob.temperature:g}", "augment": augment, "negatives": negatives,
            "objective": objective_text(c), "bound": ob.bound}


def objective_text(c) -> str:
    """The bounds table's first column: objective, bound and the variant (NT-Xent, debiased, queue)."""
    ob = c.objective
    variant = ("NT-Xent, " if ob.intra_view_negatives else "") + (
        f"debiased (tau+ {ob.debias_tau_plus:g}), " if ob.debias_tau_plus else "") + (
        f"MoCo queue {ob.queue_size} (m={c.model.momentum:g}), " if ob.queue_size else "") + (
        f"tau {ob.smile_tau:g}, " if ob.bound == "smile" else "")
    return f"{ob.name} {ob.bound}" + (f" ({variant[:-2]})" if variant else "")


def results() -> list[dict]:
    """The recorded rows, in order; a row recorded again under its name (a rerun) replaces the earlier one."""
    rows = {}
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        rows.pop(r["name"], None)
        rows[r["name"]] = r
    return list(rows.values())


def table() -> str:
    cols = ["encoder", "size", "epochs", "batch", "optimizer", "temperature", "augment", "negatives"]
    lines = ["| recipe | " + " | ".join(cols) + " | s/epoch | scored on | linear probe | kNN k=20 | probe protocol | command |",
             "|---" * (len(cols) + 7) + "|"]
    for r in results():
        split = r.get("scored_on", "test")  # rows before the validation split scored the test split
        command = f"`recipe_study.py{' --holdout 0' if split == 'test' else ''} --name {r['name']} {' '.join(r['overrides'])}`"
        if r["config"] != BASE:
            command = command.replace("--name", f"--config {r['config']} --name")
        lines.append(f"| {r['name']} | " + " | ".join(r["recipe"][c] for c in cols)
                     + f" | {r['seconds_per_epoch']:.0f} | {split} | {100 * r['probe_top1']:.2f} | {100 * r['knn20_top1']:.2f}"
                     + f" | {r.get('probe_protocol', 'fast-v1')} | {command} |")  # rows before fast-v2 carry none
    return "\n".join(lines)


def bounds_table() -> str:
    """The "Bounds in practice" table: the demo recipe under each objective and bound (rows named bound_*, and
    the demo's own val_demo_* as InfoNCE), scored on the validation split; one line per objective, its seeds
    side by side."""
    groups: dict[str, list[dict]] = {}
    for r in results():
        if r.get("scored_on") == "validation" and r["name"].startswith(("bound_", "val_demo_")):
            groups.setdefault(r["recipe"]["objective"], []).append(r)

    def each(rows: list[dict], value) -> str:
        values = [value(r) for r in rows]
        return f"{sum(values) / len(values):.2f}" + (f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else "")

    lines = ["| objective and bound | seeds | validation probe | validation kNN k=20 | final MI estimate (nats) "
             "| its ceiling | s/epoch | diverged | command |", "|---" * 9 + "|"]
    for objective, rows in groups.items():
        ceiling = f"log K = {rows[0]['log_k']:.2f}" if rows[0]["recipe"]["bound"] == "infonce" else "none"
        bad = [r for r in rows if r["skipped_steps"] or r["loss"] is None or not math.isfinite(r["loss"])]
        diverged = "no" if not bad else "; ".join(f"seed {r['seed']}: {r['skipped_steps']} non-finite steps" for r in bad)
        mi = [r for r in rows if r["mi_estimate_nats"] is not None and math.isfinite(r["mi_estimate_nats"])]
        command = f"`recipe_study.py --config {rows[0]['config']} --name {rows[0]['name']} {' '.join(rows[0]['overrides'])}`"
        lines.append(f"| {objective} | {', '.join(str(r['seed']) for r in rows)} | {each(rows, lambda r: 100 * r['probe_top1'])} "
                     f"| {each(rows, lambda r: 100 * r['knn20_top1'])} | "
                     f"{each(mi, lambda r: r['mi_estimate_nats']) if mi else '–'} | {ceiling} | "
                     f"{each(rows, lambda r: r['seconds_per_epoch'])} | {diverged} | {command} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="row name; also runs/study/<name>")
    parser.add_argument("--config", default=BASE)
    parser.add_argument("--holdout", type=int, default=10000,
                        help="train images held out as the validation split that scores the row (0: the test split)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of all rows so far")
    parser.add_argument("--bounds-table", action="store_true", help="print the table 'Bounds in practice' (rows bound_*)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.table or args.bounds_table:
        print(bounds_table() if args.bounds_table else table())
        return
    if not args.name:
        parser.error("--name is required (or --table)")
    row = study_row(args.name, args.overrides, args.config, args.holdout)
    print(f"\nrecipe {row['name']} ({row['scored_on']} split): {row['seconds_per_epoch']} s/epoch, linear probe {100 * row['probe_top1']:.2f}%, "
          f"kNN k=20 {100 * row['knn20_top1']:.2f}%")


if __name__ == "__main__":
    main()
