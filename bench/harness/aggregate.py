"""Aggregate run records into result tables and paired comparisons against ``uniform``.

Three tables come out of :func:`aggregate`:

* groups: one row per (suite, model, task, budget, method): seeds, mean +- sample std of the metric,
  mean trainable parameters and their ratio to ``uniform`` at the same budget, flagged when it is off by
  more than ``param_tolerance`` (a method that "wins" by spending 19% more parameters has not won);
* comparisons: each method vs ``uniform`` per (task, budget), paired by seed: mean difference,
  bootstrap CI, sign-flip p-value and a win/tie/loss verdict (see ``stats.py``);
* summary: per method, how many (task, budget) cells it wins, ties and loses.

Records whose overrides differ from the rest (an ablation such as ``r_min=2``) keep them in the method
label, e.g. ``fim[r_min=2]``, so they are never averaged into the main result. An override at the value
most records have (a common learning rate; ``calibration_batches=8`` when an ablation varies it) is left
out of labels; so is its absence when most records lack the key. Every table carries the number of records and the
git commits it was built from.

The table types live in ``tables.py``; ``report.py`` renders them as Markdown and charts.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .record import commit_label
from .stats import classify_paired, mean_std, paired_bootstrap_ci, sign_flip_permutation_pvalue
from .tables import (
    METHOD_ORDER,
    MIN_PAIRS_FOR_VERDICT,
    NO_VERDICT,
    Comparison,
    CostSummary,
    GroupRow,
    MethodSummary,
    PooledComparison,
    ResultTable,
    TableProvenance,
    natural_key,
)

__all__ = ["aggregate"]

CellKey = tuple[str, str, str, str]  # (suite, model, task, budget)


@dataclass(frozen=True)
class _Run:
    cell: CellKey
    method: str
    base_method: str
    overrides_label: str
    seed: int
    value: float
    params: int
    calibration_seconds: float
    train_seconds: float
    run_id: str


def aggregate(
    records: Iterable[Mapping[str, Any]],
    *,
    metric: str = "accuracy",
    baseline: str = "uniform",
    higher_is_better: bool = True,
    alpha: float = 0.05,
    n_boot: int = 10_000,
    tol: float | None = None,
    param_tolerance: float = 0.02,
    seed: int = 0,
    min_pairs: int = MIN_PAIRS_FOR_VERDICT,
) -> ResultTable:
    """Build the result tables from run records.

    Args:
        records: Records as written by ``record.make_record``; non-``"ok"`` ones are skipped.
        metric: Key in ``record["metrics"]`` to report.
        baseline: Method every other method is compared with, and whose parameters define ratio 1.
        higher_is_better: Direction of ``metric`` (``False`` for loss/perplexity).
        alpha: Two-sided CI level of the comparisons.
        n_boot: Bootstrap resamples per comparison.
        tol: Practical-equivalence margin for win/loss, in metric units (``None``: 0).
        param_tolerance: Relative deviation from the baseline's parameter count that is flagged.
        seed: RNG seed of the bootstrap.
        min_pairs: Fewest seed pairs for a win/tie/loss verdict; a comparison with fewer is reported
            (difference, CI, p) with verdict ``"n/a"`` and left out of the win/tie/loss counts.

    Returns:
        A :class:`ResultTable`.
    """
    records = list(records)
    runs, provenance = _collect_runs(records, metric)
    groups = _group_runs(runs)
    rows = _group_rows(groups, baseline, param_tolerance)
    if min_pairs < 1:
        raise ValueError(f"`min_pairs` must be >= 1, got {min_pairs}")
    comparisons = _compare(groups, baseline, higher_is_better, alpha, n_boot, tol, seed, min_pairs)
    pooled = _pool(groups, baseline, alpha, n_boot, seed)
    return ResultTable(
        metric=metric,
        higher_is_better=higher_is_better,
        alpha=alpha,
        baseline=baseline,
        rows=rows,
        comparisons=comparisons,
        summary=_summarise(comparisons),
        provenance=provenance,
        min_pairs=min_pairs,
        pooled=pooled,
        costs=_costs(rows, baseline),
    )


def _collect_runs(records: list[Mapping[str, Any]], metric: str) -> tuple[list[_Run], TableProvenance]:
    """Turn usable records into :class:`_Run` and count the rest; warn about ok records we cannot use."""
    usable = [r for r in records if r.get("status") == "ok"]
    skipped = len(records) - len(usable)
    common = _common_overrides(usable)
    runs: list[_Run] = []
    commits: set[str] = set()
    for record in usable:
        try:
            run = _to_run(record, metric, common)
        except (KeyError, TypeError, ValueError) as exc:
            warnings.warn(f"skipping record {record.get('run_id')!r}: {exc!r}", UserWarning, stacklevel=3)
            skipped += 1
            continue
        runs.append(run)
        commits.add(_commit_label(record))
    return runs, TableProvenance(len(runs), skipped, tuple(sorted(commits)))


def _to_run(record: Mapping[str, Any], metric: str, common: set[tuple[str, str]]) -> _Run:
    spec = record["spec"]
    if metric not in record["metrics"]:
        raise KeyError(f"metric {metric!r} not in record")
    overrides = _override_pairs(spec.get("overrides") or {})
    label = ",".join(f"{k}={v}" for k, v in sorted(overrides - common))
    method = spec["method"] if not label else f"{spec['method']}[{label}]"
    return _Run(
        cell=(spec["suite"], spec["model"], spec["task"], spec["budget"]),
        method=method,
        base_method=spec["method"],
        overrides_label=label,
        seed=int(spec["seed"]),
        value=float(record["metrics"][metric]),
        params=int(record["trainable_params"]),
        calibration_seconds=float(record.get("calibration_seconds") or 0.0),
        train_seconds=float(record.get("train_seconds") or 0.0),
        run_id=str(record.get("run_id")),
    )


def _override_pairs(overrides: Mapping[str, Any]) -> set[tuple[str, str]]:
    # Values are JSON-encoded so nested values compare and print the same way everywhere.
    return {(key, json.dumps(value, sort_keys=True)) for key, value in overrides.items()}


def _common_overrides(records: list[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """Override (key, value) pairs that are the usual setting: for each key, its most frequent value.

    A record without the key counts as a value of its own ("absent"), so a key that only an ablation sets
    stays in that ablation's label. Ties go to a set value over absence, then to the smaller JSON text,
    so labels never depend on record order.
    """
    sets = [_override_pairs((r.get("spec") or {}).get("overrides") or {}) for r in records]
    keys = {key for pairs in sets for key, _ in pairs}
    counts: dict[str, Counter[str | None]] = defaultdict(Counter)
    for pairs in sets:
        present = dict(pairs)
        for key in keys:
            counts[key][present.get(key)] += 1
    usual = set()
    for key, values in counts.items():
        value, _ = min(values.items(), key=lambda kv: (-kv[1], kv[0] is None, kv[0] or ""))
        if value is not None:
            usual.add((key, value))
    return usual


def _commit_label(record: Mapping[str, Any]) -> str:
    # Old records say "unknown" for a commit that could not be read, new ones None: both read "unknown".
    return commit_label((record.get("provenance") or {}).get("git"))


def _group_runs(runs: list[_Run]) -> dict[tuple[CellKey, str], dict[int, _Run]]:
    """Group runs by (cell, method label) and index them by seed; a repeated seed is an error."""
    groups: dict[tuple[CellKey, str], dict[int, _Run]] = defaultdict(dict)
    for run in runs:
        by_seed = groups[(run.cell, run.method)]
        if run.seed in by_seed:
            raise ValueError(
                f"two records for the same run: {by_seed[run.seed].run_id!r} and {run.run_id!r} "
                f"({run.cell}, {run.method}, seed {run.seed}); remove one"
            )
        by_seed[run.seed] = run
    return dict(sorted(groups.items(), key=lambda item: _sort_key(*item[0])))


def _sort_key(cell: CellKey, method: str) -> tuple[Any, ...]:
    suite, model, task, budget = cell
    base = method.split("[", 1)[0]
    order = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (suite, model, natural_key(budget), task, order, natural_key(method))


def _find_baseline(
    groups: Mapping[tuple[CellKey, str], dict[int, _Run]], cell: CellKey, method: str, baseline: str
) -> str | None:
    """Label of the baseline group for ``method`` in ``cell``.

    Prefers the baseline with the same overrides (an ablation of the learning rate is compared with the
    baseline at that learning rate); otherwise the only baseline variant in the cell, if unambiguous.
    """
    candidates = [label for (c, label), runs in groups.items() if c == cell and _base(runs) == baseline]
    suffix = method[len(method.split("[", 1)[0]) :]
    same = f"{baseline}{suffix}"
    if same in candidates:
        return same
    return candidates[0] if len(candidates) == 1 else None


def _base(runs: dict[int, _Run]) -> str:
    return next(iter(runs.values())).base_method


def _group_rows(
    groups: Mapping[tuple[CellKey, str], dict[int, _Run]], baseline: str, param_tolerance: float
) -> tuple[GroupRow, ...]:
    rows = []
    for (cell, method), by_seed in groups.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        mean, std = mean_std([r.value for r in runs])
        params = _mean([r.params for r in runs])
        base_label = _find_baseline(groups, cell, method, baseline)
        ratio = None
        if base_label is not None:
            base_params = _mean([r.params for r in groups[(cell, base_label)].values()])
            ratio = params / base_params if base_params > 0 else None
        rows.append(
            GroupRow(
                *cell,
                method=method,
                seeds=tuple(sorted(by_seed)),
                mean=mean,
                std=std,
                params_mean=params,
                param_ratio=ratio,
                param_flag=ratio is not None and abs(ratio - 1.0) > param_tolerance,
                calibration_seconds=_mean([r.calibration_seconds for r in runs]),
                train_seconds=_mean([r.train_seconds for r in runs]),
            )
        )
    return tuple(rows)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _pairs(
    groups: Mapping[tuple[CellKey, str], dict[int, _Run]], baseline: str
) -> Iterator[tuple[CellKey, str, str, list[float], list[float]]]:
    """``(cell, method, baseline label, method values, baseline values)``, paired by seed.

    Only seeds both methods finished enter; cells without a baseline, or with no common seed, are skipped.
    """
    for (cell, method), by_seed in groups.items():
        if _base(by_seed) == baseline:
            continue
        base_label = _find_baseline(groups, cell, method, baseline)
        if base_label is None:
            continue
        base_by_seed = groups[(cell, base_label)]
        seeds = sorted(set(by_seed) & set(base_by_seed))
        if seeds:
            yield (
                cell,
                method,
                base_label,
                [by_seed[k].value for k in seeds],
                [base_by_seed[k].value for k in seeds],
            )


def _compare(
    groups: Mapping[tuple[CellKey, str], dict[int, _Run]],
    baseline: str,
    higher_is_better: bool,
    alpha: float,
    n_boot: int,
    tol: float | None,
    seed: int,
    min_pairs: int,
) -> tuple[Comparison, ...]:
    comparisons = []
    for cell, method, base_label, a, b in _pairs(groups, baseline):
        diff, low, high = paired_bootstrap_ci(a, b, n_boot=n_boot, alpha=alpha, seed=seed)
        verdict = (
            classify_paired(
                a, b, tol=tol, higher_is_better=higher_is_better, n_boot=n_boot, alpha=alpha, seed=seed
            )
            if len(a) >= min_pairs
            else NO_VERDICT
        )
        p_value = sign_flip_permutation_pvalue(a, b, n_perm=n_boot, seed=seed)
        comparisons.append(Comparison(*cell, method, base_label, len(a), diff, low, high, p_value, verdict))
    return tuple(comparisons)


def _pool(
    groups: Mapping[tuple[CellKey, str], dict[int, _Run]], baseline: str, alpha: float, n_boot: int, seed: int
) -> tuple[PooledComparison, ...]:
    """Pool the seed pairs of every task per (suite, model, budget, method); see :class:`PooledComparison`."""
    pooled: dict[tuple[str, str, str, str, str], tuple[list[float], list[float], set[str]]] = {}
    for (suite, model, task, budget), method, base_label, a, b in _pairs(groups, baseline):
        xs, ys, tasks = pooled.setdefault((suite, model, budget, method, base_label), ([], [], set()))
        xs.extend(a)
        ys.extend(b)
        tasks.add(task)
    out = []
    for (suite, model, budget, method, base_label), (a, b, tasks) in pooled.items():
        diff, low, high = paired_bootstrap_ci(a, b, n_boot=n_boot, alpha=alpha, seed=seed)
        p_value = sign_flip_permutation_pvalue(a, b, n_perm=n_boot, seed=seed)
        out.append(
            PooledComparison(
                suite, model, budget, method, base_label, len(tasks), len(a), diff, low, high, p_value
            )
        )
    return tuple(
        sorted(out, key=lambda c: (c.suite, c.model, c.budget, _sort_key(("", "", "", ""), c.method)))
    )


def _costs(rows: Sequence[GroupRow], baseline: str) -> tuple[CostSummary, ...]:
    """Pool the groups' mean times per (suite, model, budget, method); see :class:`CostSummary`."""
    by_method: dict[tuple[str, str, str, str], list[GroupRow]] = defaultdict(list)
    for row in rows:
        by_method[(row.suite, row.model, row.budget, row.method)].append(row)
    base = {(r.suite, r.model, r.budget, r.task): r for r in rows if r.method == baseline}
    out = []
    for (suite, model, budget, method), group in by_method.items():
        n = sum(r.n for r in group)
        calib = sum(r.calibration_seconds * r.n for r in group) / n
        train = sum(r.train_seconds * r.n for r in group) / n
        refs = [base.get((suite, model, budget, r.task)) for r in group]
        ratio = None
        if all(ref is not None for ref in refs):
            ref_total = sum(
                (ref.calibration_seconds + ref.train_seconds) * r.n
                for ref, r in zip(refs, group, strict=True)
                if ref is not None
            )
            ratio = (calib + train) * n / ref_total if ref_total > 0 else None
        out.append(CostSummary(suite, model, budget, method, len(group), n, calib, train, ratio))
    return tuple(
        sorted(
            out,
            key=lambda c: (c.suite, c.model, natural_key(c.budget), _sort_key(("", "", "", ""), c.method)),
        )
    )


def _summarise(comparisons: Sequence[Comparison]) -> tuple[MethodSummary, ...]:
    counts: dict[str, dict[str, int]] = {}
    for comp in comparisons:
        tally = counts.setdefault(comp.method, {"win": 0, "tie": 0, "loss": 0})
        if comp.verdict != NO_VERDICT:
            tally[comp.verdict] += 1
    order = sorted(counts, key=lambda m: _sort_key(("", "", "", ""), m))
    return tuple(MethodSummary(m, counts[m]["win"], counts[m]["tie"], counts[m]["loss"]) for m in order)
