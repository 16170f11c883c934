"""Paired differences over seeds: the project's rule for a finding (its 95 % interval excludes zero)."""

from __future__ import annotations

import math
import statistics

# Student's t, 97.5 % quantile, by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         25: 2.060, 30: 2.042}


def paired_difference(ours: dict[int, float], reference: dict[int, float]) -> tuple[float, float, float, int] | None:
    """Seed -> value for two arms: (mean of ours - reference over the seeds both ran, its standard error, the 95 %
    half-width from Student's t with n - 1 df, n); None with fewer than 2 shared seeds."""
    diffs = [ours[s] - reference[s] for s in sorted(ours) if s in reference]
    if len(diffs) < 2:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    t = T_975[max(d for d in T_975 if d <= len(diffs) - 1)]  # between the table's rows, the wider interval
    return statistics.fmean(diffs), se, t * se, len(diffs)


def difference_cell(d: tuple[float, float, float, int] | None, scale: float = 1.0, digits: int = 2) -> str:
    """A table cell: "+0.12 ± 0.30 (n=3, within noise)", the ± being the 95 % half-width; "–" without a pair."""
    if d is None:
        return "–"
    verdict = "finding" if abs(d[0]) > d[2] else "within noise"
    return f"{scale * d[0]:+.{digits}f} ± {scale * d[2]:.{digits}f} (n={d[3]}, {verdict})"
