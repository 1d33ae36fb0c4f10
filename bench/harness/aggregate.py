"""Aggregate run records into result tables, paired comparisons against ``uniform``, and a report.

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
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fimlora.io import atomic_write_text

from .record import commit_label
from .stats import classify_paired, mean_std, paired_bootstrap_ci, sign_flip_permutation_pvalue

__all__ = [
    "METHOD_ORDER",
    "MIN_PAIRS_FOR_VERDICT",
    "NO_VERDICT",
    "Comparison",
    "GroupRow",
    "MethodSummary",
    "PooledComparison",
    "ResultTable",
    "TableProvenance",
    "aggregate",
    "to_markdown",
    "write_report",
]

METHOD_ORDER: tuple[str, ...] = ("uniform", "fim", "fim-variance", "eva", "adalora", "l1ra", "lrlora")
"""Display order of methods in reports: the baseline first, then the allocation methods by family; a
method not listed comes last. A deliberate order, not the list of all methods: each name must be a
:func:`~bench.harness.experiment.known_methods` name (tests/bench checks it; this module stays torch-free)."""

CellKey = tuple[str, str, str, str]  # (suite, model, task, budget)


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
    return (suite, model, _natural_key(budget), task, order, _natural_key(method))


def _natural_key(text: str) -> tuple[Any, ...]:
    """Sort "r2" before "r16" (and "T=2" before "T=16"): digit runs compare as numbers.

    ``re.split`` with a capture group puts text at even positions and digit runs at odd ones, so two keys
    never compare a str with an int.
    """
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


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
            key=lambda c: (c.suite, c.model, _natural_key(c.budget), _sort_key(("", "", "", ""), c.method)),
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


# ----------------------------------------------------------------------------------------------------
# Rendering


def to_markdown(table: ResultTable, *, digits: int = 2, scale: float = 1.0) -> str:
    """Render the tables as Markdown.

    Args:
        table: Output of :func:`aggregate`.
        digits: Decimals of metric values (``88.61 ± 0.42`` with 2).
        scale: Multiply metric values (means, stds, differences) by this for display, e.g. 100 to show
            fractional accuracies as percentages. Parameter counts and times are never scaled.

    Returns:
        Markdown text: a header, then the groups, comparisons and summary tables, each followed by the
        record count and git commits it was built from.
    """
    direction = "higher is better" if table.higher_is_better else "lower is better"
    level = f"{100 * (1 - table.alpha):g}%"
    source = _provenance_line(table.provenance)
    lines = [f"# Results: `{table.metric}` ({direction})", ""]
    lines += ["## Groups", "", *_groups_table(table, digits, scale), "", source, ""]
    lines += [f"## Paired comparison vs `{table.baseline}` ({level} bootstrap CI, sign-flip p)", ""]
    lines += [*_comparisons_table(table, digits, scale, level), ""]
    lines += [
        f"Verdict: win / loss when the whole CI is above / below 0, else tie; `{NO_VERDICT}` with fewer "
        f"than {table.min_pairs} seed pairs (not counted below).",
        "",
        source,
        "",
    ]
    if table.pooled:
        lines += [
            f"## Pooled over tasks vs `{table.baseline}` ({level} bootstrap CI over pairs, sign-flip p)",
            "",
        ]
        lines += [*_pooled_table(table, digits, scale, level), ""]
        lines += [
            "Every (task, seed) pair of a budget in one test: valid when tasks differ in scale (each "
            "difference need only be symmetric about 0 under H0); the mean weights every task by its seeds.",
            "",
            source,
            "",
        ]
    lines += [f"## Win / tie / loss vs `{table.baseline}`", "", *_summary_table(table), "", source, ""]
    if table.costs:
        lines += ["## Cost pooled over tasks (mean seconds per run)", "", *_costs_table(table), ""]
        lines += [
            "Wall-clock time as each run recorded it: calibration (or initialisation) and training, "
            "evaluation excluded. Times depend on what else the machine ran then: compare methods that "
            "ran together (one grid, interleaved), not rows from grids run at different times.",
            "",
            source,
        ]
    return "\n".join(lines) + "\n"


def _provenance_line(prov: TableProvenance) -> str:
    commits = ", ".join(f"`{_short_commit(c)}`" for c in prov.git_commits) or "none"
    return f"_Built from {prov.n_records} records ({prov.n_skipped} skipped: failed or unusable); git: {commits}._"


def _short_commit(commit: str) -> str:
    head, _, dirty = commit.partition("+")
    return head[:12] + (f"+{dirty}" if dirty else "")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _fmt_mean_std(mean: float, std: float, digits: int, scale: float) -> str:
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"  # one seed: no spread to report
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _groups_table(table: ResultTable, digits: int, scale: float) -> list[str]:
    header = ["suite", "model", "task", "budget", "method", "n", table.metric, "params"]
    header += [f"params / {table.baseline}", "calib s", "train s"]
    rows = []
    for row in table.rows:
        ratio = "–" if row.param_ratio is None else f"{row.param_ratio:.3f}"
        if row.param_flag:
            ratio += " ⚠ off-budget"
        rows.append(
            [
                row.suite,
                row.model,
                row.task,
                row.budget,
                row.method,
                str(row.n),
                _fmt_mean_std(row.mean, row.std, digits, scale),
                f"{row.params_mean:,.0f}",
                ratio,
                f"{row.calibration_seconds:.1f}",
                f"{row.train_seconds:.1f}",
            ]
        )
    return _md_table(header, rows)


def _fmt_signed(value: float, digits: int, scale: float) -> str:
    return "–" if math.isnan(value) else f"{value * scale:+.{digits}f}"


def _difference_cells(comp: Comparison | PooledComparison, digits: int, scale: float) -> list[str]:
    """The Δ, CI and p cells shared by the per-task and the pooled comparison tables."""
    ci = f"[{_fmt_signed(comp.ci_low, digits, scale)}, {_fmt_signed(comp.ci_high, digits, scale)}]"
    return [str(comp.n_pairs), _fmt_signed(comp.mean_diff, digits, scale), ci, f"{comp.p_value:.3g}"]


def _comparisons_table(table: ResultTable, digits: int, scale: float, level: str) -> list[str]:
    header = ["suite", "model", "task", "budget", "method", "pairs", f"Δ {table.metric}", f"{level} CI"]
    header += ["p", "verdict"]
    rows = [
        [c.suite, c.model, c.task, c.budget, c.method, *_difference_cells(c, digits, scale), c.verdict]
        for c in table.comparisons
    ]
    return _md_table(header, rows)


def _pooled_table(table: ResultTable, digits: int, scale: float, level: str) -> list[str]:
    header = ["suite", "model", "budget", "method", "tasks", "pairs", f"Δ {table.metric}", f"{level} CI", "p"]
    rows = [
        [c.suite, c.model, c.budget, c.method, str(c.n_tasks), *_difference_cells(c, digits, scale)]
        for c in table.pooled
    ]
    return _md_table(header, rows)


def _costs_table(table: ResultTable) -> list[str]:
    header = ["suite", "model", "budget", "method", "tasks", "runs", "calib s", "train s", "total s"]
    header.append(f"total / {table.baseline}")
    rows = [
        [
            c.suite,
            c.model,
            c.budget,
            c.method,
            str(c.n_tasks),
            str(c.n_runs),
            f"{c.calibration_seconds:.2f}",
            f"{c.train_seconds:.2f}",
            f"{c.total_seconds:.2f}",
            "–" if c.total_ratio is None else f"{c.total_ratio:.2f}",
        ]
        for c in table.costs
    ]
    return _md_table(header, rows)


def _summary_table(table: ResultTable) -> list[str]:
    rows = [[s.method, str(s.wins), str(s.ties), str(s.losses)] for s in table.summary]
    return _md_table(["method", "wins", "ties", "losses"], rows)


def write_report(
    records: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    metric: str = "accuracy",
    digits: int = 2,
    scale: float = 1.0,
    **aggregate_kwargs: Any,
) -> list[Path]:
    """Write ``results.md`` and, if matplotlib is installed, one bar chart PNG per budget.

    Args:
        records: Run records.
        out_dir: Output directory (created).
        metric: Metric to report.
        digits: Decimals in the Markdown.
        scale: Display scale of metric values (see :func:`to_markdown`).
        **aggregate_kwargs: Passed to :func:`aggregate` (``baseline``, ``higher_is_better``...).

    Returns:
        Paths written, ``results.md`` first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(records, metric=metric, **aggregate_kwargs)
    md_path = out / "results.md"
    atomic_write_text(md_path, to_markdown(table, digits=digits, scale=scale))
    written = [md_path]
    try:
        written += _write_charts(table, out, scale)
    except ImportError:
        pass  # matplotlib is optional; the Markdown is the primary artefact
    return written


