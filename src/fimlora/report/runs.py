"""Runs on disk and how sure a difference between two methods is.

:func:`load_run` reads a ``fimlora train`` output directory into a :class:`RunRecord`;
:func:`compare_accuracy` pairs two methods' runs by seed and measures their accuracy difference with its
uncertainty (:class:`AccuracyComparison`, math in :mod:`fimlora.paired_stats`), which
:meth:`AccuracyComparison.sentence` turns into the report's plain-language conclusion.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fimlora.paired_stats import mcnemar, paired_t_interval, sign_flip_pvalue, unpaired_difference_se

__all__ = [
    "ALPHA",
    "AccuracyComparison",
    "RunRecord",
    "compare_accuracy",
    "load_run",
    "method_label",
    "paired_test",
    "read_json_file",
    "read_rank_map",
    "signed_points",
]

ALPHA = 0.05
"""Two-sided level of every interval in the reports (95%)."""

_METHOD_LABELS = {"uniform": "uniform LoRA", "fim": "FIM-LoRA"}


def method_label(method: str) -> str:
    """How a report names a method: ``fim`` -> ``FIM-LoRA``, ``uniform`` -> ``uniform LoRA``."""
    return _METHOD_LABELS.get(method, method)


def read_json_file(path: Path) -> dict[str, Any]:
    """A run's JSON file; an unreadable one is a one-line ``UsageError``."""
    from fimlora.errors import UsageError

    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"cannot read {path} ({type(e).__name__}); pass directories written by `fimlora train`"
        ) from None
    return data


def read_rank_map(path: Path) -> Any:
    """A run's ``rank_map.json`` as a ``RankMap``; an unreadable one is a one-line ``UsageError``."""
    from fimlora.errors import UsageError
    from fimlora.rankmap import RankMap

    try:
        return RankMap.load_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{' '.join(str(e).split())}; pass a rank_map.json written by fimlora") from None


