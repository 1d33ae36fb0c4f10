"""The planted suite's report: every cell, the pooled paired comparison with uniform, the control, and a picture.

From the store's finished records (suite ``planted``):

* **cells**: per pattern, budget, map and seed, the fraction of the teacher gap closed, with the map's
  Spearman and AUC against the planted ranks and its LoRA parameters relative to the budget (a ratio off 1 by
  more than 2 % is flagged, as in ``docs/results/full``);
* **pooled**: per budget and map, the paired difference to uniform of the gap closed, pooled over seeds and
  the non-control patterns (Student's t 95 % interval over the pairs, :func:`fimlora.paired_stats.paired_t_interval`,
  and the exact sign-flip p), the fraction of the uniform -> oracle gap recovered (from the pooled means),
  and the mean Spearman and AUC;
* **control**: the same difference on the homogeneous planting, where no map should beat uniform;
* a picture of the planted ranks and every map's ranks on one planting (layer x module kind).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fimlora.io import atomic_write_text
from fimlora.paired_stats import paired_t_interval, sign_flip_pvalue
from fimlora.rankmap import split_module_name

from .methods import ORACLE
from .metrics import gap_recovered
from .patterns import PATTERNS

__all__ = ["CONTROL", "PlantedRun", "planted_runs", "plot_maps", "report_markdown", "write_report"]

CONTROL = "homogeneous"
"""The pattern where no allocation should beat uniform."""

_PARAM_TOLERANCE = 0.02


class PlantedRun(dict):  # type: ignore[type-arg]
    """One finished planted record, flattened: pattern, budget, seed, map, metrics and maps."""


def planted_runs(records: Iterable[Mapping[str, Any]], *, split: str | None = "test") -> list[PlantedRun]:
    """The finished planted records as :class:`PlantedRun` rows (failed and other suites left out).

    Args:
        records: the store's records.
        split: keep the runs scored on this split (``"test"``: the reported runs; ``"dev"``: pilots and
            timings); None keeps every split.
    """
    rows = []
    for record in records:
        spec = record.get("spec") or {}
        if record.get("status") != "ok" or spec.get("suite") != "planted":
            continue
        overrides = spec.get("overrides") or {}
        extra = record.get("extra") or {}
        if split is not None and overrides.get("eval_split", "test") != split:
            continue
        rows.append(
            PlantedRun(
                pattern=spec["task"],
                budget=spec["budget"],
                seed=int(spec["seed"]),
                method=ORACLE if overrides.get("map") == ORACLE else spec["method"],
                strength=float(overrides.get("strength", math.nan)),
                eval_split=overrides.get("eval_split", "test"),
                metrics=dict(record.get("metrics") or {}),
                planted=extra.get("planted") or {},
                rank_map=extra.get("rank_map") or {},
                commit=((record.get("provenance") or {}).get("git") or {}).get("commit"),
                wall_seconds=float(extra.get("wall_seconds", math.nan)),
            )
        )
    return rows


def _order(methods: Iterable[str]) -> list[str]:
    rest = sorted(m for m in set(methods) if m not in ("uniform", ORACLE))
    return [m for m in ("uniform", ORACLE) if m in set(methods)] + rest


def _fmt(value: float, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or not math.isfinite(value)
        else f"{value:+.{digits}f}"
        if digits < 0
        else f"{value:.{digits}f}"
    )


def _pairs(
    runs: Sequence[PlantedRun], method: str, patterns: Iterable[str], budget: str
) -> tuple[list[float], list[float]]:
    """Gap closed of ``method`` and uniform on the same plantings (pattern, seed) at ``budget``."""
    wanted = set(patterns)
    by_key: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in runs:
        if r["budget"] == budget and r["pattern"] in wanted:
            by_key[(r["pattern"], r["seed"])][r["method"]] = r["metrics"]["gap_closed"]
    a, b = [], []
    for key in sorted(by_key):
        if method in by_key[key] and "uniform" in by_key[key]:
            a.append(by_key[key][method])
            b.append(by_key[key]["uniform"])
    return a, b


def _comparison_rows(runs: Sequence[PlantedRun], patterns: Sequence[str], with_recovery: bool) -> list[str]:
    lines = []
    budgets = sorted({r["budget"] for r in runs if r["pattern"] in patterns}, key=lambda b: int(b[1:]))
    for budget in budgets:
        for method in _order(r["method"] for r in runs if r["budget"] == budget and r["pattern"] in patterns):
            a, b = _pairs(runs, method, patterns, budget)
            if not a:
                continue
            o, u = _pairs(runs, ORACLE, patterns, budget)
            here = [
                r
                for r in runs
                if r["budget"] == budget and r["pattern"] in patterns and r["method"] == method
            ]
            rho = [r["metrics"]["spearman"] for r in here if "spearman" in r["metrics"]]
            auc = [r["metrics"]["auc"] for r in here if "auc" in r["metrics"]]
            diff = paired_t_interval(a, b)
            p = sign_flip_pvalue(a, b) if len(a) > 1 else math.nan
            recovered = (
                gap_recovered(sum(a) / len(a), sum(b) / len(b), sum(o) / len(o))
                if with_recovery and o
                else math.nan
            )
            cells = [
                budget, method, str(len(a)), _fmt(sum(a) / len(a)), _fmt(diff.mean),
                f"[{_fmt(diff.low)}, {_fmt(diff.high)}]", _fmt(p, 3),
            ]  # fmt: skip
            if with_recovery:
                cells += [_fmt(recovered, 2), _fmt(_mean(rho), 2), _fmt(_mean(auc), 2)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def report_markdown(runs: Sequence[PlantedRun], *, command: str = "", picture: str | None = None) -> str:
    """The report as markdown (see the module docstring)."""
    lines = ["# Planted-rank benchmark: results", ""]
    if command:
        lines += [f"Made by `{command}` from the store's finished records.", ""]
    splits = sorted({r["eval_split"] for r in runs})
    commits = sorted({str(r["commit"])[:12] for r in runs})
    lines += [
        f"Records: {len(runs)}; metric read on split(s) {', '.join(splits)}; code at commit(s) {', '.join(commits)}.",
        "",
    ]
    signal = [p for p in PATTERNS if p != CONTROL and any(r["pattern"] == p for r in runs)]
    head = "| budget | map | pairs | mean gap closed | vs uniform | 95 % CI | p (sign flip) |"
    if signal:
        lines += [
            f"## Pooled over seeds and the patterns {', '.join(signal)}", "",
            head + " uniform->oracle recovered | Spearman | AUC |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
            *_comparison_rows(runs, signal, True), "",
        ]  # fmt: skip
    if any(r["pattern"] == CONTROL for r in runs):
        lines += [
            "## Control: homogeneous planting (no map should beat uniform)", "",
            head, "|---|---|---:|---:|---:|---|---:|",
            *_comparison_rows(runs, [CONTROL], False), "",
        ]  # fmt: skip
    lines += ["## Every cell", "", "Gap closed per seed; Spearman / AUC of the map against the planted ranks; "
              "LoRA parameters / budget (flagged `!` when off by more than 2 %).", "",
              "| pattern | strength | budget | map | seed | gap closed | Spearman | AUC | params / budget | wall s |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(
        runs,
        key=lambda r: (
            PATTERNS.index(r["pattern"]) if r["pattern"] in PATTERNS else 99,
            int(r["budget"][1:]),
            _order([r["method"], "uniform", ORACLE]).index(r["method"])
            if r["method"] in ("uniform", ORACLE)
            else 2,
            r["method"],
            r["seed"],
        ),
    ):  # noqa: E501
        m = r["metrics"]
        ratio = m.get("lora_param_ratio", math.nan)
        flag = " !" if math.isfinite(ratio) and abs(ratio - 1) > _PARAM_TOLERANCE else ""
        lines.append(
            f"| {r['pattern']} | {r['strength']:g} | {r['budget']} | {r['method']} | {r['seed']} | "
            f"{_fmt(m['gap_closed'])} | {_fmt(m.get('spearman', math.nan), 2)} | {_fmt(m.get('auc', math.nan), 2)} | "
            f"{_fmt(ratio, 3)}{flag} | {r['wall_seconds']:.0f} |"
        )
    if picture:
        lines += ["", f"![planted vs chosen ranks]({picture})", ""]
    return "\n".join(lines) + "\n"


def plot_maps(runs: Sequence[PlantedRun], out: Path, *, pattern: str, budget: str, seed: int) -> Path | None:
    """Planted ranks and every map's ranks on one planting as layer x kind heatmaps; None if no such run."""
    here = [r for r in runs if (r["pattern"], r["budget"], r["seed"]) == (pattern, budget, seed)]
    if not here:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted(here[0]["planted"])
    layers = sorted({split_module_name(n)[0] for n in names})
    kinds = sorted({split_module_name(n)[1] for n in names})

    def grid(ranks: Mapping[str, int]) -> Any:
        values = np.zeros((len(kinds), len(layers)))
        for n in names:
            layer, kind = split_module_name(n)
            values[kinds.index(kind), layers.index(layer)] = ranks.get(n, 0)
        return values

    panels = [("planted", here[0]["planted"])] + [
        (r["method"], r["rank_map"])
        for r in sorted(
            here,
            key=lambda r: (
                _order([r["method"], "uniform", ORACLE]).index(r["method"])
                if r["method"] in ("uniform", ORACLE)
                else 2 + sorted(x["method"] for x in here).index(r["method"])
            ),
        )
    ]  # noqa: E501
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (title, ranks) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(grid(ranks), cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_yticks(range(len(kinds)), [k.replace("attention.", "att.") for k in kinds], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{pattern}, seed {seed}, budget {budget}: rank per module (x: layer)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(
    records: Iterable[Mapping[str, Any]],
    out_dir: Path,
    *,
    command: str = "",
    plot: tuple[str, str, int] = ("sparse", "r4", 0),
    split: str = "test",
) -> Path:
    """Write ``results.md`` (and ``ranks.png`` for the planting ``plot`` = (pattern, budget, seed)) in ``out_dir``
    from the runs scored on ``split``."""
    runs = planted_runs(records, split=split)
    picture = plot_maps(runs, out_dir / "ranks.png", pattern=plot[0], budget=plot[1], seed=plot[2])
    text = report_markdown(runs, command=command, picture=picture.name if picture else None)
    return atomic_write_text(out_dir / "results.md", text)
