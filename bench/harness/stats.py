"""Paired statistics for comparing a method with a baseline over seeds (pure numpy).

Runs of two methods that share a seed share data order and initialisation noise, so we compare them in
pairs: d_i = a_i - b_i. The tools are the percentile bootstrap of mean(d) (Efron & Tibshirani, 1993,
ch. 13) and the sign-flip permutation test of mean(d) = 0 (Fisher's randomisation test for paired data),
exact by enumerating all 2^n sign patterns when n <= 16 and Monte Carlo otherwise, with the
(1 + hits) / (1 + draws) estimate of Phipson & Smyth (2010) so a p-value is never exactly 0.

A method "wins" on a task when the whole bootstrap CI of its mean improvement is above zero (or above
``tol``), "loses" when the whole CI is below, and "ties" otherwise.

Caveat: with very few seeds the percentile bootstrap is anti-conservative (n = 3 has only 10 distinct
resample means, so the CI can exclude 0 although the exact sign-flip p is 0.25, its minimum at n = 3).
Read the verdict together with the p-value, and use >= 5 seeds for claims; the exact test cannot go
below p = 2 / 2^n, so p < 0.05 needs n >= 6.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy.typing as npt

# The bootstrap and the sign-flip test live in the library, which the reports share with the benchmark.
from fimlora.paired_stats import EXACT_PERMUTATION_MAX_N, as_finite_1d, paired_bootstrap_ci
from fimlora.paired_stats import sign_flip_pvalue as sign_flip_permutation_pvalue

__all__ = [
    "EXACT_PERMUTATION_MAX_N",
    "WinTieLoss",
    "classify_paired",
    "mean_std",
    "paired_bootstrap_ci",
    "sign_flip_permutation_pvalue",
    "win_tie_loss",
]


Verdict = Literal["win", "tie", "loss"]


class WinTieLoss(NamedTuple):
    """Counts of tasks a method wins, ties and loses against a baseline."""

    wins: int
    ties: int
    losses: int


def mean_std(values: Sequence[float] | npt.ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1).

    Args:
        values: Shape (n,), n >= 1.

    Returns:
        ``(mean, std)``. For n = 1 the sample std is undefined and returned as ``nan`` (not 0.0, which
        would claim a single seed has no variance); reports render it as missing.
    """
    array = as_finite_1d(values, "values")
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return mean, std


def classify_paired(
    a: Sequence[float] | npt.ArrayLike,
    b: Sequence[float] | npt.ArrayLike,
    *,
    tol: float | None = None,
    higher_is_better: bool = True,
    n_boot: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Verdict:
    """Classify method ``a`` against baseline ``b`` on one task from the paired bootstrap CI.

    Args:
        a: Method scores over seeds, shape (n,).
        b: Baseline scores over the same seeds, shape (n,).
        tol: Margin of practical equivalence (metric units): a win needs the CI above ``+tol``, a loss
            below ``-tol``. ``None`` means 0.
        higher_is_better: ``False`` for metrics such as loss or perplexity.
        n_boot: Bootstrap resamples.
        alpha: CI level.
        seed: Bootstrap RNG seed.

    Returns:
        ``"win"``, ``"tie"`` or ``"loss"``; always ``"tie"`` when the CI is undefined (n = 1).
    """
    margin = 0.0 if tol is None else float(tol)
    if margin < 0:
        raise ValueError(f"`tol` must be >= 0, got {tol}")
    _, lower, upper = paired_bootstrap_ci(a, b, n_boot=n_boot, alpha=alpha, seed=seed)
    if not higher_is_better:
        lower, upper = -upper, -lower
    # NaN comparisons are False, so an undefined CI falls through to "tie".
    if lower > margin:
        return "win"
    if upper < -margin:
        return "loss"
    return "tie"


def win_tie_loss(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    *,
    tol: float | None = None,
    higher_is_better: bool = True,
    n_boot: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> WinTieLoss:
    """Count tasks where method ``a`` wins, ties and loses against baseline ``b``.

    Args:
        a: Task -> method scores over seeds.
        b: Task -> baseline scores over the same seeds (same order); must have the same tasks as ``a``.
        tol: See :func:`classify_paired`.
        higher_is_better: See :func:`classify_paired`.
        n_boot: Bootstrap resamples per task.
        alpha: CI level.
        seed: Bootstrap RNG seed (same for every task, so results are reproducible).

    Returns:
        :class:`WinTieLoss` counts; they sum to the number of tasks.
    """
    if set(a) != set(b):
        raise ValueError(f"`a` and `b` must cover the same tasks; differ on {sorted(set(a) ^ set(b))}")
    counts = {"win": 0, "tie": 0, "loss": 0}
    for task in sorted(a):
        verdict = classify_paired(
            a[task],
            b[task],
            tol=tol,
            higher_is_better=higher_is_better,
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
        )
        counts[verdict] += 1
    return WinTieLoss(counts["win"], counts["tie"], counts["loss"])
