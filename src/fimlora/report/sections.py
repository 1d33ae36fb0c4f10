"""The comparison report shared by ``fimlora demo`` and ``fimlora compare``: :func:`write_comparison_report`.

First screen: what was compared, the conclusion (one sentence per method against the baseline), the
summary table. Then per-seed rows, what was run, rank maps (mean over seeds with every seed's map and
their agreement), training curves, wall-clock timings, and the command that reproduces the report.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fimlora.paired_stats import binomial_se, unpaired_difference_se
from fimlora.report.document import Report, format_mean_std
from fimlora.report.runs import (
    AccuracyComparison,
    RunRecord,
    compare_accuracy,
    method_label,
    paired_test,
    signed_points,
)

__all__ = [
    "baseline_method",
    "format_or_na",
    "runs_by_method",
    "write_comparison_report",
]


def baseline_method(runs: Sequence[RunRecord]) -> str:
    """The method the others are compared with: ``uniform`` when present, else the first run's."""
    methods = [r.method for r in runs]
    return "uniform" if "uniform" in methods else methods[0]


def runs_by_method(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Method -> its runs, in the order given."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return groups


def format_or_na(value: Any, spec: str) -> str:
    """``format(value, spec)``, or ``n/a`` for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _pct_mean_std(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return format_mean_std(vals, ".2f", scale=100.0)


def write_comparison_report(
    out: Path,
    runs: Sequence[RunRecord],
    *,
    title: str,
    command: str,
    setup: Sequence[tuple[str, str]] = (),
    timing_note: str,
    timings_comparable: bool,
) -> list[AccuracyComparison]:
    """Write ``report.md``/``report.html`` and their figures into ``out`` for runs of several methods.

    Args:
        out: the report directory (figures are written next to the report).
        runs: the runs; methods are compared with the baseline (``uniform`` if present, else the first
            run's method) seed by seed.
        title: the page title.
        command: the exact command that reproduces the report.
        setup: caller-specific 'what was run' items (model and data descriptions), shown before the
            facts read from the runs themselves.
        timing_note: how the wall-clock timings were measured.
        timings_comparable: the runs were timed together (one process, one machine); otherwise the
            timings are listed per run and not set side by side.

    Returns:
        The comparison of every other method with the baseline.
    """
    baseline = baseline_method(runs)
    groups = runs_by_method(runs)
    comparisons = [
        c for m, rs in groups.items() if m != baseline for c in [compare_accuracy(rs, groups[baseline])] if c
    ]
    report = Report(title)
    report.paragraph(_one_line_setup(runs, groups))
    if comparisons:
        for c in comparisons:
            report.conclusion(c.sentence())
    else:
        others = [method_label(m) for m in groups if m != baseline]
        report.conclusion(
            f"No run of {', '.join(others) or 'another method'} shares a seed and test set with "
            f"{method_label(baseline)}, so no paired difference can be stated."
            if others
            else f"All runs use {method_label(baseline)}: there is nothing to compare."
        )
    _summary_table(report, groups, baseline)
    for c in comparisons:
        _per_seed_table(report, c, groups)
    given = {k for k, _ in setup}  # the caller's description wins over the generic one read from the runs
    described = [] if "methods" in given else [("methods", _describe_methods(groups))]
    read = [(k, v) for k, v in _run_facts(runs, groups) if k not in given]
    report.heading("What was run").facts([*described, *setup, *read])
    _rank_sections(report, out, groups, baseline)
    _curves_section(report, out, runs)
    _timings_section(report, runs, timing_note, timings_comparable)
    report.heading("Reproduce").code(command)
    report.write(out)
    return comparisons


_METHOD_NOTES = {
    "uniform": "uniform LoRA: the same rank r on every adapted module",
    "fim": (
        "FIM-LoRA (Fisher-information LoRA): a few calibration batches give each module a score, the mean "
        "squared gradient of its LoRA-B matrix (the diagonal of the empirical Fisher information), and "
        "uniform LoRA's budget is redistributed in proportion to the scores, within rank bounds"
    ),
}


def _describe_methods(groups: Mapping[str, list[RunRecord]]) -> str:
    notes = [_METHOD_NOTES.get(m, f"{m}: see `fimlora methods`") for m in groups]
    return ". ".join(notes) + "."


def _one_line_setup(runs: Sequence[RunRecord], groups: Mapping[str, list[RunRecord]]) -> str:
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    n_test = {r.n_test for r in runs if r.n_test}
    n_train = {r.metrics.get("train_examples") for r in runs if r.metrics.get("train_examples")}
    parts = [
        ", ".join(f"{method_label(m)} ({len(rs)} run{'s' * (len(rs) != 1)})" for m, rs in groups.items())
    ]
    if len(n_train) == 1:
        parts.append(f"{next(iter(n_train)):,} training examples")
    if len(n_test) == 1:
        parts.append(f"test accuracy on {next(iter(n_test)):,} held-out examples")
    if seeds:
        parts.append(f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}")
    return "; ".join(parts) + "."


def _summary_table(report: Report, groups: Mapping[str, list[RunRecord]], baseline: str) -> None:
    headers = [
        "method",
        "seeds",
        "test accuracy (%)",
        "test-set SE (points)",
        "LoRA params",
        "trainable params",
    ]
    rows = []
    for method, rs in groups.items():
        accs = [r.accuracy for r in rs]
        ses = [100 * binomial_se(r.accuracy, r.n_test) for r in rs if r.accuracy is not None and r.n_test]
        rows.append(
            [
                method_label(method),
                len(rs),
                _pct_mean_std(accs),
                format_or_na(statistics.mean(ses), ".2f") if ses else "n/a",
                format_or_na(rs[0].metrics.get("lora_params"), ","),
                format_or_na(rs[0].metrics.get("trainable_params"), ","),
            ]
        )
    heads = {
        (r.metrics.get("trainable_params") or 0) - (r.metrics.get("lora_params") or 0)
        for rs in groups.values()
        for r in rs
    }
    head = f" ({next(iter(heads)):,} parameters here)" if len(heads) == 1 else ""
    n_seeds = max(len(rs) for rs in groups.values())
    spread = (
        "± is the sample standard deviation over seeds (n − 1 in the denominator), not a standard error. "
        if n_seeds > 1
        else ""
    )
    report.table(
        headers,
        rows,
        caption=(
            f"{spread}Test-set SE: the binomial standard error √(p(1 − p)/n) of one run's accuracy on the "
            f"n test examples (mean over runs). LoRA params: Σ r·(in + out) over adapted modules. Trainable "
            f"params: LoRA plus the classification head trained alongside it{head}."
        ),
    )


def _per_seed_table(report: Report, c: AccuracyComparison, groups: Mapping[str, list[RunRecord]]) -> None:
    a, b = method_label(c.method), method_label(c.baseline)
    report.heading(f"{a} − {b}, seed by seed")
    by_seed_a = {r.seed: r for r in groups[c.method]}
    by_seed_b = {r.seed: r for r in groups[c.baseline]}
    tests = {seed: paired_test(by_seed_a[seed], by_seed_b[seed]) for seed in c.seeds}
    any_paired = any(t is not None for t in tests.values())
    headers = ["seed", f"{b} (%)", f"{a} (%)", "difference (points)", "SE (points)"]
    headers += ["McNemar p"] if any_paired else []
    rows = []
    for seed, diff in zip(c.seeds, c.diffs, strict=True):
        ra, rb = by_seed_a[seed], by_seed_b[seed]
        paired = tests[seed]
        if paired is not None:
            se, p = f"{100 * paired.se:.2f} paired", f"{paired.p_value:.2g}"
        else:
            se_value = unpaired_difference_se(
                float(ra.accuracy or 0), float(rb.accuracy or 0), int(ra.n_test or 1)
            )
            se, p = f"{100 * se_value:.2f} unpaired", "–"
        row = [
            seed,
            format_or_na(100 * (rb.accuracy or 0), ".2f"),
            format_or_na(100 * (ra.accuracy or 0), ".2f"),
            signed_points(diff),
            se,
        ]
        rows.append(row + ([p] if any_paired else []))
    if c.n > 1:
        row = ["mean", "", "", signed_points(c.mean), f"{100 * c.se:.2f} seeds"]
        rows.append(row + ([f"sign-flip {c.p_value:.2g}"] if any_paired else []))
    report.table(
        headers,
        rows,
        caption=(
            "Difference = method − baseline on the same seed (same data order, head init and dropout stream). "
            "SE of a seed's difference, over its test examples: paired = sd of the per-example difference in "
            "correctness / √n (both runs' predictions on the same examples); unpaired = √(SE_a² + SE_b²), used "
            "when predictions were not saved, overstates it."
            + (
                " McNemar p: exact two-sided binomial test on the examples only one of the two gets right."
                if any_paired
                else ""
            )
            + (
                f" Mean row: SE = sd/√{c.n} of the {c.n} per-seed differences, which includes seed-to-seed "
                f"variation (the per-seed SEs do not); 95% CI (Student's t) {signed_points(c.low)} to {signed_points(c.high)}."
                if c.n > 1
                else ""
            )
        ),
    )


def _run_facts(runs: Sequence[RunRecord], groups: Mapping[str, list[RunRecord]]) -> list[tuple[str, str]]:
    """What was run, read from the runs' config.json, run.json, metrics.json and rank maps."""
    first = runs[0]
    cfg = first.config
    facts: list[tuple[str, str]] = []

    def shared(values: Sequence[Any]) -> str:
        unique = list(dict.fromkeys(json.dumps(v, default=str, sort_keys=True) for v in values))
        if len(unique) == 1:
            return _plain(values[0])
        return "; ".join(f"{r.name}: {_plain(v)}" for r, v in zip(runs, values, strict=True))

    data = cfg.get("data") or {}
    if cfg:
        facts.append(("model", shared([r.config.get("model") for r in runs])))
        facts.append(("data", shared([(r.config.get("data") or {}).get("train") for r in runs])))
        eval_data = data.get("eval")
        if eval_data:
            facts.append(("test data", shared([(r.config.get("data") or {}).get("eval") for r in runs])))
        facts.append(
            (
                "max_length",
                shared([(r.config.get("data") or {}).get("max_length") for r in runs])
                + " tokens per example (longer texts are truncated)",
            )
        )
    counts = first.metrics.get("label_counts")
    if counts:
        names = first.task.get("label_names") or []
        facts.append(("class balance", _balance(counts, names)))
    lora = cfg.get("lora") or {}
    if lora:
        facts.append(
            (
                "LoRA",
                f"r = {lora.get('r')}, alpha = {_plain(lora.get('alpha'))}, dropout {lora.get('dropout')}, "
                f"on {_plain(lora.get('target_modules'))}",
            )
        )
    train = cfg.get("train") or {}
    if train:
        steps = shared([r.metrics.get("steps") for r in runs])
        facts.append(
            (
                "training",
                f"{steps} optimizer steps, batch {train.get('batch_size')}, AdamW lr {train.get('lr')} "
                f"({100 * float(train.get('warmup_ratio') or 0):g}% linear warmup, then linear decay), "
                f"gradient clipping {train.get('max_grad_norm')}, weight decay {train.get('weight_decay')}, "
                f"{train.get('epochs')} epoch(s)",
            )
        )
    for method, rs in groups.items():
        meta = rs[0].rank_map.metadata if rs[0].rank_map is not None else {}
        if "r_min" in meta or "allocation" in meta:
            alloc = meta.get("allocation") or {}
            budget = alloc.get("budget_params")
            budget_text = (
                f"{budget:,} LoRA parameters (uniform r = {meta.get('lora_r')})"
                if budget
                else f"rank sum {alloc.get('budget_ranks')}"
            )
            conf = meta.get("config") or {}
            facts.append(
                (
                    f"{method_label(method)} budget",
                    f"{budget_text}; each module's rank in [{meta.get('r_min')}, {meta.get('r_max')}]"
                    + (
                        f"; scores: {conf.get('score')} ({conf.get('aggregation')} over LoRA-B's elements) "
                        f"from {meta.get('calibration_batches')} calibration batches"
                        if conf
                        else ""
                    ),
                )
            )
    prov = [r.provenance for r in runs]
    if any(prov):
        facts.append(("device", shared([_device(p) for p in prov])))
        versions = first.provenance.get("versions") or {}
        facts.append(
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "torch_threads"))
        )
        facts.append(("commit", shared([_commit(p) for p in prov])))
        times = sorted(str(p.get("time")) for p in prov if p.get("time"))
        if times:
            # each run's provenance is written when the run ends: these are finishing times, not a duration
            facts.append(("finished", times[0] if times[0] == times[-1] else f"{times[0]} to {times[-1]}"))
    return facts


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _balance(counts: Mapping[str, Mapping[str, int]], names: Sequence[str]) -> str:
    parts = []
    for split in ("train", "eval"):
        c = counts.get(split) or {}
        total = sum(c.values())
        if not total:
            continue
        labelled = ", ".join(
            f"{names[int(k)] if int(k) < len(names) else k} {v:,} ({100 * v / total:.1f}%)"
            for k, v in c.items()
        )
        split_name = "train" if split == "train" else "test"
        text = f"{split_name}: {labelled}"
        if split == "eval":
            text += f"; always predicting the majority class scores {100 * max(c.values()) / total:.1f}%"
        parts.append(text)
    return ". ".join(parts)


