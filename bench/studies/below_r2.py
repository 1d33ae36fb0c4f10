"""Issue 13 below the r2 budget (dev split): does FIM-LoRA that may drop modules hold accuracy at r1's count?

The target of issue 13 accepts a move of the accuracy-vs-parameters front: reaching uniform r = 8's pooled
accuracy (within 0.5 points) at a smaller budget where uniform LoRA itself falls at least 1 point short.
With ``r_min >= 1`` the only map at uniform r = 1's parameter count is uniform, so this step lets FIM drop
modules (``r_min = 0``; ``bench/grids/full/below_r2.yaml``: uniform, ``fim-kind-drop`` and the control
``random-drop`` at r1, dev split, the variant grid's seeds and settings). The references at r2, r4 and r8
(uniform, fim-kind) come from the variant store, run under the same protocol.

    python -m bench.studies.below_r2 --store bench/results/full/below_r2 \\
        --variants bench/results/full/variants --out docs/results/full

This is a dev-split reading: it says whether the idea deserves a test-split confirmation, not that it works.
Torch-free.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import ResultStore
from bench.studies.protocol import (
    SELECTION_TASKS,
    accuracy_cells,
    check_dev_only,
    format_difference,
    paired_difference,
)
from bench.studies.variants import SEEDS, row_complete, variant_table
from fimlora.io import atomic_write_json, atomic_write_text

__all__ = ["REFERENCE_ROWS", "front_reading", "main"]

REFERENCE_ROWS: tuple[str, ...] = ("uniform@r2", "uniform@r4", "uniform@r8", "fim-kind@r2", "fim-kind@r8")
"""Rows taken from the variant store (the same dev protocol)."""

NEW_ROWS: tuple[str, ...] = ("uniform@r1", "fim-kind-drop@r1", "random-drop@r1")
"""Rows of this step's grid."""

COMMAND = "python -m bench.studies.below_r2"
"""How this study runs: ``below_r2.md`` and ``below_r2.json`` name it."""


def _cell(row: str) -> tuple[str, str]:
    """``"variant@budget"`` (a row name of :func:`bench.studies.variants.variant_table`) as a cell key."""
    variant, budget = row.split("@")
    return variant, budget


def front_reading(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The table rows (as :func:`bench.studies.variants.variant_table`), the paired differences that matter here, and
    the dev reading of issue 13's front criterion; ``complete`` is False while a cell misses a seed."""
    records = check_dev_only(records)
    table = variant_table(records)
    rows = {k: table[k] for k in (*NEW_ROWS, *REFERENCE_ROWS) if k in table}
    complete = all(row_complete(rows.get(k)) for k in (*NEW_ROWS, *REFERENCE_ROWS))
    cells = accuracy_cells(records)
    pairs: dict[str, Any] = {}
    for a, b in (
        ("fim-kind-drop@r1", "uniform@r1"),
        ("fim-kind-drop@r1", "random-drop@r1"),
        ("fim-kind-drop@r1", "uniform@r8"),
        ("uniform@r1", "uniform@r8"),
    ):
        diff = paired_difference(cells.get(_cell(a), {}), cells.get(_cell(b), {}))
        if diff is not None:
            pairs[f"{a} - {b}"] = diff
    verdict = None
    pooled = {k: r["pooled"] for k, r in rows.items()}
    if complete and None not in pooled.values():
        uniform_short = pooled["uniform@r8"] - pooled["uniform@r1"]
        fim_short = pooled["uniform@r8"] - pooled["fim-kind-drop@r1"]
        verdict = {
            "uniform_r1_short_of_r8": uniform_short,
            "fim_kind_drop_r1_short_of_r8": fim_short,
            "front_moved_on_dev": uniform_short >= 1.0 and fim_short <= 0.5,
        }
    return {"rows": rows, "pairs": pairs, "complete": complete, "verdict": verdict}


def _markdown(reading: Mapping[str, Any], command: str) -> str:
    rows = reading["rows"]
    tasks = list(SELECTION_TASKS)
    lines = [
        "# Issue 13: below the r2 budget, with modules dropped (dev split)",
        "",
        "Dev accuracy (%), mean over seeds "
        f"{list(SEEDS)}. At uniform r = 1's LoRA parameter count FIM-LoRA (kind-normalised, as `fim-kind`) may",
        "drop modules (`r_min = 0`, `r_max = 8`); `random-drop` spends the same budget with random scores under",
        "the same bounds. The r2/r4/r8 rows are the variant grid's (same protocol). The test split is not read.",
        "",
        "| variant | budget | " + " | ".join(tasks) + " | pooled |",
        "|---|---|" + "---:|" * (len(tasks) + 1),
    ]
    for row in rows.values():
        cells = [
            f"{row['per_task'][t]['mean']:.2f} ({row['per_task'][t]['n']})" if t in row["per_task"] else "–"
            for t in tasks
        ]
        pooled = f"{row['pooled']:.2f}" if row["pooled"] is not None else "–"
        lines.append(f"| {row['variant']} | {row['budget']} | " + " | ".join(cells) + f" | {pooled} |")
    lines += ["", "Paired differences (by task and seed, 95% bootstrap CI):", ""]
    for name, d in reading["pairs"].items():
        lines.append(f"- {name}: {format_difference(d)}")
    verdict = reading["verdict"]
    lines.append("")
    if verdict is None:
        lines.append("Incomplete: some cells miss a seed; no reading yet.")
    else:
        moved = verdict["front_moved_on_dev"]
        lines.append(
            f"Uniform r1 is {verdict['uniform_r1_short_of_r8']:.2f} points short of uniform r8 (pooled); "
            f"fim-kind-drop r1 is {verdict['fim_kind_drop_r1_short_of_r8']:.2f} short. Issue 13's front "
            f"criterion (uniform >= 1 short, the method within 0.5) is **{'met' if moved else 'not met'}** on "
            "the dev split: "
            + (
                "worth a test-split confirmation (5 seeds, all five tasks)."
                if moved
                else "no test-split confirmation is planned for it."
            )
        )
    lines += ["", f"Made with `{command}`.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, type=Path, help="this step's store (below_r2.yaml)")
    parser.add_argument("--variants", required=True, type=Path, help="the variant grid's store (references)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    records = [*ResultStore(args.store).records(), *ResultStore(args.variants).records()]
    reading = front_reading(records)
    command = f"{COMMAND} --store {args.store} --variants {args.variants} --out {args.out}"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "below_r2.json", {**reading, "command": command})
    atomic_write_text(args.out / "below_r2.md", _markdown(reading, command))
    print(f"wrote {args.out / 'below_r2.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
