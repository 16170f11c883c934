"""The eval stage's progress: a line after each row (what it scored, how long it took) with the
expected time left, so a user of `make demo` knows when the table comes.

The expectation is the measured cost of the rows so far. The supervised fits that are still ahead are
estimated from the export's own pretraining speed: one supervised step (one view, forward and
backward) costs about half a pretraining step (two views and the objective): 0.43 was measured on
the native-bf16 CPU and 0.51 under the AVX2 emulation (benchmarks/README.md, "Eval stage"); the
fit's own progress line takes over once it runs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pretrain.tracking import format_duration

SUPERVISED_STEP_PER_PRETRAIN_STEP = 0.5


def pretrain_step_seconds(meta: dict) -> float:
    """Seconds per pretraining step in the export's own run (0 when its summary does not say)."""
    summary = meta.get("summary") or {}
    steps, seconds = summary.get("steps_this_run") or 0, summary.get("pretrain_seconds") or 0
    return float(seconds) / steps if steps else 0.0


class RowClock:
    """Times each row and prints, after it, what the row scored and the expected time left.

    ``scored_rows``: the rows still to run that extract features and fit a probe (not stored or quoted
    rows); ``fit_seconds``: the expected training time of each supervised-encoder fit among them."""

    def __init__(self, scored_rows: int, fit_seconds: list[float], print_fn: Callable[[str], None]) -> None:
        self.rows_left, self.fits_left, self.print = scored_rows, list(fit_seconds), print_fn
        self.row_seconds: list[float] = []  # each scored row's own cost: features, probe, kNN
        self.last = time.perf_counter()

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
