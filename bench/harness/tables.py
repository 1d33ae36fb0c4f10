"""The result tables that :func:`~bench.harness.aggregate.aggregate` builds and the report renders.

Plain frozen dataclasses (one per table row) plus the display order of methods and budgets; no statistics
and no I/O here. The aggregation (``aggregate.py``) fills them in, the rendering (``report.py``) reads
them: neither needs the other's internals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "METHOD_ORDER",
    "MIN_PAIRS_FOR_VERDICT",
    "NO_VERDICT",
    "Comparison",
    "CostSummary",
    "GroupRow",
    "MethodSummary",
    "PooledComparison",
    "ResultTable",
    "TableProvenance",
    "natural_key",
]

METHOD_ORDER: tuple[str, ...] = (
    "uniform",
    "fim",
    "fim-variance",
    "random",
    "fim-shuffled",
    "gora",
    "eva",
    "adalora",
    "l1ra",
    "lrlora",
)
"""Display order of methods in reports: the baseline first, FIM-LoRA and its controls, then the other
allocation methods by family (calibration-time, then training-time); a
method not listed comes last. A deliberate order, not the list of all methods: each name must be a
:func:`~bench.harness.experiment.known_methods` name (tests/bench checks it; this module stays torch-free)."""


@dataclass(frozen=True)
class GroupRow:
    """Statistics of one (suite, model, task, budget, method) group over its seeds."""

    suite: str
    model: str
    task: str
    budget: str
    method: str
    seeds: tuple[int, ...]
    mean: float
    std: float
    params_mean: float
    param_ratio: float | None
    param_flag: bool
    calibration_seconds: float
    train_seconds: float

    @property
    def n(self) -> int:
        """Number of seeds (records) in the group."""
        return len(self.seeds)


MIN_PAIRS_FOR_VERDICT = 3
"""Fewest seed pairs for a win/tie/loss verdict. With 2 pairs the bootstrap has 3 distinct resample means
and the exact sign-flip p is at least 0.5: a CI that excludes 0 there says nothing."""

NO_VERDICT = "n/a"
"""The verdict of a comparison with fewer than ``min_pairs`` pairs (not counted as a win, tie or loss)."""


@dataclass(frozen=True)
class Comparison:
    """A method vs the baseline in one (suite, model, task, budget) cell, paired by seed."""

    suite: str
    model: str
    task: str
    budget: str
    method: str
    baseline: str
    n_pairs: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str


@dataclass(frozen=True)
class PooledComparison:
    """A method vs the baseline over every (task, seed) pair of one (suite, model, budget).

    Five seeds per task cannot reach p < 0.05 (the exact sign-flip test stops at 2 / 32); pooling the
    pairs of all tasks can. The sign-flip test stays valid when tasks differ in scale or spread: it only
    assumes each pair's difference is symmetric about 0 under H0 and pairs are independent. The bootstrap
    resamples pairs, ignoring which task they come from.
    """

    suite: str
    model: str
    budget: str
    method: str
    baseline: str
    n_tasks: int
    n_pairs: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class CostSummary:
    """Mean wall-clock seconds per run of one method over all tasks of a (suite, model, budget).

    ``total_ratio`` is (calibration + training) divided by the baseline's on the same tasks, each task
    weighted by this method's seeds there (an ablation run on two tasks is compared on those two); None
    when some task has no baseline group.
    """

    suite: str
    model: str
    budget: str
    method: str
    n_tasks: int
    n_runs: int
    calibration_seconds: float
    train_seconds: float
    total_ratio: float | None

    @property
    def total_seconds(self) -> float:
        return self.calibration_seconds + self.train_seconds


@dataclass(frozen=True)
class MethodSummary:
    """Win/tie/loss counts of one method over all cells where it was compared."""

    method: str
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class TableProvenance:
    """What the tables were built from."""

    n_records: int
    n_skipped: int
    git_commits: tuple[str, ...]


@dataclass(frozen=True)
class ResultTable:
    """Everything :func:`to_markdown` and the charts need."""

    metric: str
    higher_is_better: bool
    alpha: float
    baseline: str
    rows: tuple[GroupRow, ...]
    comparisons: tuple[Comparison, ...]
    summary: tuple[MethodSummary, ...]
    provenance: TableProvenance
    min_pairs: int = MIN_PAIRS_FOR_VERDICT
    """Fewest seed pairs a comparison needs for a verdict."""
    pooled: tuple[PooledComparison, ...] = ()
    """Each method against the baseline over all tasks of a (suite, model, budget)."""
    costs: tuple[CostSummary, ...] = ()
    """Seconds per run of each method over all tasks of a (suite, model, budget)."""


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort "r2" before "r16" (and "T=2" before "T=16"): digit runs compare as numbers.

    ``re.split`` with a capture group puts text at even positions and digit runs at odd ones, so two keys
    never compare a str with an int.
    """
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))