def _write_charts(table: ResultTable, out: Path, scale: float) -> list[Path]:
    """One grouped bar chart per budget: tasks on x, one bar per method, sample-std error bars."""
    # Figure + Agg canvas directly, not pyplot: no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    budgets = sorted({row.budget for row in table.rows}, key=_natural_key)
    for budget in budgets:
        rows = [row for row in table.rows if row.budget == budget]
        tasks = list(dict.fromkeys(_task_label(row, table.rows) for row in rows))
        methods = list(dict.fromkeys(row.method for row in rows))
        width = 0.8 / len(methods)
        fig = Figure(figsize=(max(4.0, 1.2 * len(tasks) * max(1, len(methods)) * 0.5 + 2), 4.0))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for j, method in enumerate(methods):
            by_task = {_task_label(r, table.rows): r for r in rows if r.method == method}
            xs = [i + (j - (len(methods) - 1) / 2) * width for i, t in enumerate(tasks) if t in by_task]
            present = [by_task[t] for t in tasks if t in by_task]
            heights = [r.mean * scale for r in present]
            errs = [0.0 if math.isnan(r.std) else r.std * scale for r in present]
            ax.bar(xs, heights, width=width, yerr=errs, capsize=2, label=method)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_ylabel(table.metric)
        prov = table.provenance
        ax.set_title(f"{table.metric} at budget {budget} ({prov.n_records} records)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"results_{re.sub(r'[^A-Za-z0-9._-]+', '_', budget)}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def _task_label(row: GroupRow, rows: Sequence[GroupRow]) -> str:
    """Task name, prefixed with the model only when the report mixes several models."""
    if len({r.model for r in rows}) > 1:
        return f"{row.model}:{row.task}"
    return row.task
