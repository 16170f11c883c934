"""The studies' statistics (benchmarks/studies/paired.py): a difference is a finding only when its paired 95 %
interval over seeds excludes zero."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "studies"))
from paired import difference_cell, paired_difference  # noqa: E402


def test_paired_difference_pairs_by_seed_with_students_t() -> None:
    ours, reference = {0: 0.90, 1: 0.88, 2: 0.91, 7: 0.5}, {0: 0.89, 1: 0.86, 2: 0.89, 3: 0.1}
    mean, se, half, n = paired_difference(ours, reference)
    diffs = [0.01, 0.02, 0.02]  # seeds 0-2, the ones both ran: 7 and 3 have no partner
    assert n == 3 and mean == pytest.approx(sum(diffs) / 3)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert se == pytest.approx(sd / math.sqrt(3)) and half == pytest.approx(4.303 * se)  # t(0.975, 2 df)
    assert paired_difference({0: 1.0}, {0: 0.0}) is None  # one pair: no interval
    many = {s: s % 2 * 0.01 for s in range(23)}
    assert paired_difference(many, {s: 0.0 for s in range(23)})[2] == pytest.approx(
        2.086 * paired_difference(many, {s: 0.0 for s in range(23)})[1])  # 22 df: the table's 20 row, the wider


def test_a_difference_is_a_finding_only_when_its_interval_excludes_zero() -> None:
    assert difference_cell((0.012, 0.002, 0.0086, 3), 100) == "+1.20 ± 0.86 (n=3, finding)"
    assert difference_cell((0.012, 0.004, 0.0172, 3), 100) == "+1.20 ± 1.72 (n=3, within noise)"
    assert difference_cell(None) == "–"
