"""Eval entry point: frozen exported encoders -> linear probe + kNN, next to the AlexNet baselines -> report.

    python eval/main.py --config configs/probe_fmnist.yaml weights=runs/fmnist_cpu/export
    accelerate launch eval/main.py --config configs/probe_imagenet.yaml 'weights=[runs/a/export,runs/b/export]'

Reads only exported artefacts (encoder.safetensors + config.json), never training code paths.
Rows: each encoder, a random-init encoder of the same architecture, raw pixels (small images),
supervised AlexNet trained here, AlexNet conv1..5 probes (given a weights file), published figures;
``infomax.eval.rows.Rows.plan`` chooses them from the config as one list, which :func:`evaluate` counts, runs and
reports in one loop (adding a row touches that list and its test, nothing here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

PROTOCOLS = {
    "fast": "fast-v2: frozen encoder (eval mode), resize + centre crop, standardised cached features, "
            "L-BFGS logistic regression warm-started along the weight-decay path, weight decay chosen on 10% of train",
    "imagenet": "imagenet-v1: frozen encoder and BN, RandomResizedCrop + flip, linear head, SGD momentum 0.9, "
                "lr drops x0.1 at the milestones, weight decay 0; resize + centre crop for scoring",
}
KNN = "kNN: cosine similarity, temperature-weighted votes over the cached train features"


def open_splits(cfg: Any) -> tuple[Any, Any]:
    """(the images the probes fit on, the images they are scored on) for an eval config: the train and
    test splits, or with ``holdout`` the rest of train and its validation images (the test split then
    stays unread: it is for the final figure), each cut to ``limit_train`` / ``limit_test``."""
    from infomax.config.pretrain import ConfigError
    from infomax.data.beton_file import BetonInfo
    from infomax.data.datasets import ONE_CLASS_HINT, holdout_split, missing_classes, open_configured, stratified_subset

    def split(name: str):
        ds = open_configured(cfg, name, key_prefix="")
        if len(ds) == 0:
            raise ConfigError(f"the {name} split of {cfg.dataset} is empty: check root")
        return ds

    for key in ("train_beton", "test_beton"):  # a .beton of another dataset would be scored under this one's name
        if getattr(cfg, key):
            BetonInfo(getattr(cfg, key), key).require_dataset(cfg.dataset, key, "dataset")
    whole = split("train")
    if whole.num_classes < 2:  # every prediction would be right: scores of 100 % that say nothing
        raise ConfigError(f"the train split of {cfg.dataset} holds {whole.num_classes} class: the eval scores classes "
                          f"and needs 2 or more; {ONE_CLASS_HINT}")
    train, test = holdout_split(whole, cfg.holdout, "holdout") if cfg.holdout else (whole, split("test"))
    cut = [(train, cfg.limit_train), (test, cfg.limit_test)]
    train, test = (stratified_subset(ds, n) if n else ds for ds, n in cut)
    if missing := missing_classes(train, test):  # each subset holds every class in proportion: only a tiny one lacks
        raise ConfigError(f"bad value for config key 'limit_train': its {len(train)} images hold none of class(es) "
                          f"{', '.join(map(str, missing[:10]))} that the scored images hold, so no probe could predict "
                          f"them; raise it to at least the {train.num_classes} classes")
    return train, test


def evaluate(cfg: Any) -> list[dict[str, Any]]:
    """Compute every row of the report; returns the rows (also written to the report files). Reads as a table of
    contents: the exports and data, checked before any work; the processes and the rows; the outputs."""
    import torch

    from infomax.config.pretrain import to_yaml
    from infomax.eval.baselines import load_alexnet_features
    from infomax.eval.rows import Rows
    from infomax.eval.stored_baselines import scored_split
    from infomax.export.encoder import load_encoder, load_view_encoders
    from infomax.runtime.distributed import make_accelerator
    from infomax.runtime.revision import git_revision
    from infomax.runtime.stop import StopFlag

    exports = [(w, *load_encoder(w)) for w in cfg.weights]  # (path, encoder, meta); checks sha256 and keys
    view_encoders = {w: load_view_encoders(w, meta) for w, _, meta in exports}  # CMC's ab encoder, if any
    alexnet_trunk = load_alexnet_features(cfg.baselines.alexnet_weights) if cfg.baselines.alexnet_weights else None
    train, test = open_splits(cfg)
    check_exports(cfg, exports, train.channels)
    size = exports[0][2]["input_size"][-1] if exports else cfg.image_size  # rows without an export (AlexNet, pixels)
    out = writable_out(cfg, exports)

    accelerator, precision = make_accelerator(cfg.seed, cfg.precision, cfg.dist_timeout_min, precision_key="precision")
    torch.manual_seed(cfg.seed)
    fit_key = to_yaml(cfg) + "".join(m["sha256"] for _, _, m in exports)  # a fit's checkpoints belong to these
    make = Rows(cfg, accelerator, train, test, size, out, fit_key, StopFlag().install())
    plan = make.plan(exports, view_encoders, alexnet_trunk)  # every row, in the report's order
    computed = [r for r in plan if not r.quoted]
    accelerator.print(f"eval: {len(train)} train / {len(test)} scored images ({scored_split(cfg.holdout)}) of "
                      f"{cfg.dataset}, protocol {cfg.protocol}, {len(computed)} rows to compute on "
                      f"{accelerator.num_processes} process(es): {', '.join(r.name for r in computed)}")
    # a kept row belongs to this config and these weights, and to the code and the way that scored it
    rows = run_rows(plan, make.stop, accelerator, out,
                    f"{fit_key} {git_revision()} {precision.mode} {accelerator.num_processes}")
    write_outputs(cfg, rows, exports, accelerator, precision, out, len(train), len(test))
    return rows


def check_exports(cfg: Any, exports: list[tuple[str, Any, dict]], channels: int) -> None:
    """Refuse, before any work, an export this eval cannot score fairly: another validation split than it was held
    out of, or images of other channels than it reads."""
    from infomax.config.pretrain import ConfigError

    for w, _, meta in exports:
        trained_holdout = int((meta.get("summary") or {}).get("holdout") or 0)
        if cfg.holdout and trained_holdout != cfg.holdout:
            raise ConfigError(
                f"bad value for config key 'holdout': '{w}' was pretrained with data.holdout={trained_holdout}, so "
                f"holdout={cfg.holdout} would not score the images it was held out of; give holdout={trained_holdout}"
                if trained_holdout else f"bad value for config key 'holdout': '{w}' was pretrained on every train "
                f"image (data.holdout=0), so a validation split would score images it trained on; pretrain with "
                f"data.holdout={cfg.holdout} or score the test split (holdout=0)")
        needs = 3 if meta.get("input_transform") == "lab_L" else meta["in_chans"]
        if needs != channels:
            raise ConfigError(f"'{w}' expects {needs}-channel images but {cfg.dataset} has {channels}; "
                              "evaluate it on the dataset it was trained for")


def writable_out(cfg: Any, exports: list) -> Path:
    """Where the report, the kept rows and the fits' checkpoints go (``out``, else the first export's run dir or
    folder: :func:`~infomax.eval.report.report_dir`), checked writable before any row is computed."""
    from infomax.config.pretrain import ConfigError
    from infomax.eval.report import report_dir
    from infomax.runtime.run_dir import ensure_writable

    out = report_dir(cfg.out, [str(w) for w, *_ in exports])
    try:
        ensure_writable(out)
    except OSError as e:
        raise ConfigError(f"bad value for config key 'out': '{out}' is not a writable directory ({e.strerror}), so "
                          "the report could not be written; fix its permissions or give out=DIR") from None
    return out


def run_rows(plan: list, stop: Any, accelerator: Any, out: Path, key: str) -> list[dict[str, Any]]:
    """Each planned row in order: reused when an earlier run of this eval kept it, else computed and kept, with a
    progress line after each; a stop signal ends the loop before the next row (every rank at the same one)."""
    from infomax.eval.progress import RowClock
    from infomax.eval.row_cache import RowCache
    from infomax.eval.rows import Stopped
    from infomax.runtime.distributed import agree_max
    from infomax.runtime.stop import SecondCtrlC

    computed = [r for r in plan if not r.quoted]
    cache = RowCache(out / "rows", key, accelerator.is_main_process)
    clock = RowClock.for_rows([r.cost() for r in computed], accelerator.print)
    rows: list[dict[str, Any]] = []
    try:
        for builder in plan:
            if builder.quoted:
                rows.append(builder.build())
                continue
            if stop.agreed(*agree_max(accelerator.device, *stop.votes())):
                raise Stopped.by(stop, f"after {cache.kept} of {len(computed)} rows")
            key = f"{len(rows)}:{builder.name}"  # its place in the plan too: two exports may share a name
            row = cache.get(key, accelerator)
            if row is not None:
                rows.append(clock.reused(row))
                continue
            row = builder.build()
            cache.put(key, row)
            rows.append(clock.done(row))
    except Stopped as e:  # between rows, or a fit stopped with its checkpoint saved
        raise Stopped(f"{e}; {kept_line(cache)}", e.signal_name) from None
    except SecondCtrlC:
        raise SecondCtrlC(f"stopped by a second Ctrl-C after {cache.kept} of {len(computed)} rows; "
                          f"{kept_line(cache)}") from None
    return rows


def write_outputs(cfg: Any, rows: list[dict[str, Any]], exports: list, accelerator: Any, precision: Any, out: Path,
                  train_images: int, test_images: int) -> None:
    """Each row's difference to the supervised AlexNet, then (main process) the report and every export's model
    card."""
    from infomax.config.pretrain import to_yaml
    from infomax.eval.label_fractions import describe_fractions
    from infomax.eval.report import write_report
    from infomax.eval.stored_baselines import scored_split
    from infomax.export.encoder import export_dir_of
    from infomax.export.model_card import add_eval
    from infomax.runtime.hardware import describe_machine

    reference, quoted = alexnet_reference(cfg, rows)
    add_deltas(rows, reference)
    if accelerator.is_main_process:
        fractions = describe_fractions(list(cfg.label_fractions), cfg.seed)
        meta = {"dataset": cfg.dataset, "protocol": PROTOCOLS[cfg.protocol].split(":")[0],
                "protocol_description": f"{PROTOCOLS[cfg.protocol]}. {KNN}.{fractions}", "seed": cfg.seed,
                "train_images": train_images, "test_images": test_images, "scored_on": scored_split(cfg.holdout),
                "processes": accelerator.num_processes,
                "precision": precision.mode, "precision_reason": precision.reason, "machine": describe_machine(),
                "alexnet_reference_top1": reference,
                "alexnet_reference": None if reference is None else "quoted" if quoted else "measured",
                "config": to_yaml(cfg),
                "train_step": int((exports[0][2].get("summary") or {}).get("steps") or 0) if exports else 0}
        table = write_report(out, rows, meta, sorted({min(k, train_images) for k in cfg.knn_k}))  # the k each used
        print(f"\n{table}\n\nreport: {out / 'report.md'}  {out / 'report.json'}  {out / 'report.png'}", flush=True)
        partial = partial_eval(cfg)  # a quick look or a recipe's choice would replace the test split's scores
        if partial and exports:
            print(f"the model card(s) are left as they are: this eval scored {partial}, and a card shows scores of "
                  "the whole test split", flush=True)
        scored = (f"On {cfg.dataset} ({train_images} train images; scored on the {scored_split(cfg.holdout)}, "
                  f"{test_images} images), {PROTOCOLS[cfg.protocol]}. {KNN}.{fractions}")
        for card_dir in [] if partial else [export_dir_of(w) for w, _, _ in exports]:  # each card shows its scores
            try:
                add_eval(card_dir, table, scored, out / "report.md")
            except OSError as e:  # an export read from a read-only place: the report holds every score
                print(f"note: the model card in '{card_dir}' was not updated ({e.strerror or e}); the report holds "
                      "the scores", flush=True)
    accelerator.wait_for_everyone()


def partial_eval(cfg: Any) -> str:
    """What this eval scored when it is not the whole test split with every train image ('' when it is)."""
    parts = [f"the validation images held out of train (holdout={cfg.holdout})" if cfg.holdout else "",
             f"limit_train={cfg.limit_train}" if cfg.limit_train else "",
             f"limit_test={cfg.limit_test}" if cfg.limit_test else ""]
    return ", ".join(p for p in parts if p)


def alexnet_reference(cfg: Any, rows: list[dict[str, Any]]) -> tuple[float | None, bool]:
    """(the supervised AlexNet top-1 every row is compared with, whether it is the quoted figure): the measured
    row's, else the quoted ImageNet figure on an image folder (ImageNet's protocol) with ``baselines.published``;
    on other data no quoted figure is a reference."""
    from infomax.eval.baselines import REFERENCE_ALEXNET_TOP1

    measured = [r["top1"] for r in rows if r["kind"] == "alexnet_supervised"]
    if measured:
        return measured[0], False
    quoted = bool(cfg.baselines.published) and cfg.dataset == "imagefolder"
    return (REFERENCE_ALEXNET_TOP1 if quoted else None), quoted


def add_deltas(rows: list[dict[str, Any]], reference: float | None) -> None:
    """Each row's top-1 points against the supervised AlexNet (``reference``) and against the fair reference, its own
    export's architecture trained with labels (``export_sha256`` pairs an export's rows with its supervised row)."""
    same_arch = {r.get("export_sha256"): r["top1"] for r in rows if r["kind"] == "supervised_encoder"}
    for r in rows:
        compared = reference is not None and r["kind"] != "alexnet_supervised" and r["top1"] is not None
        r["delta_vs_alexnet"] = r["top1"] - reference if compared else None
        supervised = same_arch.get(r.get("export_sha256")) if r["kind"] in ("ours", "random_init") else None
        r["delta_vs_supervised"] = r["top1"] - supervised if supervised is not None and r["top1"] is not None else None


def kept_line(cache: Any) -> str:
    """What a stopped eval kept, and how to go on."""
    kept = f"the {cache.kept} scored row(s) are kept in {cache.directory}" if cache.kept else "no row was scored yet"
    return f"{kept}; rerun the same command to go on (a fit stopped mid-way resumes from its checkpoint)"


def main(argv: Sequence[str] | None = None) -> int:
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import ConfigError, load_config
    from infomax.data.datasets import DataError
    from infomax.eval.classifier import NothingToTrain
    from infomax.eval.features import EncoderChanged
    from infomax.eval.rows import Stopped
    from infomax.runtime.checkpoint import SECOND_CTRL_C, CheckpointError, SaveInterrupted
    from infomax.runtime.stop import SecondCtrlC

    parser = argparse.ArgumentParser(description="Linear probe + kNN of frozen exported encoders, beside AlexNet.")
    parser.add_argument("--config", help="YAML with differences from the eval defaults (configs/probe_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. weights=runs/x/export")
    args = parser.parse_args(argv)
    # `weights=a` means one export; `weights=[a,b]` several (the schema field is a list).
    overrides = [f"weights=[{o[8:]}]" if o.startswith("weights=") and not o[8:].startswith("[") else o
                 for o in args.overrides]
    try:
        cfg = load_config(args.config, overrides, schema=EvalConfig, check=validate_eval)
        evaluate(cfg)
    except (ConfigError, DataError, EncoderChanged, NothingToTrain) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SaveInterrupted, SecondCtrlC) as e:  # a second Ctrl-C: the user would not wait for the save
        print(f"error: {str(e) or SECOND_CTRL_C}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the stop handler was installed
        print("error: stopped by Ctrl-C while starting, before any row was scored; rerun the same command to start",
              file=sys.stderr)
        return 130
    except CheckpointError as e:  # every checkpoint of a fit damaged, or the disk full at a save
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"eval {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. state-dict key mismatch between config.json and the weights
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        # torch's first line only says "Error(s) in loading state_dict for ResNet:"; the next names the keys
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        print(f"error: the weights do not match the architecture in config.json: {detail[:400]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
