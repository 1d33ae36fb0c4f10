"""The small statistics of bench.ablations: rank correlations and the paired counts of its reports."""

from __future__ import annotations

import math

import pytest

from bench.ablations import kendall, paired_counts, spearman


def test_spearman_and_kendall_on_known_orders() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    assert math.isnan(kendall([2, 2, 2], [1, 2, 3]))


def test_paired_counts_skip_undefined_seeds() -> None:
    nan = float("nan")
    assert paired_counts([0.9, 0.95, 0.97], [0.99, 0.95, 0.90]) == (1, 1, 1)
    # a constant batch map (all scores zero at T = 1 for the variance) is not a loss for per-example
    assert paired_counts([nan, nan, 0.5], [0.9, 0.8, 0.7]) == (1, 0, 0)
    assert paired_counts([nan, nan], [0.9, 0.8]) == (0, 0, 0)
