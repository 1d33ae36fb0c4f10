"""The gate's pass/fail criteria, fixed in code before the runs (declared in docs/results/decoder/gate.md).

On the held-out **test** loss per target token (nats) of the gate-phase runs (seeds 1 and 2):

1. **Rank matters enough**: ``mean(r1) - mean(r32) >= 0.05`` nats.
2. **Rank matters beyond noise**: ``mean(r1) - mean(r32) >= 10 * sd_seed``, where ``sd_seed`` is the
   pooled seed-to-seed standard deviation of the four uniform ranks,
   ``sqrt(mean_r s_r^2)`` with ``s_r^2`` the sample variance (n - 1 = 1) of rank r's two seeds.
3. **Maps differ beyond noise**: the six maps at the r2 budget (uniform r2, three random maps,
   MLP-only, attention-only) are compared by a permutation test of the between-map variance of their
   losses, F = sum_m (mean_m - grand mean)^2. Under "no map differs", map labels are exchangeable within a
   seed (a seed fixes the data order and dropout stream of every map), so each permutation shuffles the
   six values of each seed among the maps independently. The p-value is
   ``(1 + #{F_perm >= F_obs}) / (1 + N)`` with N = 20,000 permutations from ``random.Random(0)``; the
   criterion holds when p < 0.05.

The regime is adopted only when all three hold.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "GAP_MIN_NATS",
    "NOISE_MULTIPLE",
    "PERMUTATIONS",
    "P_MAX",
    "gate_verdict",
    "map_label",
    "map_permutation_test",
    "pooled_seed_sd",
]

GAP_MIN_NATS = 0.05
NOISE_MULTIPLE = 10.0
PERMUTATIONS = 20_000
P_MAX = 0.05


def map_label(spec: Mapping[str, Any]) -> str:
    """``"uniform r8"``, ``"random#1 r2"``, ``"mlp r2"``... of a record's spec."""
    over = spec.get("overrides", {})
    kind = str(over.get("map", spec.get("method")))
    if kind == "random":
        kind = f"random#{over.get('map_seed', 0)}"
    return f"{kind} {spec['budget']}"


def pooled_seed_sd(values: Mapping[str, Sequence[float]]) -> float:
    """sqrt of the mean sample variance over configurations (each with >= 2 values)."""
    variances = [statistics.variance(v) for v in values.values()]
    if not variances:
        raise ValueError("no configuration with two or more seeds")
    return math.sqrt(sum(variances) / len(variances))


def _between(table: Mapping[str, Mapping[int, float]], seeds: Sequence[int]) -> float:
    means = [sum(row[s] for s in seeds) / len(seeds) for row in table.values()]
    grand = sum(means) / len(means)
    return sum((m - grand) ** 2 for m in means)


def map_permutation_test(
    table: Mapping[str, Mapping[int, float]], *, permutations: int = PERMUTATIONS, seed: int = 0
) -> dict[str, float]:
    """Permutation test of "the maps do not differ" (module docstring, criterion 3).

    Args:
        table: map -> seed -> loss; every map must have the same seeds.

    Returns:
        ``{"f": observed between-map variance, "p": permutation p-value, "permutations": N}``.
    """
    maps = list(table)
    seeds = sorted(next(iter(table.values())))
    if any(sorted(table[m]) != seeds for m in maps) or len(maps) < 2:
        raise ValueError("every map needs the same seeds, and two or more maps are needed")
    observed = _between(table, seeds)
    rng = random.Random(seed)
    columns = {s: [table[m][s] for m in maps] for s in seeds}
    hits = 0
    for _ in range(permutations):
        shuffled: dict[str, dict[int, float]] = {m: {} for m in maps}
        for s in seeds:
            column = columns[s][:]
            rng.shuffle(column)
            for m, value in zip(maps, column, strict=True):
                shuffled[m][s] = value
        hits += _between(shuffled, seeds) >= observed - 1e-15
    return {"f": observed, "p": (1 + hits) / (1 + permutations), "permutations": float(permutations)}


def gate_verdict(records: Iterable[Mapping[str, Any]], *, metric: str = "test_loss") -> dict[str, Any]:
    """The three criteria on finished gate-phase records.

    Returns:
        ``{"losses": label -> seed -> loss, "gap", "sd_seed", "criteria": {name: bool}, "map_test", "passed"}``;
        a criterion whose runs are missing is ``None``.
    """
    losses: dict[str, dict[int, float]] = {}
    for rec in records:
        spec = rec.get("spec", {})
        if rec.get("status") != "ok" or spec.get("overrides", {}).get("phase") != "gate":
            continue
        if metric in rec.get("metrics", {}):
            losses.setdefault(map_label(spec), {})[int(spec["seed"])] = float(rec["metrics"][metric])
    uniform = {k: list(v.values()) for k, v in losses.items() if k.startswith("uniform ") and len(v) >= 2}
    out: dict[str, Any] = {"losses": losses, "criteria": {}, "gap": None, "sd_seed": None, "map_test": None}
    if "uniform r1" in uniform and "uniform r32" in uniform:
        gap = statistics.mean(uniform["uniform r1"]) - statistics.mean(uniform["uniform r32"])
        sd = pooled_seed_sd(uniform)
        out |= {"gap": gap, "sd_seed": sd}
        out["criteria"]["gap >= 0.05 nats"] = gap >= GAP_MIN_NATS
        out["criteria"]["gap >= 10 sd"] = gap >= NOISE_MULTIPLE * sd
    at_r2 = {k: v for k, v in losses.items() if k.endswith(" r2") and len(v) >= 2}
    if len(at_r2) == 6:
        out["map_test"] = map_permutation_test(at_r2)
        out["criteria"]["maps at r2 differ (p < 0.05)"] = out["map_test"]["p"] < P_MAX
    full = len(out["criteria"]) == 3
    out["passed"] = all(out["criteria"].values()) if full else None
    return out
