"""The eval a pretraining run is followed by (``monitor.expect_eval``), reckoned before it runs.

The rows are the row planner's own (:meth:`infomax.eval.rows.Rows.plan`), planned on the export the run will
write (its config.json as far as it is known, from :meth:`infomax.train.loop.Run.planned_export`): a new row
counts here as soon as the eval plans it. Each row's :class:`~infomax.eval.progress.RowCost` says its encoder
passes and the features its probe fits on; the pretraining measures this machine's extraction speed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

from accelerate import PartialState

from infomax.data.datasets import ImageDataset
from infomax.eval.probe import GRID_EXTENSIONS
from infomax.eval.progress import RowCost, knn_seconds, probe_seconds
from infomax.eval.report import report_dir
from infomax.eval.rows import Rows
from infomax.runtime.tracking import format_duration


class EvalToCome(NamedTuple):
    """The eval config ``monitor.expect_eval`` names and its splits, opened once as the run starts."""

    cfg: Any  # an EvalConfig, its weights the export still to be written
    train: ImageDataset  # the images its probes fit on
    test: ImageDataset  # the images it scores


def load_expected_eval(path: str, export: str) -> EvalToCome:
    """The eval config at ``path``, loaded and checked for the ``export`` still to be written, and its splits
    (opened once, so a missing dataset is said before any work), or one line on what is wrong."""
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import ConfigError, load_config
    from infomax.data.datasets import DataError
    from infomax.eval.main import open_splits

    checkout = Path(__file__).resolve().parents[2]  # the shipped configs name configs/probe_*.yaml from here
    found = next((str(p) for p in (Path(path), checkout / path) if p.is_file()), None)
    if found is None:
        raise ConfigError(f"bad value for config key 'monitor.expect_eval': '{path}' is not a file (looked in the "
                          f"working directory and in {checkout}); give the eval config the export will be scored "
                          "with, or monitor.expect_eval=''")
    try:
        cfg = load_config(found, [f"weights=[{export}]"], schema=EvalConfig, check=validate_eval)
        train, test = open_splits(cfg)
    except (ConfigError, DataError) as e:  # said as the eval's, not the pretraining's, whose keys may read alike
        raise ConfigError(f"bad value for config key 'monitor.expect_eval': {e}; give the eval config the "
                          "export will be scored with, or monitor.expect_eval=''") from None
    return EvalToCome(cfg, train, test)


def check_expected_eval(plan: EvalToCome, cfg: Any) -> None:
    """Refuse now, in one line, an eval that would refuse this run's export at once (:func:`check_eval_suits_run`)."""
    check_eval_suits_run(plan.cfg, cfg, f"bad value for config key 'monitor.expect_eval': {cfg.monitor.expect_eval}")


def check_eval_suits_run(eval_cfg: Any, cfg: Any, asked: str) -> None:
    """Refuse in one line, starting with ``asked`` (who named the eval), an eval config that would refuse the export
    of the run ``cfg`` at once (as ``evaluate`` does): images of other channels than the encoder reads, or another
    validation split than the run holds out. Reads no image."""
    from infomax.config.pretrain import ConfigError
    from infomax.data.datasets import REGISTRY

    needs = 3 if cfg.data.colour_split == "lab" else REGISTRY[cfg.data.dataset].channels
    has = REGISTRY[eval_cfg.dataset].channels
    if has != needs:
        raise ConfigError(f"{asked} scores {eval_cfg.dataset}, {has}-channel images, but this run's "
                          f"encoder reads {needs}-channel {cfg.data.dataset} images; name an eval of its own dataset")
    if eval_cfg.holdout and eval_cfg.holdout != cfg.data.holdout:  # holdout=0 scores the test split: allowed
        raise ConfigError(f"{asked} has holdout={eval_cfg.holdout}, but this run holds out data.holdout="
                          f"{cfg.data.holdout}; give the eval holdout={cfg.data.holdout}")


def check_submitted_eval(eval_cfg: Any, cfg: Any, asked: str) -> None:
    """An eval chained to a pretraining job, checked as it is submitted: its splits are where its config says (a
    missing ``root`` used to fail the eval job after the days of pretraining) and it suits the run. Lists no files:
    a login node need not walk ImageNet."""
    from infomax.config.pretrain import ConfigError
    from infomax.data.datasets import REGISTRY, MissingSplit, root_named

    kind = REGISTRY[eval_cfg.dataset]
    try:
        with root_named("root"):
            for split in ("train",) if eval_cfg.holdout else ("train", "test"):
                kind.find(split, eval_cfg.root)
    except MissingSplit as e:
        raise ConfigError(f"{asked}: {e}; pass it as --eval-override root=...") from None
    check_eval_suits_run(eval_cfg, cfg, asked)


def planned_costs(plan: EvalToCome, meta: dict[str, Any]) -> list[RowCost]:
    """What each row the eval will compute costs, planned on the export's config.json ``meta``."""
    cfg, export = plan.cfg, str(plan.cfg.weights[0])
    rows = Rows(cfg, PartialState(), plan.train, plan.test, meta["input_size"][-1], report_dir(cfg.out, [export]),
                fit_key="")
    views = [(entry, None) for entry in meta.get("view_encoders", [])]
    return [r.cost() for r in rows.plan([(export, None, meta)], {export: views}, None) if not r.quoted]


def expected_eval_seconds(plan: EvalToCome, meta: dict[str, Any],
                          extract_seconds_per_image: float) -> tuple[float, str]:
    """The eval of the export ``meta`` describes (``plan``: the eval to come), reckoned before it runs:
    (seconds, how). Each planned row extracts the fit and scored images once per encoder pass at
    ``extract_seconds_per_image``, fits a probe on its features (:func:`probe_seconds`, at its most fits) and
    votes the kNN (:func:`knn_seconds`); a supervised fit still to train adds its own expected time."""
    cfg, n, c = plan.cfg, len(plan.train), plan.train.num_classes
    images = n + len(plan.test)
    # Every fit the probe may make: the grid, the decades beyond it when its choice sits at an edge (measured:
    # 2 more for a random init and 1 for raw pixels on Fashion-MNIST, and 0 or 1 for ours), and the refit.
    fits = len(cfg.weight_decays) + GRID_EXTENSIONS + 1

    @functools.cache  # ours and its random init have the same features: timed once
    def fitted(features: int) -> float:  # a probe and the kNN votes on n x features, then on each label fraction's
        return sum(probe_seconds(m, features, c, fits, cfg.probe_steps) + knn_seconds(m, len(plan.test), features,
                                                                                      cfg.knn_k, c)
                   for m in (n, *(max(1, round(f * n)) for f in cfg.label_fractions)))

    costs = planned_costs(plan, meta)
    probed = [cost for cost in costs if cost.features]
    passes = sum(cost.passes for cost in costs)
    supervised = sum(cost.fit_seconds or 0.0 for cost in costs)
    seconds = passes * images * extract_seconds_per_image + sum(fitted(cost.features) for cost in probed) + supervised
    fit_line = f", supervised fits of about {format_duration(supervised)}" if supervised else "; stored baselines"
    return seconds, (f"{len(probed)} rows: {passes} x {images} images to extract at "
                     f"{1000 * extract_seconds_per_image:.2f} ms, {len(probed)} probes of up to {fits} fits and "
                     f"kNN votes{fit_line}")
