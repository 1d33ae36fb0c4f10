"""How sure is a difference between two methods? Paired statistics over seeds and over test examples.

Pure math (``math`` + numpy), shared by the reports (:mod:`fimlora.report`) and the benchmark harness
(``bench.harness.stats`` re-exports the bootstrap and the sign-flip test from here).

Two sources of noise, two tools:

* **Seeds.** Runs of two methods that share a seed share data order, head init and dropout stream, so
  they are compared in pairs, ``d_s = a_s - b_s``. :func:`paired_t_interval` gives Student's t interval
  of ``mean(d)`` (valid for any n >= 2, wide for small n: t_{0.975, 2} = 4.30);
  :func:`sign_flip_pvalue` is Fisher's randomisation test of ``mean(d) = 0``, exact for n <= 16 (it
  cannot go below ``2 / 2^n``: 0.25 at n = 3); :func:`paired_bootstrap_ci` is the percentile bootstrap
  the benchmark uses (anti-conservative for n < 5).
* **Test examples.** One seed still has test-set sampling noise: an accuracy ``p`` measured on ``n``
  examples has binomial standard error ``sqrt(p (1 - p) / n)`` (:func:`binomial_se`; 1.2 points at
  p = 0.83, n = 1,026). With both models' per-example predictions on the same examples,
  :func:`mcnemar` gives the paired standard error of the accuracy difference (smaller: most examples are
  right or wrong for both) and McNemar's exact test (a two-sided binomial test on the discordant pairs).
  Without them, :func:`unpaired_difference_se` treats the two accuracies as independent, which overstates
  the noise of a difference measured on one test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "EXACT_PERMUTATION_MAX_N",
    "McNemar",
    "PairedInterval",
    "as_finite_1d",
    "binomial_se",
    "mcnemar",
    "paired_bootstrap_ci",
    "paired_differences",
    "paired_t_interval",
    "sign_flip_pvalue",
    "t_quantile",
    "unpaired_difference_se",
]

# 2^16 = 65,536 sign patterns x 16 values is ~8 MB of float64: cheap enough to be exact.
EXACT_PERMUTATION_MAX_N = 16
_MC_CHUNK = 1024


def as_finite_1d(values: Sequence[float] | npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    """``values`` as a float64 vector, shape (n,), n >= 1; ``ValueError`` naming ``name`` otherwise."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must contain only finite values")
    return array


def paired_differences(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return ``a - b``, shape (n,); ``a[i]`` and ``b[i]`` must come from the same seed."""
    a_arr, b_arr = as_finite_1d(a, "a"), as_finite_1d(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"`a` and `b` must be paired (same length), got {a_arr.size} and {b_arr.size}")
    return a_arr - b_arr


# ---- Student's t ----------------------------------------------------------------------------------


def _t_two_sided_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)  # cos θ + (2/3) cos³θ + (2·4)/(3·5) cos⁵θ + ...
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2.0 / math.pi) * (theta + s * total) if df > 1 else 2.0 * theta / math.pi
    total, term = 0.0, 1.0  # 1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ...
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 2)`` = 4.3027).

    Exact series for the distribution function, inverted by bisection to ~1e-12.

    Raises:
        ValueError: ``q`` outside (0, 1) or ``df < 1``.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"`q` must be in (0, 1), got {q}")
    if df < 1:
        raise ValueError(f"`df` must be >= 1, got {df}")
    if q == 0.5:
        return 0.0
    mass = abs(2.0 * q - 1.0)  # P(|T| <= t) for the upper tail's t
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < mass:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided_mass(mid, df) < mass:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


@dataclass(frozen=True)
class PairedInterval:
    """Mean of paired differences over seeds, with Student's t interval.

    Attributes:
        n: number of pairs.
        mean: mean difference ``mean(a - b)``.
        sd: sample standard deviation of the differences (ddof = 1; ``nan`` for n = 1).
        se: ``sd / sqrt(n)``.
        low, high: the ``1 - alpha`` interval ``mean ± t_{1-alpha/2, n-1} se`` (``nan`` for n = 1).
        t: the t quantile used (``nan`` for n = 1).
    """

    n: int
    mean: float
    sd: float
    se: float
    low: float
    high: float
    t: float


def paired_t_interval(
    a: Sequence[float] | npt.ArrayLike, b: Sequence[float] | npt.ArrayLike, *, alpha: float = 0.05
) -> PairedInterval:
    """Student's t interval of ``mean(a - b)`` over pairs (seeds); see :class:`PairedInterval`.

    Args:
        a: method scores, shape (n,), ordered by seed.
        b: baseline scores, shape (n,), same seed order.
        alpha: two-sided level; the interval covers ``1 - alpha``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}")
    diffs = paired_differences(a, b)
    n, mean = int(diffs.size), float(diffs.mean())
    if n < 2:
        return PairedInterval(n, mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    sd = float(diffs.std(ddof=1))
    se = sd / math.sqrt(n)
    t = t_quantile(1.0 - alpha / 2.0, n - 1)
    return PairedInterval(n, mean, sd, se, mean - t * se, mean + t * se, t)


# ---- randomisation and bootstrap ------------------------------------------------------------------


def sign_flip_pvalue(
    a: Sequence[float] | npt.ArrayLike,
    b: Sequence[float] | npt.ArrayLike,
    *,
    n_perm: int = 10_000,
    seed: int = 0,
) -> float:
    """Two-sided p-value of H0: mean(a - b) = 0 by randomly flipping the signs of paired differences.

    Args:
        a: method scores, shape (n,), ordered by seed.
        b: baseline scores, shape (n,), same order.
        n_perm: Monte Carlo draws, used only when n > :data:`EXACT_PERMUTATION_MAX_N`.
        seed: RNG seed for the Monte Carlo case.

    Returns:
        For n <= 16, the exact fraction of the 2^n sign patterns whose |sum| is at least the observed
        |sum| (the observed pattern included, so p >= 2 / 2^n when any difference is non-zero). For
        larger n, ``(1 + hits) / (1 + n_perm)`` (Phipson & Smyth, 2010: never exactly 0).
    """
    diffs = paired_differences(a, b)
    observed = abs(float(diffs.sum()))
    # Sums of the same numbers in another order can differ in the last bits; count those as ties.
    slack = 1e-12 * max(1.0, float(np.abs(diffs).sum()))
    n = diffs.size
    if n <= EXACT_PERMUTATION_MAX_N:
        patterns = np.arange(2**n, dtype=np.int64)[:, None]
        signs = 1.0 - 2.0 * ((patterns >> np.arange(n)) & 1)  # shape (2^n, n), entries +-1
        hits = int(np.count_nonzero(np.abs(signs @ diffs) >= observed - slack))
        return hits / 2**n
    if n_perm < 1:
        raise ValueError(f"`n_perm` must be >= 1, got {n_perm}")
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, _MC_CHUNK):
        rows = min(_MC_CHUNK, n_perm - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(rows, n))
        hits += int(np.count_nonzero(np.abs(signs @ diffs) >= observed - slack))
    return (1 + hits) / (1 + n_perm)