def _device(prov: Mapping[str, Any]) -> str:
    threads = (prov.get("versions") or {}).get("torch_threads")
    device = str(prov.get("device", "?"))
    if device == "cpu":
        device = f"CPU ({prov.get('cpu_count')} cores" + (f", {threads} torch threads)" if threads else ")")
    return device


def _commit(prov: Mapping[str, Any]) -> str:
    git = prov.get("git") or {}
    commit = git.get("commit")
    if not commit:
        return "unknown (not a git checkout)"
    return str(commit)[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")


def _rank_sections(report: Report, out: Path, groups: Mapping[str, list[RunRecord]], baseline: str) -> None:
    from fimlora.plot import plot_rank_bars
    from fimlora.rankmap import spearman

    for method, rs in groups.items():
        maps = [r.rank_map for r in rs if r.rank_map is not None]
        if not maps or all(len(set(m.values())) <= 1 for m in maps):
            continue  # a uniform map says nothing
        label = method_label(method)
        names = [n for n in maps[0] if all(n in m for m in maps)]
        mean = {n: statistics.mean(m[n] for m in maps) for n in names}
        report.heading(f"{label} rank map")
        layout = maps[0].table()
        cells = [[None if n is None else mean.get(n) for n in row] for row in layout.modules]
        lo = min(mean.values())
        hi = max(mean.values())
        fmt = ".0f" if len(maps) == 1 else ".1f"
        rows, shade = [], []
        for layer, row in zip(layout.layers, cells, strict=True):
            rows.append(
                ["–" if layer is None else layer, *("" if v is None else format(v, fmt) for v in row),
                 format(sum(v for v in row if v is not None), fmt)]
            )  # fmt: skip
            shade.append([None, *(None if v is None else (v - lo) / (hi - lo or 1) for v in row), None])
        totals = [
            sum(v for v in (row[j] for row in cells) if v is not None) for j in range(len(layout.kinds))
        ]
        rows.append(["total", *(format(t, fmt) for t in totals), format(sum(totals), fmt)])
        shade.append([None] * (len(layout.kinds) + 2))
        seeds = ", ".join(str(r.seed) for r in rs if r.rank_map is not None)
        what = (
            f"Rank of every adapted module (seed {seeds})"
            if len(maps) == 1
            else (f"Mean rank of every adapted module over seeds {seeds}")
        )
        report.table(
            ["layer", *layout.kinds, "total"],
            rows,
            shade=shade,
            caption=f"{what}; darker = higher rank. Rows are encoder layers, columns module kinds.",
        )
        if len(maps) > 1:
            _agreement_table(report, rs, mean, spearman)
        ref_runs = [r for r in groups.get(baseline, []) if r.rank_map is not None]
        reference = dict(ref_runs[0].rank_map) if ref_runs and method != baseline else None
        bars = out / f"rank_bars_{_slug(method)}.png"
        plot_rank_bars(
            mean,
            bars,
            reference=reference,
            label=label if len(maps) == 1 else f"{label}, mean over seeds",
            reference_label=method_label(baseline),
            samples=[dict(m) for m in maps] if len(maps) > 1 else (),
            title=f"{label} rank per module" + (f" vs {method_label(baseline)}" if reference else ""),
        )
        report.figure(
            bars,
            f"{label} rank of each module"
            + (f" (bar: mean over {len(maps)} seeds; dots: each seed)" if len(maps) > 1 else "")
            + (f"; grey: {method_label(baseline)}" if reference else ""),
        )
        heatmaps = []
        for r in rs:
            if r.rank_map is None:
                continue
            path = out / f"rank_map_{_slug(method)}_seed-{r.seed}.png"
            r.rank_map.plot_heatmap(path, title=f"{label}, seed {r.seed}")
            heatmaps.append((path, f"{label} ranks, seed {r.seed} (layer × module kind)"))
        report.gallery(heatmaps)


def _agreement_table(
    report: Report, rs: Sequence[RunRecord], mean: Mapping[str, float], spearman: Any
) -> None:
    names = list(mean)
    rows = []
    with_map = [r for r in rs if r.rank_map is not None]
    for r in with_map:
        ranks = [r.rank_map[n] for n in names]  # type: ignore[index]
        others = [o for o in with_map if o is not r]
        pair = [spearman(ranks, [o.rank_map[n] for n in names]) for o in others]  # type: ignore[index]
        moved = sum(abs(r.rank_map[n] - mean[n]) for n in names) / max(sum(mean.values()), 1e-12)  # type: ignore[index]
        rows.append(
            [f"seed {r.seed}", format_or_na(spearman(ranks, [mean[n] for n in names]), ".2f"),
             format_or_na(statistics.mean(pair), ".2f") if pair else "n/a", f"{100 * moved:.0f}%"]
        )  # fmt: skip
    report.table(
        ["map", "Spearman vs mean map", "mean Spearman vs other seeds", "rank moved vs mean"],
        rows,
        caption=(
            "How much the seeds agree: Spearman's rho of module ranks (1 = same ordering), and the share of the "
            "total rank that would have to move to turn this seed's map into the mean map (Σ|r − mean| / Σ mean)."
        ),
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _curves_section(report: Report, out: Path, runs: Sequence[RunRecord]) -> None:
    from fimlora.plot import plot_training_curves, smooth

    curves: dict[str, list[tuple[int, float]]] = {}
    groups: dict[str, str] = {}
    for r in runs:
        losses = [(int(s), float(v)) for s, v in r.history.get("losses", [])]
        if not losses:
            continue
        name = method_label(r.method) + (f", seed {r.seed}" if r.seed is not None else f" ({r.name})")
        if name in curves:
            name = f"{name} ({r.name})"
        curves[name] = smooth(losses)
        groups[name] = r.method
    if not curves:
        return
    plot_training_curves(
        curves, out / "curves.png", title="training loss (10-step moving mean)", groups=groups
    )
    report.heading("Training curves").figure(
        out / "curves.png", "Training loss per optimizer step; one colour per method, one line style per seed"
    )


def _timings_section(report: Report, runs: Sequence[RunRecord], note: str, comparable: bool) -> None:
    report.heading("Timings (wall-clock)")
    headers = ["run", "method", "seed", "calibration s", "training s"]
    rows = [
        [r.name, method_label(r.method), "–" if r.seed is None else r.seed,
         "–" if r.metrics.get("calibration_seconds") is None else format_or_na(r.metrics["calibration_seconds"], ".1f"),
         format_or_na(r.metrics.get("train_seconds"), ".1f")]
        for r in runs
    ]  # fmt: skip
    report.table(headers, rows, caption=note)
    if not comparable:
        report.note(
            "These runs were not timed together, so the report does not set their times side by side."
        )
