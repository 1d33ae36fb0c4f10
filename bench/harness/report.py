"""Render a :class:`~bench.harness.tables.ResultTable` as a Markdown report and bar charts.

:func:`write_report` is what ``python -m bench.run --report`` calls: it aggregates the records
(:func:`~bench.harness.aggregate.aggregate`), writes ``results.md`` (:func:`to_markdown`) and, when
matplotlib is installed, one bar chart PNG per budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fimlora.io import atomic_write_text

from .aggregate import aggregate
from .tables import (
    NO_VERDICT,
    Comparison,
    GroupRow,
    PooledComparison,
    ResultTable,
    TableProvenance,
    natural_key,
)

__all__ = ["to_markdown", "write_report"]


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
    """One figure per budget: a column per task, a row per method, its mean as a dot with sample-std bars.

    Dots on each task's own range, not bars from zero: the differences between methods are a point or two
    on accuracies near 90 %, which bars from zero would hide. Methods on the y axis keep long labels (an
    ablation's settings) readable.
    """
    # Figure + Agg canvas directly, not pyplot: no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    budgets = sorted({row.budget for row in table.rows}, key=natural_key)
    for budget in budgets:
        rows = [row for row in table.rows if row.budget == budget]
        tasks = list(dict.fromkeys(_task_label(row, table.rows) for row in rows))
        methods = list(dict.fromkeys(row.method for row in rows))
        label_width = 0.07 * max(len(m) for m in methods)  # inches for the longest method label
        fig = Figure(
            figsize=(label_width + 2.3 * len(tasks) + 0.5, 0.26 * len(methods) + 1.3), layout="constrained"
        )
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
        for ax, task in zip(axes, tasks, strict=True):
            by_method = {r.method: r for r in rows if _task_label(r, table.rows) == task}
            for j, method in enumerate(methods):
                row = by_method.get(method)
                if row is None:
                    continue
                err = 0.0 if math.isnan(row.std) else row.std * scale
                ax.errorbar([row.mean * scale], [j], xerr=[err], fmt="o", capsize=3, color=f"C{j % 10}")
            ax.set_title(task, fontsize="medium")
            ax.grid(axis="x", alpha=0.3)
            ax.set_xlabel(table.metric, fontsize="small")
        axes[0].set_yticks(range(len(methods)), methods, fontsize="small")
        axes[0].set_ylim(len(methods) - 0.5, -0.5)  # first method on top
        prov = table.provenance
        fig.suptitle(
            f"{table.metric} at budget {budget}: mean ± sample std over seeds ({prov.n_records} records)"
        )
        path = out / f"results_{re.sub(r'[^A-Za-z0-9._-]+', '_', budget)}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def _task_label(row: GroupRow, rows: Sequence[GroupRow]) -> str:
    """Task name, prefixed with the model only when the report mixes several models."""
    if len({r.model for r in rows}) > 1:
        return f"{row.model}:{row.task}"
    return row.task
