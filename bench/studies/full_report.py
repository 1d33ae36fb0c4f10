"""The report of the full-length test grid: headline tables, the accuracy-vs-parameters front, the controls.

Reads the test store (``bench/results/full/test``; every record evaluated once, at the end, on the test split)
and writes into ``--out``:

* ``test.md`` / ``test.json``: each method against uniform LoRA at r8's parameter count, pooled over the
  tasks and per task (paired by seed: bootstrap CI, sign-flip p, win/tie/loss from the harness); whether
  FIM-LoRA beats both random-allocation controls on each task (where it does not, its score carried no
  information there); the smallest budget at which uniform and FIM-LoRA come within ``--margin`` points of
  uniform r8 (per task and pooled);
* ``front.png``: accuracy vs LoRA parameters per task and pooled (uniform and fim at r2/r4/r8, every
  other method at r8);
* ``test/results.md`` and its charts: the harness's full tables.

Usage::

    python -m bench.studies.full_report --store bench/results/full/test --out docs/results/full \
        --grid bench/grids/full/test*.yaml

With ``--grid`` (the grids that fill the store) the report opens with how many of their runs exist, seed by
seed, so an interim report says what it is.

Torch-free: records are plain JSON; matplotlib is imported for the figure only.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import METHOD_ORDER, ResultStore, aggregate, mean_std, write_report
from bench.harness.tables import NO_VERDICT, natural_key
from bench.studies.protocol import (
    CONTROLS,
    accuracy_percent,
    of_seeds,
    records_on_split,
    seeds_arg,
    variant_name,
)
from bench.studies.variants import VARIANTS
from bench.suites.data import majority_rates
from fimlora.io import atomic_write_json, atomic_write_text

__all__ = [
    "FrontPoint",
    "budget_to_match",
    "compression_comparison",
    "control_verdicts",
    "front_methods",
    "front_points",
    "grid_progress",
    "main",
    "method_styles",
    "pooled_front",
    "test_split_records",
]

FRONT_METHODS: tuple[str, ...] = ("uniform", "fim")
"""Methods the test grid runs at several budgets (r2, r4, r8 parameter counts): the lines of the front. Any
other method or variant found at several budgets (issue 13's chosen variant) joins them: :func:`front_methods`."""

COMMAND = "python -m bench.studies.full_report"
"""How this study runs: the last line of ``test.md`` names it."""


def front_methods(points: Iterable[FrontPoint]) -> list[str]:
    """:data:`FRONT_METHODS` and, after them, every other method with points at two or more budgets."""
    budgets: dict[str, set[str]] = defaultdict(set)
    for p in points:
        budgets[p.method].add(p.budget)
    extra = sorted(m for m, b in budgets.items() if len(b) > 1 and m not in FRONT_METHODS)
    return [*FRONT_METHODS, *extra]


REFERENCE = ("uniform", "r8")

TRAINED_BUDGET_OF_FRACTION: dict[str, str] = {"0.5": "r4", "0.25": "r2"}
"""Issue 14: an r8 adapter compressed to this fraction of its LoRA parameters is compared with training at
this budget directly (r4 and r2 have half and a quarter of r8's parameters)."""


@dataclass(frozen=True)
class FrontPoint:
    """Mean test accuracy (%) of one (task, method, budget) over its seeds, at its mean LoRA parameter count;
    ``values`` are the per-seed accuracies in the order of ``seeds``."""

    task: str
    method: str
    budget: str
    lora_params: float
    mean: float
    std: float
    seeds: tuple[int, ...]
    values: tuple[float, ...] = ()


PER_METHOD_SETTINGS: frozenset[str] = frozenset(
    {"lr", "method_options", "compress_fractions", "variant"}
    | {key for _, extra in VARIANTS.values() for key in extra}
)
"""Override keys that the protocol sets per method (its chosen learning rate and options, issue 14's
compression, a variant's settings): part of what a method *is*, not a different configuration, so the
report names a run by its method (or variant) alone."""


def test_split_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The finished test-split records, each named by its variant (or method) with the per-method settings
    (:data:`PER_METHOD_SETTINGS`) left out of its overrides, so runs of one method at its own learning rate
    compare with another's at a different one (the harness labels a run by the overrides not shared by all).

    Raises:
        WrongSplit: (a ValueError) a record evaluated on another split (a selection record in the test store).
    """
    out = []
    for record in records_on_split(
        records, "test", reader="the test report", hint="selection records belong in their own store"
    ):
        overrides = record["spec"].get("overrides") or {}
        spec = {
            **record["spec"],
            "method": variant_name(record),
            "overrides": {k: v for k, v in overrides.items() if k not in PER_METHOD_SETTINGS},
        }
        out.append({**record, "spec": spec})
    return out


def _lora_params(record: Mapping[str, Any]) -> int:
    extra = record.get("extra") or {}
    return int(extra.get("lora_params", record["trainable_params"]))


def front_points(records: Iterable[Mapping[str, Any]]) -> list[FrontPoint]:
    """One point per (task, method, budget) of the finished test-split records (accuracy in %)."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for record in test_split_records(records):
        spec = record["spec"]
        groups[(spec["task"], spec["method"], spec["budget"])].append(record)
    points = []
    for (task, method, budget), group in groups.items():
        group = sorted(group, key=lambda r: int(r["spec"]["seed"]))
        accs = [accuracy_percent(r) for r in group]
        mean, std = mean_std(accs)
        points.append(
            FrontPoint(
                task,
                method,
                budget,
                math.fsum(_lora_params(r) for r in group) / len(group),
                mean,
                std,
                tuple(int(r["spec"]["seed"]) for r in group),
                tuple(accs),
            )
        )
    return sorted(points, key=_point_key)


def _point_key(p: FrontPoint) -> tuple[Any, ...]:
    order = METHOD_ORDER.index(p.method) if p.method in METHOD_ORDER else len(METHOD_ORDER)
    return (p.task, order, p.method, natural_key(p.budget))


def pooled_front(points: Sequence[FrontPoint]) -> list[FrontPoint]:
    """The mean over tasks of each (method, budget) that every task has, with the same seeds everywhere
    (so pooled points compare like with like); task ``"pooled"``. Its ``values`` are the per-seed means over
    tasks and its ``std`` is their spread over seeds (not the spread between tasks, which is their
    difficulty)."""
    tasks = sorted({p.task for p in points})
    by_key: dict[tuple[str, str], dict[str, FrontPoint]] = defaultdict(dict)
    for p in points:
        by_key[(p.method, p.budget)][p.task] = p
    out = []
    for (method, budget), per_task in by_key.items():
        if sorted(per_task) != tasks or len({p.seeds for p in per_task.values()}) != 1:
            continue
        seeds = per_task[tasks[0]].seeds
        per_seed = tuple(
            math.fsum(per_task[t].values[i] for t in tasks) / len(tasks) for i in range(len(seeds))
        )
        mean, std = mean_std(per_seed)
        params = math.fsum(per_task[t].lora_params for t in tasks) / len(tasks)
        out.append(FrontPoint("pooled", method, budget, params, mean, std, seeds, per_seed))
    return sorted(out, key=_point_key)


BUDGET_TOLERANCE = 0.01
"""Issue 12: every method holds uniform LoRA's parameter count at the same budget within 1%."""


def budget_ratios(points: Iterable[FrontPoint]) -> dict[tuple[str, str], tuple[float, float]]:
    """(method, budget) -> the smallest and largest ratio, over tasks, of its mean LoRA parameter count to
    uniform LoRA's at the same budget on the same task (1.0 is the budget held exactly)."""
    points = list(points)
    uniform = {(p.task, p.budget): p.lora_params for p in points if p.method == "uniform"}
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for p in points:
        base = uniform.get((p.task, p.budget))
        if base:
            ratios[(p.method, p.budget)].append(p.lora_params / base)
    return {key: (min(r), max(r)) for key, r in ratios.items()}


def budget_to_match(
    points: Sequence[FrontPoint], *, margin: float = 0.5, methods: Sequence[str] | None = None
) -> dict[str, dict[str, str | None]]:
    """Task -> method -> the smallest budget whose mean is within ``margin`` points of uniform r8's mean
    (``None`` when no budget is), for ``methods`` (default: :func:`front_methods`). Tasks without a uniform
    r8 point are left out. ``"incomplete"`` where no budget reaches it yet but the method lacks one of the
    budgets uniform has on the task: a missing run, not a verdict."""
    methods = front_methods(points) if methods is None else methods
    by_task: dict[str, dict[tuple[str, str], FrontPoint]] = defaultdict(dict)
    for p in points:
        by_task[p.task][(p.method, p.budget)] = p
    out: dict[str, dict[str, str | None]] = {}
    for task, cell in sorted(by_task.items()):
        if REFERENCE not in cell:
            continue
        target = cell[REFERENCE].mean - margin
        out[task] = {}
        for method in methods:
            mine = sorted((p for (m, _), p in cell.items() if m == method), key=lambda p: p.lora_params)
            hit = next((p.budget for p in mine if p.mean >= target), None)
            uniform_budgets = {b for (m, b) in cell if m == REFERENCE[0]}
            if hit is None and not uniform_budgets <= {p.budget for p in mine}:
                hit = "incomplete"
            out[task][method] = hit
    return out


def control_verdicts(
    records: Iterable[Mapping[str, Any]], *, method: str = "fim", budget: str = "r8"
) -> dict[str, Any]:
    """``method`` against each control, per task and pooled, paired by seed (the harness's statistics).

    Returns ``{"per_task": {task: {control: {diff, ci, p, verdict}}, ...}, "pooled": {control: {...}},
    "informative": {task: bool | None}}``: informative where ``method`` wins against every control; None
    (undecided) where a control is missing or has too few seed pairs for a verdict.
    """
    records = [r for r in test_split_records(records) if r["spec"]["budget"] == budget]
    per_task: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    pooled: dict[str, dict[str, Any]] = {}
    for control in CONTROLS:
        subset = [r for r in records if r["spec"]["method"] in (method, control)]
        if not any(r["spec"]["method"] == control for r in subset):
            continue
        table = aggregate(subset, baseline=control)
        for c in table.comparisons:
            if c.method == method:
                per_task[c.task][control] = {
                    "n_pairs": c.n_pairs,
                    "diff": 100 * c.mean_diff,
                    "ci": [100 * c.ci_low, 100 * c.ci_high],
                    "p": c.p_value,
                    "verdict": c.verdict,
                }
        for pc in table.pooled:
            if pc.method == method:
                pooled[control] = {
                    "n_pairs": pc.n_pairs,
                    "n_tasks": pc.n_tasks,
                    "diff": 100 * pc.mean_diff,
                    "ci": [100 * pc.ci_low, 100 * pc.ci_high],
                    "p": pc.p_value,
                }
    informative: dict[str, bool | None] = {}
    for task, cmp in per_task.items():
        verdicts = [cmp.get(c, {}).get("verdict", NO_VERDICT) for c in CONTROLS]
        informative[task] = None if NO_VERDICT in verdicts else all(v == "win" for v in verdicts)
    return {"per_task": dict(per_task), "pooled": pooled, "informative": informative}


def compression_comparison(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14: every (task, method, fraction) of the r8 runs' ``extra.compress`` against the same method
    trained at the equal budget (:data:`TRAINED_BUDGET_OF_FRACTION`), paired by seed, per task and pooled.

    Returns rows ``{task, method, fraction, compressed (mean %), trained (mean %), diff, ci, pairs,
    compressed_params, trained_params, kept_energy}``; ``task == "pooled"`` pools all (task, seed) pairs.
    """
    from bench.harness import paired_bootstrap_ci

    records = test_split_records(records)
    trained: dict[tuple[str, str, str, int], Mapping[str, Any]] = {}
    for r in records:
        spec = r["spec"]
        trained[(spec["task"], spec["method"], spec["budget"], int(spec["seed"]))] = r
    pairs: dict[tuple[str, str, str], list[tuple[float, float, float, float, float]]] = defaultdict(list)
    for r in records:
        spec = r["spec"]
        if spec["budget"] != "r8":
            continue
        for fraction, result in (r.get("extra") or {}).get("compress", {}).items():
            budget = TRAINED_BUDGET_OF_FRACTION.get(fraction)
            other = trained.get((spec["task"], spec["method"], budget or "", int(spec["seed"])))
            if budget is None or other is None:
                continue
            pairs[(spec["task"], spec["method"], fraction)].append(
                (
                    100.0 * float(result["accuracy"]),
                    accuracy_percent(other),
                    float(result["lora_params"]),
                    float(_lora_params(other)),
                    float(result.get("kept_energy_fraction", math.nan)),
                )
            )
    pooled: dict[tuple[str, str], list[tuple[float, float, float, float, float]]] = defaultdict(list)
    for (_, method, fraction), values in pairs.items():
        pooled[(method, fraction)].extend(values)
    rows = []
    cells = [((t, m, f), v) for (t, m, f), v in sorted(pairs.items())]
    cells += [(("pooled", m, f), v) for (m, f), v in sorted(pooled.items())]
    for (task, method, fraction), values in cells:
        a, b = [v[0] for v in values], [v[1] for v in values]
        diff, low, high = paired_bootstrap_ci(a, b)
        rows.append(
            {
                "task": task,
                "method": method,
                "fraction": fraction,
                "trained_budget": TRAINED_BUDGET_OF_FRACTION[fraction],
                "compressed": math.fsum(a) / len(a),
                "trained": math.fsum(b) / len(b),
                "diff": diff,
                "ci": [low, high],
                "pairs": len(values),
                "compressed_params": math.fsum(v[2] for v in values) / len(values),
                "trained_params": math.fsum(v[3] for v in values) / len(values),
                "kept_energy": math.fsum(v[4] for v in values) / len(values),
            }
        )
    return rows


def _fmt_ci(ci: Sequence[float]) -> str:
    if any(math.isnan(x) for x in ci):  # one seed pair: no interval
        return "[no CI]"
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _majority_lines(points: Sequence[FrontPoint], tasks: Sequence[str]) -> list[str]:
    floor = majority_rates(tasks)
    lines = [
        "",
        "## Above the majority class?",
        "",
        "The majority-class rate is the test accuracy of always predicting the training split's most frequent",
        "class. Each cell: the method's mean test accuracy at r8 minus that rate (points).",
    ]
    lines += ["", "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines.append(
        "| *majority class (%)* | "
        + " | ".join(f"{floor[t]:.2f}" if floor.get(t) is not None else "?" for t in tasks)
        + " |"
    )
    cells = {(p.task, p.method): p for p in points if p.budget == "r8"}
    for method in dict.fromkeys(p.method for p in points if p.budget == "r8"):
        row = []
        for task in tasks:
            p, base = cells.get((task, method)), floor.get(task)
            row.append(f"{p.mean - base:+.2f}" if p is not None and base is not None else "–")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def _fmt_mean(p: FrontPoint) -> str:
    spread = "" if math.isnan(p.std) else f" ± {p.std:.2f}"  # one seed has no sample std
    return f"{p.mean:.2f}{spread} ({len(p.seeds)})"


_INFORMATIVE = {True: "yes", False: "no", None: "n/a (too few seeds)"}


def _markdown(
    records: Sequence[Mapping[str, Any]],
    store: Path,
    out: Path,
    margin: float,
    progress: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[str, dict[str, Any]]:
    points = front_points(records)
    pooled = pooled_front(points)
    table = aggregate(records)
    controls = control_verdicts(records)
    lines_of_front = front_methods(points)
    match = budget_to_match([*points, *pooled], margin=margin, methods=lines_of_front)
    lines = [
        "# Full-length encoder grid: test results",
        "",
        *(_progress_lines(progress) if progress else []),
        "Test accuracy (%), each run evaluated once, at the end, on the task's full test split; learning rates",
        "and every other choice were made on the dev split beforehand ([protocol](README.md)). Differences are",
        "against uniform LoRA at the same LoRA parameter count, paired by seed (95% paired-bootstrap CI,",
        "sign-flip p; a win or loss needs the whole CI on one side of 0 and at least 3 seed pairs).",
        "",
        "## Pooled over the tasks",
        "",
        "| budget | method | tasks | pairs | mean diff | 95% CI | p |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for pc in table.pooled:
        ci = _fmt_ci([100 * pc.ci_low, 100 * pc.ci_high])
        lines.append(
            f"| {pc.budget} | {pc.method} | {pc.n_tasks} | {pc.n_pairs} | {100 * pc.mean_diff:+.2f} | {ci} | "
            f"{pc.p_value:.3f} |"
        )
    tasks = sorted({p.task for p in points})
    lines += [
        "",
        "## Per task: mean ± sample std over seeds (seeds)",
        "",
        "LoRA params: the first task's mean; × uniform: the range over tasks of the method's parameter count over",
        f"uniform LoRA's at the same budget (the protocol holds it within {BUDGET_TOLERANCE:.0%}; a ✗ marks a miss).",
        "",
        "| method | budget | LoRA params | × uniform | " + " | ".join(tasks) + " | mean of tasks |",
        "|---|---|---:|---|" + "---:|" * (len(tasks) + 1),
    ]
    cells = {(p.task, p.method, p.budget): p for p in points}
    pooled_cells = {(p.method, p.budget): p for p in pooled}
    ratios = budget_ratios(points)
    for method, budget in dict.fromkeys((p.method, p.budget) for p in points):
        row = [cells.get((t, method, budget)) for t in tasks]
        params = next(p.lora_params for p in row if p is not None)
        text = [_fmt_mean(p) if p else "–" for p in row]
        pc = pooled_cells.get((method, budget))
        low, high = ratios.get((method, budget), (math.nan, math.nan))
        held = "" if max(abs(low - 1), abs(high - 1)) <= BUDGET_TOLERANCE else " ✗"
        ratio = f"{low:.3f}–{high:.3f}{held}" if not math.isnan(low) else "–"
        lines.append(
            f"| {method} | {budget} | {params:,.0f} | {ratio} | "
            + " | ".join(text)
            + (f" | {pc.mean:.2f} |" if pc else " | – |")
        )
    lines += _majority_lines(points, tasks)
    lines += [
        "",
        "## Does FIM-LoRA's score carry information? FIM-LoRA vs the random-allocation controls (r8)",
        "",
        "`random`: ranks drawn at random within the same bounds and budget; `fim-shuffled`: FIM-LoRA's own ranks",
        "permuted among modules of the same shape. Where FIM-LoRA does not beat both, its score carried no",
        "information on that task.",
        "",
        "| task | vs random: diff [CI] verdict | vs fim-shuffled: diff [CI] verdict | informative |",
        "|---|---|---|---|",
    ]
    for task, cmp in sorted(controls["per_task"].items()):
        cols = []
        for control in CONTROLS:
            c = cmp.get(control)
            cols.append(f"{c['diff']:+.2f} {_fmt_ci(c['ci'])} {c['verdict']}" if c else "–")
        lines.append(
            f"| {task} | " + " | ".join(cols) + f" | {_INFORMATIVE[controls['informative'][task]]} |"
        )
    for control, c in controls["pooled"].items():
        lines.append(
            f"\nPooled vs {control}: {c['diff']:+.2f} {_fmt_ci(c['ci'])}, p = {c['p']:.3f} "
            f"({c['n_pairs']} pairs, {c['n_tasks']} tasks)."
        )
    lines += [
        "",
        f"## Parameters needed to come within {margin} points of uniform r8",
        "",
        "The smallest budget (by LoRA parameters) whose mean reaches uniform r8's mean minus the margin.",
        "",
        "| task | " + " | ".join(lines_of_front) + " |",
        "|---|" + "---|" * len(lines_of_front),
    ]
    for task, by_method in match.items():
        lines.append(f"| {task} | " + " | ".join(by_method.get(m) or "none" for m in lines_of_front) + " |")
    compression = compression_comparison(records)
    if compression:
        lines += [
            "",
            "## Compression after training (issue 14) vs training at the smaller budget",
            "",
            "Each r8 adapter compressed with `fimlora compress` to a fraction of its LoRA parameters (SVD of",
            "each module's update, one global budget), against the same method trained at that parameter count",
            "directly, paired by seed. Positive: compressing a larger adapter beats training a small one.",
            "",
            "| task | method | fraction | compressed | trained at | trained | diff [95% CI] | pairs | energy kept |",
            "|---|---|---:|---:|---|---:|---|---:|---:|",
        ]
        for c in compression:
            lines.append(
                f"| {c['task']} | {c['method']} | {c['fraction']} | {c['compressed']:.2f} | "
                f"{c['trained_budget']} | {c['trained']:.2f} | {c['diff']:+.2f} {_fmt_ci(c['ci'])} | "
                f"{c['pairs']} | {100 * c['kept_energy']:.1f}% |"
            )
    commits = sorted({str((r.get("provenance") or {}).get("git", {}).get("commit")) for r in records})
    grid_args = f" --grid {' '.join(progress['grids'])}" if progress else ""
    lines += [
        "",
        "![accuracy vs LoRA parameters](front.png)",
        "",
        f"{len(records)} records from `{store}`; commits {', '.join(c[:10] for c in commits)}. Full tables: "
        "[test/results.md](test/results.md).",
        "",
        f"Made with `{COMMAND} --store {store} --out {out}{seeds_arg(seeds)}{grid_args}`.",
        "",
    ]
    data = {
        "points": [asdict(p) for p in [*points, *pooled]],
        "controls": controls,
        "budget_to_match": match,
        "budget_ratios": {f"{m}@{b}": list(r) for (m, b), r in budget_ratios(points).items()},
        "compression": compression,
        "margin_points": margin,
        "n_records": len(records),
        **({"progress": progress} if progress else {}),
    }
    return "\n".join(lines), data


def method_styles(methods: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """(colour, marker, line style) per method, all distinct up to 20 methods.

    The first ten take matplotlib's default cycle (tab10); the next ten take tab20's lighter shade of the same
    hues, with dashed lines, so that an eleventh method never repeats the first one's look (the default cycle
    wraps after ten: with twelve methods, the eleventh was drawn exactly like the first).
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab20 = colormaps["tab20"]
    markers = "os^vD<>Pp*hX"
    styles: dict[str, tuple[str, str, str]] = {}
    for j, method in enumerate(methods):
        shade, hue = divmod(j % 20, 10)
        styles[method] = (
            to_hex(tab20(2 * hue + shade)),
            markers[j % len(markers)],
            "-" if shade == 0 else "--",
        )
    return styles


def _plot_front(points: Sequence[FrontPoint], path: Path) -> None:
    from fimlora.plot import new_figure, save_figure

    tasks = sorted({p.task for p in points if p.task != "pooled"}) + (
        ["pooled"] if any(p.task == "pooled" for p in points) else []
    )
    cols = 3
    rows = math.ceil(len(tasks) / cols)
    fig = new_figure(4.2 * cols, 3.4 * rows)
    methods = list(dict.fromkeys(p.method for p in sorted(points, key=_point_key)))
    lines_of_front = front_methods(points)
    styles = method_styles(methods)
    handles: dict[str, Any] = {}
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, method in enumerate(methods):
            mine = sorted(
                (p for p in points if p.task == task and p.method == method), key=lambda p: p.lora_params
            )
            if not mine:
                continue
            colour, marker, dashes = styles[method]
            style = dashes if method in lines_of_front else "none"
            # single-budget methods share one x: dodge them sideways (log axis: a factor) to keep them apart
            dodge = 1.0 if method in lines_of_front else 1.0 + 0.025 * (j - len(lines_of_front) + 1)
            handles[method] = ax.errorbar(
                [p.lora_params * dodge for p in mine],
                [p.mean for p in mine],
                yerr=[0.0 if math.isnan(p.std) else p.std for p in mine],
                marker=marker,
                color=colour,
                linestyle=style,
                capsize=2,
                label=method,
            )
        ax.set_xscale("log", base=2)
        # ticks at uniform LoRA's budgets (a log axis over one budget would have none)
        ticks = sorted((p.lora_params, p.budget) for p in points if p.task == task and p.method == "uniform")
        if ticks:
            ax.set_xticks([x for x, _ in ticks], [f"{b}\n{x / 1000:,.0f}k" for x, b in ticks])
            ax.minorticks_off()
        ax.set_title(task if task != "pooled" else "pooled: mean of tasks (bars: sd over seeds)")
        ax.set_xlabel("LoRA parameters")
        ax.set_ylabel("test accuracy (%)")
    # one legend for every method of every panel (a method may be missing from the first)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    save_figure(fig, path)


def grid_progress(records: Iterable[Mapping[str, Any]], grids: Sequence[Path]) -> dict[str, Any]:
    """How many of the runs that ``grids`` expand to have a finished record: overall and per seed.

    Returns ``{"present": n, "expected": m, "per_seed": {seed: [present, expected]}, "grids": [...]}``.
    """
    from bench.harness import ExperimentGrid
    from bench.progress import grid_progress as count_runs

    counted = count_runs([s for path in grids for s in ExperimentGrid.from_file(path).expand()], records)
    return {
        "present": counted.finished,
        "expected": counted.total,
        "per_seed": {seed: list(pair) for seed, pair in counted.per_seed.items()},
        "grids": [str(g) for g in grids],
    }


def _progress_lines(progress: Mapping[str, Any]) -> list[str]:
    seeds = "; ".join(f"seed {s}: {p} of {e}" for s, (p, e) in progress["per_seed"].items())
    line = f"{progress['present']} of {progress['expected']} runs of the test grids ({seeds})."
    if progress["present"] == progress["expected"]:
        return [f"Complete: {line}", ""]
    return [
        f"**Interim**: {line}",
        "Cells show how many seeds they hold; verdicts need all of them (see the protocol).",
        "",
    ]


def write_full_report(
    store: Path,
    out: Path,
    *,
    margin: float = 0.5,
    grids: Sequence[Path] = (),
    seeds: Sequence[int] | None = None,
) -> list[Path]:
    """Write ``test.md``, ``test.json``, ``front.png`` and ``test/`` (harness tables) into ``out``; with
    ``grids``, the report opens with their progress (:func:`grid_progress`, over every seed); with ``seeds``,
    the tables use only those seeds' records."""
    all_records = ResultStore(store).records()
    records = test_split_records(of_seeds(all_records, seeds))
    if not records:
        raise SystemExit(f"{store} holds no finished test-split records yet")
    out.mkdir(parents=True, exist_ok=True)
    progress = grid_progress(all_records, grids) if grids else None
    text, data = _markdown(records, store, out, margin, progress, seeds)
    written = [atomic_write_text(out / "test.md", text), atomic_write_json(out / "test.json", data)]
    written += write_report(records, out / "test", scale=100.0, digits=2)
    try:
        _plot_front([FrontPoint(**p) for p in data["points"]], out / "front.png")
        written.append(out / "front.png")
    except ImportError:
        pass
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, type=Path, help="the test store (bench/results/full/test)")
    parser.add_argument("--out", required=True, type=Path, help="report folder (docs/results/full)")
    parser.add_argument(
        "--margin", type=float, default=0.5, help="points below uniform r8 that count as matching"
    )
    parser.add_argument(
        "--grid",
        type=Path,
        nargs="+",
        default=[],
        help="the grids that fill the store: report their progress",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="only these seeds' records (an interim report on the complete seeds); default: all",
    )
    args = parser.parse_args(argv)
    try:
        reports = write_full_report(
            args.store, args.out, margin=args.margin, grids=args.grid, seeds=args.seeds
        )
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    for path in reports:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
