"""The small statistics of bench.ablations: rank correlations and the paired counts of its reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.ablations import paired_counts
from fimlora.rankmap import kendall_tau_b, spearman


def test_spearman_and_kendall_on_known_orders() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    assert math.isnan(kendall_tau_b([2, 2, 2], [1, 2, 3]))


def test_paired_counts_skip_undefined_seeds() -> None:
    nan = float("nan")
    assert paired_counts([0.9, 0.95, 0.97], [0.99, 0.95, 0.90]) == (1, 1, 1)
    # a constant batch map (all scores zero at T = 1 for the variance) is not a loss for per-example
    assert paired_counts([nan, nan, 0.5], [0.9, 0.8, 0.7]) == (1, 0, 0)
    assert paired_counts([nan, nan], [0.9, 0.8]) == (0, 0, 0)


def test_rank_statistics_take_float_scores_with_ties() -> None:
    # ranks of a: 1.5, 1.5, 3; hand-computed rho = 1.5 / sqrt(1.5 * 2); one pair tied in a, two concordant
    assert spearman([0.1, 0.1, 0.3], [1.0, 2.0, 3.0]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert kendall_tau_b([0.1, 0.1, 0.3], [1.0, 2.0, 3.0]) == pytest.approx(2 / math.sqrt(2 * 3))
    assert math.isnan(spearman([], []))
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2, 3], [1, 2])


def test_committed_contribution_correlations_are_reproduced_exactly() -> None:
    """The published correlations (computed by bench's former copies) come out bit for bit from fimlora."""
    path = Path(__file__).resolve().parents[2] / "docs" / "results" / "ablations" / "contribution.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    rows = payload["modules"]
    scores = [r["score"] for r in rows]
    drops = [r["accuracy_drop"] for r in rows]
    rises = [r["loss_rise"] for r in rows]
    assert payload["correlations"] == {
        "spearman_score_vs_accuracy_drop": spearman(scores, drops),
        "spearman_score_vs_loss_rise": spearman(scores, rises),
        "kendall_score_vs_loss_rise": kendall_tau_b(scores, rises),
        "spearman_rank_vs_loss_rise": spearman([r["rank"] for r in rows], rises),
    }
