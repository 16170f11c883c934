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


def test_queue_rows_show_the_negative_score_gap_and_shuffled_bn_against_the_plain_queue(tmp_path) -> None:
    import recipe_study
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))  # a run's log: the last 50 of 60 logged steps are averaged
    for step in range(60):
        writer.add_scalar("monitor/neg_score_batch", 0.0 if step < 10 else 1.0, step)
        writer.add_scalar("monitor/neg_score_queue", 2.0, step)
    writer.close()
    assert recipe_study.logged_means(tmp_path, recipe_study.NEGATIVE_SCORES, last=50) == {
        "neg_score_batch": pytest.approx(1.0), "neg_score_queue": pytest.approx(2.0)}
    assert recipe_study.logged_means(tmp_path, {"mi": "train/mi"}, last=50) == {}  # never logged: left out

    def row(seed: int, probe: float, batch: float, queue: float) -> dict:
        return {"seed": seed, "probe_top1": probe, "knn20_top1": 0.87, "neg_score_batch": batch,
                "neg_score_queue": queue}

    plain, shuffled = "infonce (MoCo queue 4096)", "infonce (MoCo queue 4096, shuffled BN in 2 groups)"
    groups = {"infonce": [row(s, 0.9, 0.0, 0.0) for s in range(3)],
              plain: [row(s, 0.89, 0.1, -1.0 - s / 100) for s in range(3)],
              shuffled: [row(s, 0.90 + s / 1000, 0.1, 0.1) for s in range(3)]}
    lines = recipe_study.queue_table(groups).splitlines()
    plain_line, shuffled_line = (next(x for x in lines if x.startswith(f"| {o} |")) for o in (plain, shuffled))
    assert "| -1.010 | -1.110 ± 0.025 (n=3, finding) | – | – | – |" in plain_line  # queue keys scored far below
    assert "| 0.100 | +0.000 ± 0.000 (n=3, within noise) | +1.110 ± 0.025 (n=3, finding) |" in shuffled_line
    assert shuffled_line.endswith("| +1.10 ± 0.25 (n=3, finding) | +0.00 ± 0.00 (n=3, within noise) |")
    assert not any(line.startswith("| infonce |") for line in lines)  # no queue, no row
