"""Issue 13: allocation variants, chosen on the dev split of three tasks, confirmed on two held-out tasks.

Every variant is a registered method with fixed settings (:data:`VARIANTS`), trained with its base method's
learning rate from the dev-split selection (``docs/results/full/lr_selection.json``). Steps:

1. ``grids``: one grid per variant on the **dev** split of the selection tasks (:data:`SELECTION_TASKS`),
   two seeds, at the r2 and r8 parameter counts, plus uniform LoRA at r4 (where the front bends)::

       python -m bench.studies.variants grids --selection docs/results/full/lr_selection.json \\
           --from bench/grids/full/select_lr_0.001.yaml --out bench/grids/full/variants

2. run them (two workers sharing the queue, ``--shared --seed-major``; see ``run_variants.sh``);
3. ``report``: every variant's mean dev accuracy per task and budget, its paired difference from uniform
   LoRA and from FIM-LoRA, and the choice (the highest mean dev accuracy pooled over the selection tasks
   and both budgets, among the variants of fimlora's own methods)::

       python -m bench.studies.variants report --store bench/results/full/variants --out docs/results/full

The confirmation (the chosen variant on the held-out tasks' test splits, 5 seeds) is part of the test grid.
Torch-free.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import ResultStore, mean_std
from bench.studies.protocol import (
    DEV_SEEDS,
    SELECTION_TASKS,
    accuracy_cells,
    check_dev_only,
    format_difference,
    paired_difference,
    split_overrides,
    variant_name,
    write_grid,
)
from fimlora.io import atomic_write_json, atomic_write_text
from fimlora.module_names import split_module_name

__all__ = [
    "VARIANTS",
    "choose_variant",
    "layer_shares",
    "main",
    "make_variant_grids",
    "row_complete",
    "variant_table",
]

SEEDS: tuple[int, ...] = DEV_SEEDS
"""The variant grids' seeds (the protocol's dev seeds)."""

BUDGETS: tuple[str, ...] = ("r2", "r8")

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("uniform", {}),
    "fim": ("fim", {}),
    "fim-power0.5": ("fim", {"score_power": 0.5}),
    "fim-kind": ("fim", {"normalize": "kind"}),
    "fim-rslora": ("fim", {"use_rslora": True, "adjust_scaling_factors": False}),
    "fim-ginit": ("fim", {"method_options": {"gradient_init": True}}),
    "fim-spectrum": ("fim-spectrum", {}),
    "fim-spectrum-raw": ("fim-spectrum", {"method_options": {"normalize": False}}),
    "l1ra-fimstart": ("l1ra", {"method_options": {"start": "fim"}}),
}
"""Variant name -> (registered method, spec overrides). ``uniform`` is the reference (the baseline to beat;
GoRA, EVA and AdaLoRA, which the chosen variant must be level with, are compared in the test grid, where all
of them run); the rest are the ideas of issue 13:
tempered scores, scores normalised per module kind, rsLoRA's per-module scale, GoRA's initialisation on
FIM's map, directions rather than size (the gradient spectrum of a wide calibration adapter; ``-raw`` ranks
directions by energy), and FIM's map as L1RA's start."""

LR_OF: dict[str, str] = {"fim-spectrum": "fim"}
"""Methods without their own learning-rate selection take this method's rate (same training: plain LoRA)."""

REFERENCES: tuple[str, ...] = ("uniform",)

EXPECTED_RUNS = (len(VARIANTS) * len(BUDGETS) + 1) * len(SELECTION_TASKS) * len(SEEDS)
"""Runs of the variant grids: every variant at each budget, plus uniform at r4, on every task and seed."""

COMMAND = "python -m bench.studies.variants"
"""How this study runs: ``variants.md`` and the variant grids it writes name it."""