@dataclass
class RunRecord:
    """One training run as written by ``fimlora train`` (or one seed/method of ``fimlora demo``)."""

    dir: Path
    name: str
    metrics: dict[str, Any]
    rank_map: Any = None
    """The run's :class:`~fimlora.rankmap.RankMap` (``rank_map.json``), or None."""
    history: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, list[int]] | None = None
    """``{"predictions", "labels"}`` of the final test evaluation (``predictions.json``), if saved."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """``run.json``: versions, git commit, command, device, time."""
    config: dict[str, Any] = field(default_factory=dict)
    """``config.json``: the resolved run configuration."""
    task: dict[str, Any] = field(default_factory=dict)
    """``task.json``: task, label names, max_length, model."""

    @property
    def method(self) -> str:
        return str(self.metrics.get("method", "?"))

    @property
    def seed(self) -> int | None:
        seed = self.metrics.get("seed")
        return None if seed is None else int(seed)

    @property
    def accuracy(self) -> float | None:
        acc = (self.metrics.get("eval") or {}).get("accuracy")
        return None if acc is None or (isinstance(acc, float) and math.isnan(acc)) else float(acc)

    @property
    def n_test(self) -> int | None:
        n = (self.metrics.get("eval") or {}).get("n", self.metrics.get("eval_examples"))
        return None if n is None else int(n)


def load_run(directory: str | os.PathLike[str], name: str | None = None) -> RunRecord:
    """Read a ``fimlora train`` output directory (metrics, rank map, history, predictions, provenance).

    Raises:
        UsageError: no ``metrics.json``, or a file that cannot be read.
    """
    from fimlora.errors import UsageError

    d = Path(directory)
    if not (d / "metrics.json").is_file():
        raise UsageError(f"{d} has no metrics.json; pass directories written by `fimlora train`")

    def optional(file: str) -> dict[str, Any]:
        return read_json_file(d / file) if (d / file).is_file() else {}

    predictions = optional("predictions.json") or None
    return RunRecord(
        dir=d,
        name=name or d.name,
        metrics=read_json_file(d / "metrics.json"),
        rank_map=read_rank_map(d / "rank_map.json") if (d / "rank_map.json").is_file() else None,
        history=optional("history.json"),
        predictions=predictions,  # type: ignore[arg-type]
        provenance=optional("run.json"),
        config=optional("config.json"),
        task=optional("task.json"),
    )


# ---- how sure is a difference ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracyComparison:
    """Test accuracy of ``method`` against ``baseline`` over the seeds both were run with.

    Differences are in accuracy units (0.01 = one point). With two or more seed pairs the interval is
    Student's t over the per-seed differences (``basis="seeds"``); with one pair it is the test-set
    standard error of that one difference: paired per example (McNemar) when both runs saved their
    predictions on the same examples (``basis="test set, paired"``), else the two binomial standard errors
    combined as if independent (``basis="test set, unpaired"``).
    """

    method: str
    baseline: str
    seeds: list[int | None]
    diffs: list[float]
    """Per seed, ``accuracy(method) - accuracy(baseline)``."""
    mean: float
    low: float
    high: float
    se: float
    basis: str
    p_value: float
    p_name: str
    n_test: int | None

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def sentence(self) -> str:
        """The conclusion: the difference, the verdict, then the uncertainty it rests on (accuracy points)."""
        a, b = method_label(self.method), method_label(self.baseline)
        pts = 100.0 * abs(self.mean)
        if self.mean > 0:
            what = f"{a} is {pts:.2f} points above {b}"
        elif self.mean < 0:
            what = f"{a} is {pts:.2f} points below {b}"
        else:
            what = f"{a} ties with {b}"
        ci = f"{100 * (1 - ALPHA):.0f}% CI {signed_points(self.low)} to {signed_points(self.high)} points"
        if self.basis == "seeds":
            above = sum(d > 0 for d in self.diffs)
            below = sum(d < 0 for d in self.diffs)
            sides = [f"above on {above}" if above else "", f"below on {below}" if below else ""]
            side = (
                " and ".join(x for x in sides if x) + f" of {self.n} seeds"
                if above or below
                else "equal on every seed"
            )
            verdict = (
                "larger than seed-to-seed noise"
                if self.distinguishable
                else "not distinguishable from seed-to-seed noise"
            )
            few = (
                f" With {self.n} seeds the exact sign-flip test cannot go below p = {2 / 2**self.n:.2g}: use 6 or "
                "more for a claim."
                if self.n < 6
                else ""
            )
            return (
                f"{what} in test accuracy, averaged over {self.n} seeds: {verdict} ({ci}, Student's t over the "
                f"per-seed differences; {side}; sign-flip p = {self.p_value:.2g}).{few}"
            )
        n_test = f"{self.n_test:,} test examples" if self.n_test else "the test set"
        how = (
            "paired per example"
            if self.basis == "test set, paired"
            else "unpaired: no per-example predictions"
        )
        verdict = (
            "larger than test-set noise"
            if self.distinguishable
            else "within test-set noise, not distinguishable"
        )
        p = f"; {self.p_name} = {self.p_value:.2g}" if not math.isnan(self.p_value) else ""
        return (
            f"On one seed, {what} in test accuracy: {verdict} ({ci}; standard error {100 * self.se:.2f} points "
            f"over {n_test}, {how}{p}). One seed says nothing about how much the difference moves with the "
            "seed: run more (--seeds 0 1 2)."
        )


def signed_points(value: float) -> str:
    """An accuracy difference in signed points (``-0.0316`` -> ``−3.16``)."""
    return f"{100 * value:+.2f}".replace("-", "−")


def compare_accuracy(
    method_runs: Sequence[RunRecord], baseline_runs: Sequence[RunRecord]
) -> AccuracyComparison | None:
    """Pair runs by seed and measure the accuracy difference (see :class:`AccuracyComparison`).

    Returns:
        ``None`` when no run of the method shares a seed (and test-set size) with a baseline run.
    """
    base = {r.seed: r for r in reversed(baseline_runs) if r.accuracy is not None}
    pairs = []
    seen: set[int | None] = set()
    for run in method_runs:
        other = base.get(run.seed)
        if run.accuracy is None or other is None or run.seed in seen or run.n_test != other.n_test:
            continue
        seen.add(run.seed)
        pairs.append((run, other))
    if not pairs:
        return None
    a = [p[0].accuracy for p in pairs]
    b = [p[1].accuracy for p in pairs]
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]  # type: ignore[arg-type]
    seeds = [p[0].seed for p in pairs]
    method, baseline = pairs[0][0].method, pairs[0][1].method
    n_test = pairs[0][0].n_test
    if len(pairs) >= 2:
        interval = paired_t_interval(a, b, alpha=ALPHA)  # type: ignore[arg-type]
        p = sign_flip_pvalue(a, b)  # type: ignore[arg-type]
        return AccuracyComparison(
            method, baseline, seeds, diffs, interval.mean, interval.low, interval.high, interval.se,
            "seeds", p, "p", n_test,
        )  # fmt: skip
    run, other = pairs[0]
    z = 1.959963984540054  # normal 97.5% quantile: n_test examples, not n seeds
    paired = paired_test(run, other)
    if paired is not None:
        se, p, basis, p_name = paired.se, paired.p_value, "test set, paired", "McNemar exact p"
    else:
        se = unpaired_difference_se(float(a[0] or 0), float(b[0] or 0), int(n_test or 1))
        p, basis, p_name = math.nan, "test set, unpaired", ""
    return AccuracyComparison(
        method, baseline, seeds, diffs, diffs[0], diffs[0] - z * se, diffs[0] + z * se, se, basis, p, p_name,
        n_test,
    )  # fmt: skip


def paired_test(a: RunRecord, b: RunRecord) -> Any | None:
    """McNemar of two runs when both saved predictions for the same labels (same test set, same order)."""
    if a.predictions is None or b.predictions is None:
        return None
    labels = a.predictions.get("labels")
    if not labels or labels != b.predictions.get("labels"):
        return None
    return mcnemar(a.predictions["predictions"], b.predictions["predictions"], labels)
