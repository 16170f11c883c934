"""The eval stage's progress: a line after each row (what it scored, how long it took) with the
expected time left, so a user of `make demo` knows when the table comes.

The expectation is the measured cost of the rows so far. The supervised fits that are still ahead are
estimated from the export's own pretraining speed: one supervised step (one view, forward and
backward) costs about half a pretraining step (two views and the objective): 0.43 was measured on
the native-bf16 CPU and 0.51 under the AVX2 emulation (benchmarks/results/eval_stage.md); the
fit's own progress line takes over once it runs.

Before the eval runs, :mod:`infomax.eval.expected` reckons it from the pretraining's own measurements and
these timings, so that a run followed by an eval (``monitor.expect_eval``, as the demo is) prints the whole
expected duration after its first steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch

from infomax.runtime.tracking import format_duration

SUPERVISED_STEP_PER_PRETRAIN_STEP = 0.5


def pretrain_step_seconds(meta: dict) -> float:
    """Seconds per pretraining step in the export's own run (0 when its summary does not say)."""
    summary = meta.get("summary") or {}
    steps, seconds = summary.get("steps") or 0, summary.get("pretrain_seconds") or 0  # both over every resume
    return float(seconds) / steps if steps else 0.0


def _timed(fn: Callable[[], Any]) -> float:
    """The median seconds of three calls of ``fn`` after a warm-up call."""
    times = []
    for _ in range(4):  # the first warms up
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def probe_seconds(n: int, features: int, num_classes: int, fits: int, steps: int) -> float:
    """Expected seconds of the fast probe (:func:`infomax.eval.probe.linear_probe`) on n x ``features`` features:
    one loss-and-gradient pass timed here on random features (at most 8192 rows, scaled to n), times the
    passes L-BFGS may make in each of ``fits`` fits (torch's max_eval: 1.25 x ``steps``)."""
    from infomax.eval.probe import loss_and_grad

    rows = max(1, min(n, 8192))
    x, y = torch.randn(rows, features), torch.randint(num_classes, (rows,))
    model = torch.nn.Linear(features, num_classes)
    return _timed(lambda: loss_and_grad(model, x, y, 0.0)) * n / rows * 1.25 * steps * fits


def knn_seconds(bank: int, queries: int, features: int, ks: Sequence[int], num_classes: int) -> float:
    """Expected seconds of the eval's kNN (:func:`infomax.features.knn.knn_predict_many`) of ``queries`` against a bank
    of ``bank`` x ``features``: one chunk of its queries against at most 16384 bank rows, timed here on random
    features and scaled to all of them (each timed call also normalises its bank, which the eval does once)."""
    from infomax.features.knn import QUERY_CHUNK, knn_predict_many

    if not ks:
        return 0.0
    chunk, rows = max(1, min(queries, QUERY_CHUNK)), max(max(ks), min(bank, 16384))
    b, q, labels = torch.randn(rows, features), torch.randn(chunk, features), torch.randint(num_classes, (rows,))
    return _timed(lambda: knn_predict_many(b, labels, q, ks, 0.07, num_classes)) * queries / chunk * bank / rows


class RowCost(NamedTuple):
    """What a row costs, as :class:`RowClock` reckons the time left: ``scored``, it extracts features and fits
    a probe here, so its time is among those the rows left are reckoned by (not a stored result, nor the
    supervised AlexNet, whose fit shows its own progress); ``fit_seconds``, the expected training time of a
    supervised fit it runs first (None: it runs none)."""

    scored: bool = True
    fit_seconds: float | None = None
    passes: int = 0  # encoder passes over every fit and scored image (CMC's concatenated views: one per view)
    features: int = 0  # the features its probe and kNN fit on (0: it fits none)


class RowClock:
    """Times each row and prints, after it, what the row scored and the expected time left.

    ``scored_rows``: the rows still to run that extract features and fit a probe (not stored or quoted
    rows); ``fit_seconds``: the expected training time of each supervised-encoder fit among them."""

    def __init__(self, scored_rows: int, fit_seconds: list[float], print_fn: Callable[[str], None]) -> None:
        self.rows_left, self.fits_left, self.print = scored_rows, list(fit_seconds), print_fn
        self.row_seconds: list[float] = []  # each scored row's own cost: features, probe, kNN
        self.last = time.perf_counter()

    @classmethod
    def for_rows(cls, costs: Sequence[RowCost], print_fn: Callable[[str], None]) -> "RowClock":
        """The clock of the rows still to compute, from what each costs (``infomax.eval.rows.RowBuilder.cost``)."""
        return cls(sum(c.scored for c in costs), [c.fit_seconds for c in costs if c.fit_seconds is not None],
                   print_fn)

    def reused(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row an earlier run of this eval kept: said as such, and no longer among the rows (or fits) left; its
        time, zero here, is not one the rows left are reckoned by."""
        self.last = time.perf_counter()
        self.print(f"eval: {row['name']}: top-1 {row['top1']:.2%} (kept from an earlier run of this eval)")
        if not row.get("stored") and (row.get("probe_seconds") is not None or row.get("protocol") == "imagenet"):
            self.rows_left -= 1
            if row["kind"] == "supervised_encoder":
                del self.fits_left[:1]
        return row

    def done(self, row: dict[str, Any]) -> dict[str, Any]:
        """Call right after computing ``row``; prints its score and the time left, returns it."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        knn = "".join(f", kNN k={k} {v:.2%}" for k, v in list((row.get("knn") or {}).items())[:1])
        self.print(f"eval: {row['name']}: top-1 {row['top1']:.2%}{knn} ({format_duration(seconds)})")
        if row.get("stored") or (row.get("probe_seconds") is None and row.get("protocol") != "imagenet"):
            return row  # stored or quoted: no features, no probe
        if row["kind"] == "supervised_encoder":
            seconds -= float(row["wall_s"])  # its fit; what is left is scoring, as for any row
            del self.fits_left[:1]
        self.row_seconds.append(seconds)
        self.rows_left -= 1
        if self.rows_left > 0:
            mean = sum(self.row_seconds) / len(self.row_seconds)
            fits = f", and {len(self.fits_left)} supervised fit(s) of about {format_duration(sum(self.fits_left))}" \
                if self.fits_left else ""
            self.print(f"expected: eval ends in about {format_duration(self.rows_left * mean + sum(self.fits_left))} "
                       f"({self.rows_left} row(s) to score at {format_duration(mean)} each{fits})")
        return row
