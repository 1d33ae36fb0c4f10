"""Exact budget-constrained rank allocation (pure math: no torch.nn, no peft).

Given a non-negative score per module, FIM-LoRA sets each module's rank proportional to its score,
``r_i = clip(lambda * s_i, lo_i, hi_i)``, choosing the proportionality constant ``lambda`` so that the
budget is met ("water-filling"), then rounds to integers *inside* the bounds:

* rank budget ``R``: ``sum_i r_i == R`` exactly (largest-remainder rounding);
* parameter budget ``P`` with per-rank costs ``c_i = in_i + out_i``: ``sum_i r_i c_i <= P`` and the
  slack is below the cost of one rank of the cheapest module that can still grow.

Clamping happens before rounding and rounding never leaves the bounds, so the budget can't be overshot
by clamping after the fact (a known failure of earlier implementations). Ties are broken by score, then
by module name, so the result is deterministic. All-zero scores give the uniform allocation (warned).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

from fimlora.module_names import split_module_name
from fimlora.rankmap import RankMap

__all__ = ["allocate_ranks", "normalize_scores", "select_within_budget", "uniform_ranks"]

_BISECTION_STEPS = 200
# Remainders are compared to this many decimals, so that exact ties stay ties (see _remainder).
_REMAINDER_DIGITS = 9


def allocate_ranks(
    scores: Mapping[str, float],
    *,
    budget_ranks: int | None = None,
    budget_params: int | None = None,
    costs: Mapping[str, int] | None = None,
    r_min: int | Mapping[str, int] = 1,
    r_max: int | Mapping[str, int] = 64,
    metadata: Mapping[str, object] | None = None,
) -> RankMap:
    """Distribute a rank or parameter budget over modules in proportion to their scores.

    Args:
        scores: module name -> finite score >= 0.
        budget_ranks: total rank (sum of r_i) to hand out exactly.
        budget_params: total parameter budget; needs ``costs``.
        costs: module name -> parameters per unit of rank (``in + out`` for a LoRA pair).
        r_min: smallest rank, one value for all modules or per module; 0 lets a module be dropped (a rank
            map entry of 0: no LoRA layer there).
        r_max: largest rank, one value for all modules or per module.
        metadata: extra JSON-serialisable data stored in the returned map.

    Returns:
        A :class:`RankMap` in the order of ``scores``.

    Raises:
        ValueError: on an empty score set, negative or non-finite scores, bad bounds, a missing or doubled
            budget, or a budget outside the feasible range (the message gives the range).
    """
    names = list(scores)
    if not names:
        raise ValueError("no modules to allocate ranks to: `scores` is empty")
    s = [_check_score(n, scores[n]) for n in names]
    lo = _bounds("r_min", r_min, names, minimum=0)
    hi = _bounds("r_max", r_max, names, minimum=1)
    for n, a, b in zip(names, lo, hi, strict=True):
        if a > b:
            raise ValueError(f"r_min ({a}) > r_max ({b}) for module {n!r}")
    if (budget_ranks is None) == (budget_params is None):
        raise ValueError("give exactly one of `budget_ranks` and `budget_params`")

    if all(v == 0.0 for v in s):
        warnings.warn(
            "all module scores are zero (no gradient signal in the calibration batches); "
            "falling back to the uniform allocation",
            stacklevel=2,
        )
        s = [1.0] * len(s)

    if budget_ranks is not None:
        _require_positive_int("budget_ranks", budget_ranks)
        weights = [1] * len(names)
        budget = budget_ranks
        unit = "budget_ranks"
    else:
        assert budget_params is not None
        _require_positive_int("budget_params", budget_params)
        if costs is None:
            raise ValueError("`budget_params` needs `costs` (parameters per rank of each module, in + out)")
        weights = []
        for n in names:
            if n not in costs:
                raise ValueError(f"`costs` has no entry for module {n!r}")
            _require_positive_int(f"costs[{n!r}]", costs[n])
            weights.append(int(costs[n]))
        budget = budget_params
        unit = "budget_params"

    low_total = sum(w * a for w, a in zip(weights, lo, strict=True))
    high_total = sum(w * b for w, b in zip(weights, hi, strict=True))
    if not low_total <= budget <= high_total:
        raise ValueError(
            f"{unit}={budget} is infeasible for {len(names)} modules with these bounds: "
            f"the feasible range is [{low_total}, {high_total}] (sum of r_min and r_max"
            + (" times each module's cost" if unit == "budget_params" else "")
            + "); change the budget or the bounds"
        )

    x = _water_fill(s, lo, hi, weights, budget)
    if budget_ranks is not None:
        ranks = _round_to_exact_sum(x, s, names, lo, hi, budget)
    else:
        ranks = _round_under_cap(x, s, names, lo, hi, weights, budget)

    meta: dict[str, object] = {
        "allocation": {
            "budget_ranks": budget_ranks,
            "budget_params": budget_params,
            "total_rank": sum(ranks),
            "total_params": sum(r * w for r, w in zip(ranks, weights, strict=True))
            if costs is not None
            else None,
        },
        "scores": {n: float(v) for n, v in zip(names, s, strict=True)},
    }
    if metadata:
        meta.update(dict(metadata))
    return RankMap(dict(zip(names, ranks, strict=True)), metadata=meta)


def normalize_scores(scores: Mapping[str, float], by: str) -> dict[str, float]:
    """Each score divided by the mean score of its group, so that every group has mean 1.

    ``by="kind"`` groups modules of the same kind (``attention.self.query``, ``mlp.down_proj``...) over all
    layers: the bias between kinds goes, the profile over depth within a kind stays. ``by="layer"`` groups
    the modules of one layer: the depth profile goes, the kinds' profile within a layer stays. A group whose
    scores are all 0 stays 0; ``by="none"`` returns the scores unchanged. Where every module is alone in its
    group (no repeated layers), every score becomes 1: warned, since the map is then uniform.

    Raises:
        ValueError: an unknown ``by``.
    """
    if by == "none":
        return {n: float(v) for n, v in scores.items()}
    if by not in ("kind", "layer"):
        raise ValueError(f"`by` must be 'none', 'kind' or 'layer', got {by!r}")
    index = 1 if by == "kind" else 0
    groups: dict[object, list[float]] = {}
    for name, value in scores.items():
        groups.setdefault(split_module_name(name)[index], []).append(float(value))
    if len(scores) > 1 and all(len(values) == 1 for values in groups.values()):
        warnings.warn(
            f"normalize={by!r}: every module is alone in its group, so every score becomes 1 and the map is "
            "uniform; set normalize='none' to allocate by the raw scores",
            stacklevel=2,
        )
    means = {key: math.fsum(values) / len(values) for key, values in groups.items()}
    out = {}
    for name, value in scores.items():
        mean = means[split_module_name(name)[index]]
        out[name] = float(value) / mean if mean > 0 else 0.0
    return out


def uniform_ranks(names: list[str] | tuple[str, ...], r: int) -> RankMap:
    """The uniform map (every module at rank ``r``), for comparisons and reports."""
    _require_positive_int("r", r)
    return RankMap({n: r for n in names})


def _water_fill(s: list[float], lo: list[int], hi: list[int], w: list[int], budget: int) -> list[float]:
    """Continuous ranks x_i = clip(lam * s_i, lo_i, hi_i) with sum w_i x_i <= budget, as close as possible.

    The weighted sum is continuous and non-decreasing in ``lam``, so bisection converges; the lower end of
    the bracket is returned so that the weighted sum never exceeds the budget.
    """

    def ranks_at(lam: float) -> list[float]:
        return [min(max(lam * si, a), b) for si, a, b in zip(s, lo, hi, strict=True)]

    def total(xs: list[float]) -> float:
        return sum(wi * xi for wi, xi in zip(w, xs, strict=True))

    positive = [b / si for si, b in zip(s, hi, strict=True) if si > 0]
    lam_lo, lam_hi = 0.0, max(positive) if positive else 0.0
    if total(ranks_at(lam_hi)) <= budget:
        return ranks_at(lam_hi)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lam_lo + lam_hi)
        if mid in (lam_lo, lam_hi):
            break
        if total(ranks_at(mid)) <= budget:
            lam_lo = mid
        else:
            lam_hi = mid
    return ranks_at(lam_lo)


def _round_to_exact_sum(
    x: list[float], s: list[float], names: list[str], lo: list[int], hi: list[int], budget: int
) -> list[int]:
    """Largest-remainder rounding that keeps every rank in its bounds and hits the sum exactly."""
    ranks = [min(max(math.floor(xi), a), b) for xi, a, b in zip(x, lo, hi, strict=True)]
    frac = [_remainder(xi - math.floor(xi)) for xi in x]
    deficit = budget - sum(ranks)
    # Order of who gets a unit first: largest remainder, then larger score, then name (determinism).
    order = sorted(range(len(x)), key=lambda i: (-frac[i], -s[i], names[i]))
    while deficit > 0:
        grew = False
        for i in order:
            if deficit == 0:
                break
            if ranks[i] < hi[i]:
                ranks[i] += 1
                deficit -= 1
                grew = True
        if not grew:  # unreachable when the budget is feasible; guards against an endless loop
            raise AssertionError("rank budget could not be met inside the bounds")
    while deficit < 0:
        shrank = False
        for i in reversed(order):
            if deficit == 0:
                break
            if ranks[i] > lo[i]:
                ranks[i] -= 1
                deficit += 1
                shrank = True
        if not shrank:
            raise AssertionError("rank budget could not be met inside the bounds")
    return ranks


def _round_under_cap(
    x: list[float],
    s: list[float],
    names: list[str],
    lo: list[int],
    hi: list[int],
    w: list[int],
    budget: int,
) -> list[int]:
    """Round down, then add single ranks while they fit, until no module that can grow fits the slack."""
    # Floor after removing float noise, so that a continuous rank that is an integer in exact arithmetic
    # is not demoted by one (which would spend its turn below on getting that rank back).
    ranks = [min(max(_floor(xi), a), b) for xi, a, b in zip(x, lo, hi, strict=True)]
    if sum(r * wi for r, wi in zip(ranks, w, strict=True)) > budget:  # it was not noise: plain floor
        ranks = [min(max(math.floor(xi), a), b) for xi, a, b in zip(x, lo, hi, strict=True)]
    remaining = budget - sum(r * wi for r, wi in zip(ranks, w, strict=True))
    order = sorted(range(len(x)), key=lambda i: (-_remainder(x[i] - _floor(x[i])), -s[i], names[i]))
    for i in order:  # first the largest remainders, as with the rank budget
        if ranks[i] < hi[i] and w[i] <= remaining:
            ranks[i] += 1
            remaining -= w[i]
    while True:  # then fill what is left with the modules furthest below their continuous share
        growable = [i for i in range(len(x)) if ranks[i] < hi[i] and w[i] <= remaining]
        if not growable:
            return ranks
        i = min(growable, key=lambda j: (-_remainder(x[j] - ranks[j]), -s[j], names[j]))
        ranks[i] += 1
        remaining -= w[i]


def _remainder(value: float) -> float:
    """A rounding remainder with the float noise of the bisection removed.

    Remainders that are equal in exact arithmetic (e.g. 1.5 and 4.5 for scores 1 and 3) differ in the last
    bits depending on the scale of the scores and the order of summation; without this, which module wins
    such a tie (and so the map) changed when all scores were multiplied by a constant or reordered.
    """
    return round(value, _REMAINDER_DIGITS)


def _floor(value: float) -> int:
    """``floor`` of a continuous rank after removing float noise (see :func:`_remainder`)."""
    return math.floor(round(value, _REMAINDER_DIGITS))


def _check_score(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score of module {name!r} is not a number: {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"score of module {name!r} must be finite and >= 0, got {v}")
    return v


def _bounds(field: str, value: int | Mapping[str, int], names: list[str], *, minimum: int) -> list[int]:
    if isinstance(value, Mapping):
        out = []
        for n in names:
            if n not in value:
                raise ValueError(f"`{field}` has no entry for module {n!r}")
            _require_int(f"{field}[{n!r}]", value[n], minimum)
            out.append(int(value[n]))
        return out
    _require_int(field, value, minimum)
    return [int(value)] * len(names)


def _require_positive_int(field: str, value: object) -> None:
    _require_int(field, value, 1)


def _require_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{field}` must be {what}, got {value!r}")


def select_within_budget(scores: Sequence[float], costs: Sequence[int], budget: int) -> list[bool]:
    """Which items to keep: in decreasing score, each one whose cost still fits in what is left.

    The scan goes on past an item that does not fit, so cheaper, less important items can use the rest:
    the slack (budget minus the kept cost) is smaller than the cost of every item left out. Equal scores
    keep the earlier item first, so the result is deterministic.

    Args:
        scores: Importance of each item, shape (n,); higher is kept first.
        costs: Positive cost of each item, shape (n,) (a rank of module m costs in_m + out_m parameters).
        budget: Total cost allowed (>= 0).

    Returns:
        ``keep``, shape (n,): with sum(cost[i] for kept i) <= budget.

    Raises:
        ValueError: lengths differ, a cost is not positive, a score is NaN, or the budget is negative.
    """
    if len(scores) != len(costs):
        raise ValueError(
            f"`scores` and `costs` must have the same length, got {len(scores)} and {len(costs)}"
        )
    if budget < 0:
        raise ValueError(f"`budget` must be >= 0, got {budget}")
    if any(c <= 0 for c in costs):
        raise ValueError("`costs` must all be positive")
    if any(math.isnan(x) for x in scores):
        raise ValueError("`scores` must not be NaN")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep index order
    keep = [False] * len(scores)
    left = budget
    for i in order:
        if costs[i] <= left:
            keep[i] = True
            left -= costs[i]
    return keep
