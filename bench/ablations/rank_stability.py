"""Rank-map stability vs the number of calibration batches T (``python -m bench.ablations stability``).

For each seed, LoRA-B gradients of 64 consecutive training batches are captured once; the statistics of
any T in :data:`T_VALUES` are formed from them by fimlora's own reduction. Reported: Spearman / Kendall
between the maps from two *disjoint* calibration sets with the same seed, between maps of *different
seeds* at the same T, and at T = 8 the agreement between score types and aggregations. Writes
``stability.{json,md,png}``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import RunSpec, commit_label, record_provenance
from fimlora.io import atomic_write_json, atomic_write_text

from .common import (
    BASE_OVERRIDES,
    capture_b_gradients,
    fmt_cell,
    nan_mean,
    rank_maps_for,
    scores_from_gradients,
    spearman_kendall,
)

__all__ = ["T_VALUES", "stability"]

T_VALUES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def stability(task: str, seeds: Sequence[int], out: Path, *, r: int = 8) -> dict[str, Any]:
    """Rank-map stability vs T (disjoint calibration sets, different seeds) and score-type agreement."""
    started = time.perf_counter()
    per_seed = {}
    shapes: dict[str, tuple[int, int]] = {}
    for seed in seeds:
        spec = RunSpec("encoder", task, "minilm", "fim", f"r{r}", seed, BASE_OVERRIDES)
        per_seed[seed], shapes = capture_b_gradients(spec, 2 * max(T_VALUES))
        print(f"captured 64 batches for seed {seed}", flush=True)
    variants = [("fisher", "mean"), ("fisher", "sum"), ("variance", "mean"), ("variance", "sum")]
    rows = []
    maps: dict[tuple[int, int, str, str, str], Any] = {}
    for kind, agg in variants:
        for t in T_VALUES:
            for seed in seeds:
                for half, start in (("a", 0), ("b", max(T_VALUES))):
                    s = scores_from_gradients(per_seed[seed][start : start + t], shapes, kind, agg)
                    maps[(t, seed, half, kind, agg)] = (s, rank_maps_for(s, shapes, r))
            disjoint = [
                maps[(t, s, "a", kind, agg)][1].compare(maps[(t, s, "b", kind, agg)][1]) for s in seeds
            ]
            cross = [
                maps[(t, s1, "a", kind, agg)][1].compare(maps[(t, s2, "a", kind, agg)][1])
                for i, s1 in enumerate(seeds)
                for s2 in seeds[i + 1 :]
            ]
            score_disjoint = [
                spearman_kendall(maps[(t, s, "a", kind, agg)][0], maps[(t, s, "b", kind, agg)][0])
                for s in seeds
            ]
            rows.append(
                {
                    "score": kind,
                    "aggregation": agg,
                    "T": t,
                    "disjoint_spearman": nan_mean([c.spearman for c in disjoint]),
                    "disjoint_kendall": nan_mean([c.kendall for c in disjoint]),
                    "disjoint_l1_moved": nan_mean([c.l1_normalised for c in disjoint]),
                    "disjoint_score_spearman": nan_mean([c[0] for c in score_disjoint]),
                    "seed_spearman": nan_mean([c.spearman for c in cross]),
                    "seed_kendall": nan_mean([c.kendall for c in cross]),
                    "seed_l1_moved": nan_mean([c.l1_normalised for c in cross]),
                }
            )
    # Score-type / aggregation agreement at the default T = 8 (seed-averaged), and map summaries.
    agreement = []
    for i, (k1, a1) in enumerate(variants):
        for k2, a2 in variants[i + 1 :]:
            comps = [maps[(8, s, "a", k1, a1)][1].compare(maps[(8, s, "a", k2, a2)][1]) for s in seeds]
            agreement.append(
                {
                    "a": f"{k1}/{a1}",
                    "b": f"{k2}/{a2}",
                    "spearman": nan_mean([c.spearman for c in comps]),
                    "kendall": nan_mean([c.kendall for c in comps]),
                    "l1_moved": nan_mean([c.l1_normalised for c in comps]),
                }
            )
    summaries = {}
    for kind, agg in variants:
        rm = maps[(8, seeds[0], "a", kind, agg)][1]
        by_type: dict[str, list[int]] = {}
        for name, rank in rm.items():
            by_type.setdefault(
                name.split(".")[-1] if "attention.output" not in name else "attention.output.dense", []
            ).append(rank)
        summaries[f"{kind}/{agg}"] = {
            "min": min(rm.values()),
            "max": max(rm.values()),
            "by_module_type": {k: round(sum(v) / len(v), 2) for k, v in sorted(by_type.items())},
            "ranks": dict(rm),
        }
    result = {
        "task": task,
        "seeds": list(seeds),
        "r": r,
        "T_values": list(T_VALUES),
        "overrides": BASE_OVERRIDES,
        "stability": rows,
        "score_agreement_T8": agreement,
        "rank_maps_T8_seed0": summaries,
        "seconds": time.perf_counter() - started,
        "provenance": record_provenance(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "stability.json", result, indent=1)
    _write_stability_md(result, out / "stability.md")
    _plot_stability(rows, out / "stability.png", task)
    return result


def _write_stability_md(result: Mapping[str, Any], path: Path) -> None:
    lines = [
        f"# Rank-map stability vs calibration batches T ({result['task']}, MiniLM-L6, budget r{result['r']}, "
        f"seeds {result['seeds']})",
        "",
        "Disjoint: maps from calibration batches [0, T) vs [32, 32+T), same seed (mean over seeds). "
        "Seeds: maps from different seeds at the same T (mean over seed pairs). `moved` = fraction of the "
        "rank budget that differs (L1 / total rank).",
        "",
        "| score | agg | T | disjoint Spearman | disjoint Kendall | disjoint moved | seeds Spearman | seeds Kendall | seeds moved | disjoint score Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["stability"]:
        lines.append(
            f"| {r['score']} | {r['aggregation']} | {r['T']} | {fmt_cell(r['disjoint_spearman'])} | {fmt_cell(r['disjoint_kendall'])} | "
            f"{fmt_cell(r['disjoint_l1_moved'])} | {fmt_cell(r['seed_spearman'])} | {fmt_cell(r['seed_kendall'])} | {fmt_cell(r['seed_l1_moved'])} | "
            f"{fmt_cell(r['disjoint_score_spearman'])} |"
        )
    lines += ["", "## Agreement between score types / aggregations (T = 8, same seed and batches)", ""]
    lines += ["| a | b | Spearman | Kendall | moved |", "|---|---|---|---|---|"]
    for a in result["score_agreement_T8"]:
        lines.append(
            f"| {a['a']} | {a['b']} | {fmt_cell(a['spearman'])} | {fmt_cell(a['kendall'])} | {fmt_cell(a['l1_moved'])} |"
        )
    lines += ["", "## Mean rank by module type (T = 8, seed 0)", ""]
    types = sorted({t for s in result["rank_maps_T8_seed0"].values() for t in s["by_module_type"]})
    lines += ["| score/agg | min | max | " + " | ".join(types) + " |", "|---" * (3 + len(types)) + "|"]
    for name, s in result["rank_maps_T8_seed0"].items():
        cells = " | ".join(str(s["by_module_type"].get(t, "–")) for t in types)
        lines.append(f"| {name} | {s['min']} | {s['max']} | {cells} |")
    git = result["provenance"]["git"]
    lines += [
        "",
        f"_{result['seconds']:.0f} s on a shared 2-core CPU; git {commit_label(git, short=True)}. "
        "Command: `python -m bench.ablations stability --task "
        f"{result['task']} --seeds {' '.join(map(str, result['seeds']))} --out docs/results/ablations`._",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _plot_stability(rows: Sequence[Mapping[str, Any]], path: Path, task: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(
        (("disjoint_spearman", "disjoint calibration sets"), ("seed_spearman", "different seeds"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for kind, agg in (("fisher", "mean"), ("fisher", "sum"), ("variance", "mean"), ("variance", "sum")):
            sel = [r for r in rows if r["score"] == kind and r["aggregation"] == agg]
            ax.plot([r["T"] for r in sel], [r[key] for r in sel], marker="o", label=f"{kind}/{agg}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration batches T")
        ax.set_ylabel("Spearman of rank maps")
        ax.set_title(f"{task}: {title}")
        ax.set_ylim(-0.2, 1.05)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