def make_variant_grids(
    chosen: Mapping[str, Mapping[str, Any]], selection_grid: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """One dev-split grid per variant (name -> grid), plus ``uniform-r4`` (uniform at r4: the front's middle).

    The selection grid gives the length, data sizes and method options; each variant adds its overrides and
    ``variant: <name>`` (a label the runner ignores) and its base method's chosen learning rate.

    Raises:
        ValueError: a base method without a learning-rate choice.
    """
    overrides = split_overrides(selection_grid, "dev")
    base_method_overrides = dict(selection_grid.get("method_overrides", {}))
    grids: dict[str, dict[str, Any]] = {}
    for name, (method, extra) in VARIANTS.items():
        lr_method = LR_OF.get(method, method)
        if lr_method not in chosen:
            raise ValueError(
                f"no learning rate chosen for {lr_method!r} (variant {name!r}): finish the selection"
            )
        spec_overrides = {**overrides, **base_method_overrides.get(method, {}), **extra}
        if "method_options" in extra and "method_options" in base_method_overrides.get(method, {}):
            spec_overrides["method_options"] = {
                **base_method_overrides[method]["method_options"],
                **extra["method_options"],
            }
        spec_overrides.update(variant=name, lr=float(chosen[lr_method]["lr"]))
        grids[name] = {
            "suite": selection_grid["suite"],
            "models": list(selection_grid["models"]),
            "tasks": list(SELECTION_TASKS),
            "methods": [method],
            "budgets": list(BUDGETS),
            "seeds": list(SEEDS),
            "overrides": spec_overrides,
        }
    grids["uniform-r4"] = {**grids["uniform"], "budgets": ["r4"]}
    return grids


def variant_table(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per (variant, budget): mean dev accuracy (%) per task and pooled, and paired differences (by task and
    seed) from uniform and from fim at the same budget, with 95% bootstrap CIs."""
    acc = accuracy_cells(check_dev_only(records))
    rows = {}
    for (variant, budget), cells in sorted(acc.items()):
        tasks = sorted({t for t, _ in cells})
        per_task = {}
        for task in tasks:
            values = [v for (t, _), v in sorted(cells.items()) if t == task]
            mean, std = mean_std(values)
            per_task[task] = {"mean": mean, "std": std, "n": len(values)}
        row: dict[str, Any] = {
            "variant": variant,
            "budget": budget,
            "per_task": per_task,
            # pooled only over the full set of tasks: a mean over whichever tasks have finished misleads
            "pooled": (
                math.fsum(c["mean"] for c in per_task.values()) / len(per_task)
                if set(SELECTION_TASKS) <= set(per_task)
                else None
            ),
            "n_runs": len(cells),
        }
        for reference in ("uniform", "fim"):
            diff = (
                None if variant == reference else paired_difference(cells, acc.get((reference, budget), {}))
            )
            if diff is not None:
                row[f"vs_{reference}"] = diff
        rows[f"{variant}@{budget}"] = row
    return rows


def layer_shares(records: Iterable[Mapping[str, Any]], budget: str = "r8") -> dict[str, dict[str, float]]:
    """Where each variant puts its rank: variant -> layer -> the share of its rank sum in that layer, averaged
    over its runs at ``budget`` (the rank map a run ended with; modules outside numbered layers count as
    ``"other"``). Uniform LoRA spreads its rank evenly; FIM-LoRA's maps were top-heavy, which several variants
    set out to change: this shows whether they did."""
    shares: dict[str, list[dict[str, float]]] = defaultdict(list)
    for record in check_dev_only(records):
        ranks = (record.get("extra") or {}).get("rank_map") or {}
        if record["spec"]["budget"] != budget or not ranks:
            continue
        total = math.fsum(ranks.values())
        per_layer: dict[str, float] = defaultdict(float)
        for name, rank in ranks.items():
            layer = split_module_name(name)[0]
            per_layer["other" if layer is None else str(layer)] += rank / total
        shares[variant_name(record)].append(per_layer)
    out = {}
    for variant, runs in sorted(shares.items()):
        layers = sorted(
            {k for run in runs for k in run}, key=lambda k: (k == "other", int(k) if k.isdigit() else 0)
        )
        out[variant] = {k: math.fsum(run.get(k, 0.0) for run in runs) / len(runs) for k in layers}
    return out


def row_complete(row: Mapping[str, Any] | None, tasks: Sequence[str] = SELECTION_TASKS) -> bool:
    """Whether a row of :func:`variant_table` has every seed of :data:`SEEDS` on every one of ``tasks``."""
    return row is not None and all(row["per_task"].get(t, {}).get("n", 0) == len(SEEDS) for t in tasks)


def choose_variant(
    table: Mapping[str, Mapping[str, Any]], *, tasks: Sequence[str] = SELECTION_TASKS
) -> str | None:
    """The variant of fimlora's own methods (not a reference) with the highest pooled dev accuracy averaged
    over the budgets it was run at, counting only variants complete on every selection task at every budget
    of :data:`BUDGETS`; None while none is complete. Ties go to the earlier variant of :data:`VARIANTS`."""
    best, best_value = None, -math.inf
    for name in VARIANTS:
        if name in REFERENCES:
            continue
        rows = [table.get(f"{name}@{b}") for b in BUDGETS]
        if not all(row_complete(r, tasks) for r in rows):
            continue
        value = math.fsum(r["pooled"] for r in rows if r is not None) / len(rows)
        if value > best_value:
            best, best_value = name, value
    return best


def _report(store: Path, out: Path) -> None:
    records = list(ResultStore(store).records())
    table = variant_table(records)
    shares = layer_shares(records)
    finished = sum(r["n_runs"] for r in table.values())
    # the rule picks among every variant: while runs are missing, the leader is no choice (null in the JSON)
    leading = choose_variant(table)
    chosen = leading if finished >= EXPECTED_RUNS else None
    atomic_write_json(
        out / "variants.json",
        {
            "rows": table,
            "chosen": chosen,
            "leading": leading,
            "selection_tasks": SELECTION_TASKS,
            "runs_finished": finished,
            "expected_runs": EXPECTED_RUNS,
            "layer_shares_r8": shares,
        },
    )
    tasks = sorted({t for r in table.values() for t in r["per_task"]})
    lines = [
        "# Issue 13: allocation variants on the dev split",
        "",
        f"Dev accuracy (%), mean over seeds {list(SEEDS)} on the selection tasks; differences are paired by",
        "(task, seed) against uniform LoRA and FIM-LoRA at the same LoRA parameter count (95% bootstrap CI).",
        "The test split is never read here. Every variant tried is listed, not only the winner.",
        "",
        f"Runs finished: {finished} of {EXPECTED_RUNS} (runs per cell in parentheses).",
        "",
        "| variant | budget | " + " | ".join(tasks) + " | pooled | vs uniform | vs fim |",
        "|---|---|" + "---:|" * (len(tasks) + 1) + "---|---|",
    ]
    for row in table.values():
        cells = [
            f"{row['per_task'][t]['mean']:.2f} ({row['per_task'][t]['n']})" if t in row["per_task"] else "–"
            for t in tasks
        ]
        diffs = [format_difference(row.get(f"vs_{ref}"), pairs=False) for ref in ("uniform", "fim")]
        lines.append(
            f"| {row['variant']} | {row['budget']} | "
            + " | ".join(cells)
            + (
                f" | {row['pooled']:.2f} | "
                if row["pooled"] is not None
                else f" | – ({len(row['per_task'])} of {len(SELECTION_TASKS)} tasks) | "
            )
            + " | ".join(diffs)
            + " |"
        )
    layers = list(dict.fromkeys(k for row in shares.values() for k in row))
    if shares:
        lines += [
            "",
            "## Where the rank goes (r8)",
            "",
            "Share of each variant's rank sum per layer (%, mean over its runs; the final map for L1RA). The",
            "last two layers are nearest the classifier head.",
            "",
            "| variant | " + " | ".join(f"layer {k}" for k in layers) + " | last two |",
            "|---|" + "---:|" * (len(layers) + 1),
        ]
        numbered = [k for k in layers if k.isdigit()]
        for variant, row in shares.items():
            last_two = math.fsum(row.get(k, 0.0) for k in numbered[-2:])
            lines.append(
                f"| {variant} | "
                + " | ".join(f"{100 * row.get(k, 0.0):.1f}" for k in layers)
                + f" | {100 * last_two:.1f} |"
            )
    lines += [
        "",
        (
            f"Chosen (highest pooled dev accuracy over both budgets among fimlora's variants): **{chosen}**."
            if chosen
            else f"No choice yet: {EXPECTED_RUNS - finished} of {EXPECTED_RUNS} runs missing. Leading among the variants with "
            f"every run so far: {leading or 'none'} (interim, not a choice)."
        ),
        "",
        f"Made with `{COMMAND} report --store {store} --out {out}`.",
        "",
    ]
    atomic_write_text(out / "variants.md", "\n".join(lines))


def _write_grids(selection: Path, from_grid: Path, out: Path) -> None:
    import yaml

    grids = make_variant_grids(json.loads(selection.read_text()), yaml.safe_load(from_grid.read_text()))
    for name, grid in grids.items():
        header = (
            f"# Issue 13, variant {name!r} on the DEV split, written by\n"
            f"#   {COMMAND} grids --selection {selection} --from {from_grid} --out {out}\n"
            "# (do not edit by hand: rerun the command). Run: bench/grids/full/run_variants.sh\n"
        )
        write_grid(out / f"{name}.yaml", header, grid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("grids", help="write one dev-split grid per variant")
    p.add_argument("--selection", required=True, type=Path)
    p.add_argument("--from", dest="from_grid", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("report", help="the variant table and the choice")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.what == "grids":
        args.out.mkdir(parents=True, exist_ok=True)
        _write_grids(args.selection, args.from_grid, args.out)
    else:
        _report(args.store, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