def paired_bootstrap_ci(
    a: Sequence[float] | npt.ArrayLike,
    b: Sequence[float] | npt.ArrayLike,
    *,
    n_boot: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap CI of the mean paired difference ``mean(a - b)`` (Efron & Tibshirani, ch. 13).

    Args:
        a: method scores, shape (n,), ordered by seed.
        b: baseline scores, shape (n,), same seed order as ``a``.
        n_boot: bootstrap resamples.
        alpha: two-sided level; the CI covers ``1 - alpha``.
        seed: seed of the resampling RNG (results are deterministic).

    Returns:
        ``(mean_diff, lower, upper)``. With n = 1 there is nothing to resample and the bounds are
        ``nan``. With n < 5 the interval is too narrow (n = 3 has only 10 distinct resample means): prefer
        :func:`paired_t_interval` there.
    """
    if n_boot < 1:
        raise ValueError(f"`n_boot` must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}")
    diffs = paired_differences(a, b)
    mean_diff = float(diffs.mean())
    if diffs.size < 2:
        return mean_diff, math.nan, math.nan
    rng = np.random.default_rng(seed)
    # (n_boot, n) index matrix: n is a number of seeds, so this stays small.
    idx = rng.integers(0, diffs.size, size=(n_boot, diffs.size))
    boot_means = diffs[idx].mean(axis=1)
    lower, upper = np.quantile(boot_means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return mean_diff, float(lower), float(upper)


# ---- one test set -----------------------------------------------------------------------------------


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n`` independent examples."""
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`p` must be in [0, 1], got {p}")
    return math.sqrt(p * (1.0 - p) / n)


def unpaired_difference_se(p_a: float, p_b: float, n: int) -> float:
    """``sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n)``: SE of ``p_a - p_b`` if the two were independent.

    On one shared test set the two models' errors are positively correlated, so this overstates the noise
    of their difference; :func:`mcnemar` gives the paired value when per-example predictions exist.
    """
    return math.hypot(binomial_se(p_a, n), binomial_se(p_b, n))


@dataclass(frozen=True)
class McNemar:
    """Two classifiers on the same n examples, pair by pair.

    Attributes:
        n: examples.
        only_a: examples ``a`` gets right and ``b`` wrong.
        only_b: examples ``b`` gets right and ``a`` wrong.
        diff: accuracy difference ``(only_a - only_b) / n``.
        se: standard error of ``diff``: ``sd(d) / sqrt(n)`` of the per-example ``d_i = correct_a -
            correct_b`` in {-1, 0, 1} (sample sd, ddof = 1).
        p_value: McNemar's exact two-sided test: ``min(1, 2 P(X <= min(only_a, only_b)))`` for
            ``X ~ Binomial(only_a + only_b, 1/2)``; 1.0 when no example is discordant.
    """

    n: int
    only_a: int
    only_b: int
    diff: float
    se: float
    p_value: float


def mcnemar(predictions_a: Sequence[int], predictions_b: Sequence[int], labels: Sequence[int]) -> McNemar:
    """Compare two classifiers' predictions on the same labelled examples (see :class:`McNemar`).

    Raises:
        ValueError: the three sequences differ in length or are empty.
    """
    n = len(labels)
    if n == 0 or len(predictions_a) != n or len(predictions_b) != n:
        raise ValueError(
            f"need predictions of both models for the same examples; got {len(predictions_a)}, "
            f"{len(predictions_b)} predictions for {n} labels"
        )
    only_a = sum(pa == y != pb for pa, pb, y in zip(predictions_a, predictions_b, labels, strict=True))
    only_b = sum(pb == y != pa for pa, pb, y in zip(predictions_a, predictions_b, labels, strict=True))
    diff = (only_a - only_b) / n
    # d_i in {-1, 0, 1}: sum d_i^2 = only_a + only_b, so var = (only_a + only_b - n diff^2) / (n - 1).
    var = (only_a + only_b - n * diff * diff) / (n - 1) if n > 1 else math.nan
    se = math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan
    discordant = only_a + only_b
    if discordant == 0:
        p = 1.0
    else:
        tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
        p = min(1.0, 2 * tail / 2**discordant)
    return McNemar(n=n, only_a=only_a, only_b=only_b, diff=diff, se=se, p_value=p)
