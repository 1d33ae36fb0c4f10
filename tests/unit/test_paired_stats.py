"""fimlora.paired_stats: Student's t, the paired interval over seeds, McNemar on one test set."""

from __future__ import annotations

import math
import statistics

import pytest

from fimlora.paired_stats import (
    binomial_se,
    mcnemar,
    paired_bootstrap_ci,
    paired_t_interval,
    sign_flip_pvalue,
    t_quantile,
    unpaired_difference_se,
)


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 3, 3.1824), (0.975, 10, 2.2281),
     (0.975, 30, 2.0423), (0.995, 7, 3.4995), (0.9, 5, 1.4759), (0.025, 2, -4.3027)],
)  # fmt: skip
def test_t_quantile_matches_tables(q: float, df: int, expected: float) -> None:
    assert t_quantile(q, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_tends_to_the_normal_and_rejects_bad_input() -> None:
    assert t_quantile(0.975, 2000) == pytest.approx(1.95996, abs=2e-3)
    assert t_quantile(0.5, 4) == 0.0
    with pytest.raises(ValueError, match="`q`"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="`df`"):
        t_quantile(0.9, 0)


def test_paired_t_interval_by_hand() -> None:
    a, b = [0.8129, 0.8148, 0.7914], [0.8304, 0.8187, 0.8080]
    d = [x - y for x, y in zip(a, b, strict=True)]
    got = paired_t_interval(a, b)
    se = statistics.stdev(d) / math.sqrt(3)
    assert got.n == 3 and got.mean == pytest.approx(statistics.mean(d))
    assert got.low == pytest.approx(statistics.mean(d) - 4.302653 * se, abs=1e-6)
    assert got.high == pytest.approx(statistics.mean(d) + 4.302653 * se, abs=1e-6)
    assert got.low < 0 < got.high  # this demo's three seeds: not distinguishable
    one = paired_t_interval([0.8], [0.7])
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and math.isnan(one.high)


def test_sign_flip_and_bootstrap() -> None:
    assert sign_flip_pvalue([1, 2, 3], [0, 0, 0]) == 0.25  # the minimum at n = 3
    assert sign_flip_pvalue([1, 2, 3, 4, 5, 6], [0] * 6) == pytest.approx(2 / 64)
    mean, lo, hi = paired_bootstrap_ci([1, 2, 3, 4], [0, 0, 0, 0])
    assert mean == 2.5 and 1 <= lo <= hi <= 4


def test_bench_uses_the_library_statistics() -> None:
    from bench.harness import stats

    assert stats.paired_bootstrap_ci is paired_bootstrap_ci
    assert stats.sign_flip_permutation_pvalue is sign_flip_pvalue


def test_mcnemar_counts_se_and_exact_p() -> None:
    labels = [1] * 20
    a = [1] * 10 + [0] * 10  # right on the first 10
    b = [1] * 2 + [0] * 8 + [1] * 0 + [0] * 10  # right on the first 2 only
    got = mcnemar(a, b, labels)
    assert (got.only_a, got.only_b, got.n) == (8, 0, 20)
    assert got.diff == pytest.approx(0.4)
    d = [1.0] * 8 + [0.0] * 12
    assert got.se == pytest.approx(statistics.stdev(d) / math.sqrt(20))
    assert got.p_value == pytest.approx(2 / 2**8)  # all 8 discordant pairs favour a
    mixed = mcnemar([1] * 10 + [0] * 2, [0] * 10 + [1] * 2, [1] * 12)
    assert mixed.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)
    same = mcnemar([0, 1], [0, 1], [1, 1])
    assert same.p_value == 1.0 and same.diff == 0
    with pytest.raises(ValueError, match="same examples"):
        mcnemar([0], [0, 1], [0, 1])


def test_binomial_standard_errors() -> None:
    assert binomial_se(0.83, 1026) == pytest.approx(0.01173, abs=1e-5)  # "about 1.2 points"
    assert unpaired_difference_se(0.83, 0.81, 1026) == pytest.approx(
        math.sqrt(0.83 * 0.17 / 1026 + 0.81 * 0.19 / 1026)
    )
    with pytest.raises(ValueError):
        binomial_se(1.2, 10)
