"""Batch vs per-example gradient estimator at equal T (``python -m bench.ablations per-example``).

For T in :data:`PE_T_VALUES`, both estimators calibrate (through ``estimate_module_scores`` itself) on two
*disjoint* sets of training batches of the same seed and model; reported: the agreement of the two rank
maps of each estimator (and of the two score vectors), per score type and aggregation, whether the two
estimators allocate alike, and the calibration seconds of each. Writes ``per_example.{json,md,png}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import RunSpec, commit_label, record_provenance
from fimlora.io import atomic_write_json, atomic_write_text

from .common import (
    BASE_OVERRIDES,
    VARIANTS,
    calibration_setup,
    fmt_cell,
    nan_mean,
    nan_sd,
    rank_maps_for,
    spearman_kendall,
)

__all__ = ["ESTIMATORS", "PE_T_VALUES", "paired_counts", "per_example_stability"]

PE_T_VALUES: tuple[int, ...] = (1, 2, 4, 8)
ESTIMATORS: tuple[str, ...] = ("batch", "per_example")


def per_example_stability(
    tasks: Sequence[str], seeds: Sequence[int], out: Path, *, r: int = 8
) -> dict[str, Any]:
    """Disjoint-set rank-map stability of the batch and per-example estimators at equal T, and their cost."""
    from fimlora import FimConfig, estimate_module_scores
    from fimlora.peft_glue import lora_modules, module_shapes

    started = time.perf_counter()
    second = max(PE_T_VALUES)  # the second calibration set starts where the largest first one ends
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    for task in tasks:
        per_seed: dict[tuple[str, int, str, str], list[tuple[float, float, float, float]]] = {}
        seconds: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
        cross: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
        for seed in seeds:
            spec = RunSpec("encoder", task, "minilm", "fim", f"r{r}", seed, BASE_OVERRIDES)
            model, stream = calibration_setup(spec, 2 * second)
            shapes = module_shapes(lora_modules(model))
            for estimator in ESTIMATORS:  # warm-up (allocator, kernels), not timed
                estimate_module_scores(
                    model,
                    stream[:1],
                    FimConfig(calibration_batches=1, estimator=estimator, show_progress=False),  # type: ignore[arg-type]
                )
            for t in PE_T_VALUES:
                stats: dict[tuple[str, str], Any] = {}
                for i, (half, start) in enumerate((("a", 0), ("b", second))):
                    # Alternate which estimator goes first, so drift on a shared machine hits both.
                    order = ESTIMATORS if i % 2 == 0 else tuple(reversed(ESTIMATORS))
                    for estimator in order:
                        cfg = FimConfig(calibration_batches=t, estimator=estimator, show_progress=False)  # type: ignore[arg-type]
                        st = estimate_module_scores(model, stream[start : start + t], cfg)
                        stats[(estimator, half)] = st
                        seconds[estimator].append(st.seconds / t)
                for kind, agg in VARIANTS:
                    maps = {}
                    for estimator in ESTIMATORS:
                        sa = stats[(estimator, "a")].scores(kind, agg)
                        sb = stats[(estimator, "b")].scores(kind, agg)
                        maps[estimator] = rank_maps_for(sa, shapes, r)
                        comp = maps[estimator].compare(rank_maps_for(sb, shapes, r))
                        per_seed.setdefault((estimator, t, kind, agg), []).append(
                            (comp.spearman, comp.kendall, comp.l1_normalised, spearman_kendall(sa, sb)[0])
                        )
                    # Do the two estimators allocate alike? (same batches [0, T), same seed)
                    both = maps["batch"].compare(maps["per_example"])
                    cross.setdefault((t, kind, agg), []).append((both.spearman, both.kendall))
            print(f"{task} seed {seed}: done ({time.perf_counter() - started:.0f} s)", flush=True)
        for (estimator, t, kind, agg), values in per_seed.items():
            sp, kt, moved, score_sp = (list(v) for v in zip(*values, strict=True))
            rows.append(
                {
                    "task": task,
                    "estimator": estimator,
                    "T": t,
                    "score": kind,
                    "aggregation": agg,
                    "spearman": nan_mean(sp),
                    "spearman_sd": nan_sd(sp),
                    "kendall": nan_mean(kt),
                    "kendall_sd": nan_sd(kt),
                    "l1_moved": nan_mean(moved),
                    "score_spearman": nan_mean(score_sp),
                    "per_seed_spearman": sp,
                    "per_seed_kendall": kt,
                }
            )
        for (t, kind, agg), values in cross.items():
            agreement.append(
                {
                    "task": task,
                    "T": t,
                    "score": kind,
                    "aggregation": agg,
                    "spearman": nan_mean([v[0] for v in values]),
                    "kendall": nan_mean([v[1] for v in values]),
                }
            )
        per_batch = {e: nan_mean(v) for e, v in seconds.items()}
        timing.append(
            {
                "task": task,
                "seconds_per_batch": per_batch,
                "ratio_per_example_to_batch": per_batch["per_example"] / per_batch["batch"],
                "batches_timed": {e: len(v) for e, v in seconds.items()},
            }
        )
    result = {
        "command": (
            f"python -m bench.ablations per-example --tasks {' '.join(tasks)} --seeds "
            f"{' '.join(map(str, seeds))} --threads 1 --out docs/results/ablations"
        ),
        "tasks": list(tasks),
        "seeds": list(seeds),
        "r": r,
        "T_values": list(PE_T_VALUES),
        "second_set_start": second,
        "overrides": BASE_OVERRIDES,
        "stability": rows,
        "batch_vs_per_example_maps": agreement,
        "timing": timing,
        "seconds": time.perf_counter() - started,
        "provenance": record_provenance(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "per_example.json", result, indent=1)
    _write_per_example_md(result, out / "per_example.md")
    _plot_per_example(result, out / "per_example.png")
    return result


def paired_counts(batch: Sequence[float], per_example: Sequence[float]) -> tuple[int, int, int]:
    """(higher, equal, lower): seeds where the per-example Spearman beats, ties or trails the batch one.

    A seed where either is undefined (nan: a constant rank map) is not counted.
    """
    counts = [0, 0, 0]
    for b, p in zip(batch, per_example, strict=True):
        if math.isnan(b) or math.isnan(p):
            continue
        counts[0 if p > b + 1e-12 else 1 if abs(p - b) <= 1e-12 else 2] += 1
    return counts[0], counts[1], counts[2]


def _write_per_example_md(result: Mapping[str, Any], path: Path) -> None:
    git = result["provenance"]["git"]
    lines = [
        "# Batch vs per-example gradient estimator: rank-map stability at equal T",
        "",
        f"Command: `{result['command']}`",
        "",
        f"MiniLM-L6, budget r{result['r']} (parameters of uniform LoRA), batch size "
        f"{result['overrides']['batch_size']}, max length {result['overrides']['max_length']}, seeds "
        f"{result['seeds']}. For each seed, both estimators calibrate on training batches [0, T) and, "
        f"disjoint, [{result['second_set_start']}, {result['second_set_start']} + T); the table gives the "
        "agreement of the two rank maps (mean ± sd over seeds). Equal T = the same forward/backward passes.",
        "",
    ]
    lines += [
        "Paired comparison (same seed, same batches): in how many of the (task, seed) pairs the per-example "
        "map's disjoint-set Spearman is higher / equal / lower than the batch map's.",
        "",
        "| score/agg | " + " | ".join(f"T={t}" for t in result["T_values"]) + " | all |",
        "|---" * (len(result["T_values"]) + 2) + "|",
    ]
    for kind, agg in VARIANTS:
        cells, total = [], [0, 0, 0]
        for t in result["T_values"]:
            wins = [0, 0, 0]
            for task in result["tasks"]:
                sel = {
                    r["estimator"]: r["per_seed_spearman"]
                    for r in result["stability"]
                    if r["task"] == task and r["T"] == t and r["score"] == kind and r["aggregation"] == agg
                }
                wins = [
                    a + b for a, b in zip(wins, paired_counts(sel["batch"], sel["per_example"]), strict=True)
                ]
            total = [a + b for a, b in zip(total, wins, strict=True)]
            cells.append("/".join(map(str, wins)) if any(wins) else "–")
        lines.append(f"| {kind}/{agg} | " + " | ".join(cells) + f" | {'/'.join(map(str, total))} |")
    lines += [
        "",
        "With T = 1 the batch estimator's variance is E[g^2] - E[g]^2 of a single gradient, which fimlora "
        "sets to exactly zero (rather than keep fp32 rounding noise): every score is zero, the allocation "
        "falls back to uniform, and its agreement is undefined (–) and not counted above. The per-example "
        "variance at T = 1 is a real variance over the batch's examples.",
        "",
    ]
    for kind, agg in VARIANTS:
        lines += [f"## {kind}/{agg}", ""]
        lines += [
            "| task | T | batch Spearman | per-example Spearman | batch Kendall | per-example Kendall | "
            "batch moved | per-example moved | batch score Spearman | per-example score Spearman |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for task in result["tasks"]:
            for t in result["T_values"]:
                sel = {
                    r["estimator"]: r
                    for r in result["stability"]
                    if r["task"] == task and r["T"] == t and r["score"] == kind and r["aggregation"] == agg
                }
                b, p = sel["batch"], sel["per_example"]
                lines.append(
                    f"| {task} | {t} | {fmt_cell(b['spearman'])} ± {fmt_cell(b['spearman_sd'])} | "
                    f"{fmt_cell(p['spearman'])} ± {fmt_cell(p['spearman_sd'])} | {fmt_cell(b['kendall'])} ± {fmt_cell(b['kendall_sd'])} | "
                    f"{fmt_cell(p['kendall'])} ± {fmt_cell(p['kendall_sd'])} | {fmt_cell(b['l1_moved'])} | {fmt_cell(p['l1_moved'])} | "
                    f"{fmt_cell(b['score_spearman'])} | {fmt_cell(p['score_spearman'])} |"
                )
        lines.append("")
    lines += ["## Do the two estimators allocate alike? (batches [0, T), same seed; mean over seeds)", ""]
    lines += [
        "| score/agg | task | " + " | ".join(f"T={t} Spearman / Kendall" for t in result["T_values"]) + " |",
        "|---" * (len(result["T_values"]) + 2) + "|",
    ]
    for kind, agg in VARIANTS:
        for task in result["tasks"]:
            cells = []
            for t in result["T_values"]:
                a = next(
                    x
                    for x in result["batch_vs_per_example_maps"]
                    if x["task"] == task and x["T"] == t and x["score"] == kind and x["aggregation"] == agg
                )
                cells.append(f"{fmt_cell(a['spearman'])} / {fmt_cell(a['kendall'])}")
            lines.append(f"| {kind}/{agg} | {task} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["## Calibration time (same batches, same machine, interleaved)", ""]
    lines += ["| task | batch s/batch | per-example s/batch | ratio |", "|---|---|---|---|"]
    for tm in result["timing"]:
        s = tm["seconds_per_batch"]
        lines.append(
            f"| {tm['task']} | {s['batch']:.3f} | {s['per_example']:.3f} | "
            f"{tm['ratio_per_example_to_batch']:.2f} |"
        )
    lines += [
        "",
        f"_{result['seconds']:.0f} s, --threads 1 on a 2-core CPU shared with a benchmark; git "
        f"{commit_label(git, short=True)}._",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _plot_per_example(result: Mapping[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = result["tasks"]
    fig = Figure(figsize=(4.5 * len(tasks), 3.6))
    FigureCanvasAgg(fig)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for estimator, style in (("batch", "-o"), ("per_example", "--s")):
            for kind, agg in (("fisher", "mean"), ("fisher", "sum")):
                sel = [
                    r
                    for r in result["stability"]
                    if r["task"] == task
                    and r["estimator"] == estimator
                    and r["score"] == kind
                    and r["aggregation"] == agg
                ]
                ax.errorbar(
                    [r["T"] for r in sel],
                    [r["spearman"] for r in sel],
                    yerr=[0.0 if math.isnan(r["spearman_sd"]) else r["spearman_sd"] for r in sel],
                    fmt=style,
                    capsize=2,
                    label=f"{estimator} {kind}/{agg}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration batches T")
        ax.set_ylabel("Spearman, disjoint calibration sets")
        ax.set_title(task)
        ax.set_ylim(0.7, 1.02)  # every mean here is above 0.85: a full [-1, 1] axis hides the differences
        ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
