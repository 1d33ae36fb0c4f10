"""Choices made on the validation split, never on the test split: training length and learning rates.

The full-length protocol (docs/results/full/README.md) fixes two things before any test number exists:

* **length**: the validation curve of uniform LoRA (``bench/grids/full/length.yaml``: dev accuracy every
  25 steps, recorded in ``extra.evals``). The chosen length is the first evaluated step from which the
  mean dev accuracy over tasks stays within ``tolerance`` points of its best value: the plateau.
* **learning rate per method**: runs of ``bench/grids/full/select_lr*.yaml`` (dev split, one seed, two
  or more tasks); each method gets the learning rate with the highest mean dev accuracy over its
  (task, seed) runs, ties to the smaller rate.

Both refuse any record that was evaluated on the test split, so a test number can never steer a choice.
Torch-free: records are plain JSON.

Usage::

    python -m bench.studies.selection length --store bench/results/full/length --out docs/results/full
    python -m bench.studies.selection lr --store bench/results/full/selection --out docs/results/full
    python -m bench.studies.selection test-grid --selection docs/results/full/lr_selection.json \
        --from bench/grids/full/select_lr_0.001.yaml --out bench/grids/full

The third step writes the test grids from the choices (never by hand): every selection grid's settings
with ``eval_split: test``, five seeds, five tasks and each method's chosen rate.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import ResultStore
from bench.studies.protocol import (
    COMPRESS_FRACTIONS,
    TEST_SEEDS,
    TEST_TASKS,
    accuracy_percent,
    check_dev_only,
    split_overrides,
    write_grid,
)
from bench.suites.data import majority_rates
from fimlora.io import atomic_write_json, atomic_write_text

__all__ = [
    "LOW_BUDGET_METHODS",
    "length_curve",
    "main",
    "make_test_grids",
    "plateau_step",
    "select_learning_rates",
]

LOW_BUDGET_METHODS: tuple[str, ...] = ("uniform", "fim")
"""Methods also run at the r2 and r4 parameter counts (the accuracy-vs-parameters front); their r8 adapters
are also compressed to :data:`bench.studies.protocol.COMPRESS_FRACTIONS` (issue 14)."""

COMMAND = "python -m bench.studies.selection"
"""How this study runs: ``length.md``, ``lr_selection.md`` and the test grids it writes name it."""


def length_curve(records: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Task -> [(step, dev accuracy %)] from the periodic evaluations of dev-split records (mean over
    seeds where a task has several)."""
    by_task: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in check_dev_only(records):
        for step, metrics in record["extra"].get("evals", []):
            by_task[record["spec"]["task"]][int(step)].append(100.0 * float(metrics["accuracy"]))
    return {
        task: sorted((step, sum(v) / len(v)) for step, v in steps.items()) for task, steps in by_task.items()
    }


def plateau_step(curves: Mapping[str, Sequence[tuple[int, float]]], tolerance: float = 0.5) -> int:
    """The first step from which the mean dev accuracy over tasks stays within ``tolerance`` points of its
    maximum. Only steps every task evaluated count.

    Raises:
        ValueError: no step is shared by all tasks.
    """
    shared = set.intersection(*(set(s for s, _ in c) for c in curves.values())) if curves else set()
    if not shared:
        raise ValueError("no evaluation step is shared by every task; run the length grid to the end")
    steps = sorted(shared)
    values = {t: dict(c) for t, c in curves.items()}
    mean = [sum(values[t][s] for t in values) / len(values) for s in steps]
    best = max(mean)
    for i, step in enumerate(steps):
        if all(m >= best - tolerance for m in mean[i:]):
            return step
    return steps[-1]


def select_learning_rates(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Method -> ``{"lr": chosen, "mean_dev_accuracy": {lr: %}, "runs": {lr: n}}`` from dev-split records.

    The mean is over every (task, seed) a learning rate was run on; a rate run on fewer (task, seed) pairs
    than the method's most complete rate is reported but not chosen (a missing run must not win).
    """
    acc: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in check_dev_only(records):
        spec = record["spec"]
        lr = float(spec["overrides"]["lr"])
        acc[spec["method"]][lr].append(accuracy_percent(record))
    out: dict[str, dict[str, Any]] = {}
    for method, by_lr in sorted(acc.items()):
        full = max(len(v) for v in by_lr.values())
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
        complete = [lr for lr, v in by_lr.items() if len(v) == full]
        chosen = max(sorted(complete), key=lambda lr: (means[lr], -lr))
        out[method] = {
            "lr": chosen,
            "mean_dev_accuracy": {f"{lr:g}": round(means[lr], 2) for lr in sorted(by_lr)},
            "runs": {f"{lr:g}": len(by_lr[lr]) for lr in sorted(by_lr)},
        }
    return out


def make_test_grids(
    chosen: Mapping[str, Mapping[str, Any]], selection_grid: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The test grids from the learning-rate choices and one selection grid's settings.

    Returns ``{"test": grid at r8 for every selected method, "test_low": uniform and fim at r2 and r4}``;
    both evaluate on the test split, with five seeds on the five tasks. Everything else (length, data sizes,
    method options) is the selection grid's, so the test runs are the selected configurations. The r8 runs
    of uniform and fim also record their adapters compressed to :data:`COMPRESS_FRACTIONS`.

    Raises:
        ValueError: a method of the selection grid has no choice, or a low-budget method is missing.
    """
    methods = list(selection_grid["methods"])
    missing = [m for m in methods if m not in chosen]
    if missing:
        raise ValueError(f"no learning rate chosen for {missing}: finish the selection runs first")
    overrides = split_overrides(selection_grid, "test")
    base_method_overrides = {m: dict(v) for m, v in selection_grid.get("method_overrides", {}).items()}

    def grid(methods_: list[str], budgets: list[str], compress: bool = False) -> dict[str, Any]:
        method_overrides = {
            m: {**base_method_overrides.get(m, {}), "lr": float(chosen[m]["lr"])} for m in methods_
        }
        if compress:
            for m in LOW_BUDGET_METHODS:
                method_overrides[m]["compress_fractions"] = list(COMPRESS_FRACTIONS)
        return {
            "suite": selection_grid["suite"],
            "models": list(selection_grid["models"]),
            "tasks": list(TEST_TASKS),
            "methods": methods_,
            "budgets": budgets,
            "seeds": list(TEST_SEEDS),
            "overrides": dict(overrides),
            "method_overrides": method_overrides,
        }

    low = [m for m in LOW_BUDGET_METHODS if m in methods]
    if low != list(LOW_BUDGET_METHODS):
        raise ValueError(f"the selection grid must include {list(LOW_BUDGET_METHODS)} for the low budgets")
    return {"test": grid(methods, ["r8"], compress=True), "test_low": grid(low, ["r2", "r4"])}


def _write_test_grids(selection: Path, from_grid: Path, out: Path) -> None:
    import json

    import yaml

    chosen = json.loads(selection.read_text())
    grids = make_test_grids(chosen, yaml.safe_load(from_grid.read_text()))
    for name, grid in grids.items():
        header = (
            f"# Full-length protocol, step 3: the TEST grid, written by\n"
            f"#   {COMMAND} test-grid --selection {selection} --from {from_grid} --out {out}\n"
            f"# from the dev-split choices in {selection} (do not edit by hand: rerun the command).\n"
            f"# Run: bench/grids/full/run_test.sh (two single-thread workers, seed by seed).\n"
        )
        write_grid(out / f"{name}.yaml", header, grid)


def _length_report(store: Path, out: Path, tolerance: float) -> None:
    curves = length_curve(ResultStore(store).records())
    step = plateau_step(curves, tolerance)
    atomic_write_json(
        out / "length.json", {"tolerance_points": tolerance, "plateau_step": step, "curves": curves}
    )
    lines = [
        "# Training length: uniform LoRA's validation curve",
        "",
        f"Dev accuracy (%) of uniform LoRA r8 every 25 steps (`{store}`). The chosen length is the first step from",
        f"which the mean over tasks stays within {tolerance} points of its best: **step {step}**.",
        "",
        "| step | " + " | ".join(sorted(curves)) + " | mean |",
        "|---:|" + "---:|" * (len(curves) + 1),
    ]
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves.values())))
    values = {t: dict(c) for t, c in curves.items()}
    for s in steps:
        row = [values[t][s] for t in sorted(curves)]
        lines.append(f"| {s} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row) / len(row):.1f} |")
    lines += ["", f"Made with `{COMMAND} length --store {store} --out {out}`.", ""]
    atomic_write_text(out / "length.md", "\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for task, curve in sorted(curves.items()):
        ax.plot([s for s, _ in curve], [v for _, v in curve], label=task)
    ax.axvline(step, color="grey", linestyle="--", linewidth=1, label=f"chosen: step {step}")
    ax.set_xlabel("optimizer step (16 examples each)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("uniform LoRA r8: validation curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "length.png", dpi=120)
    plt.close(fig)


def _lr_report(store: Path, out: Path) -> None:
    records = ResultStore(store).records()
    chosen = select_learning_rates(records)
    tasks = sorted({str(r["spec"]["task"]) for r in check_dev_only(records)})
    atomic_write_json(out / "lr_selection.json", chosen)
    lrs = sorted({lr for c in chosen.values() for lr in c["mean_dev_accuracy"]}, key=float)
    lines = [
        "# Learning rate per method, chosen on the dev split",
        "",
        f"Mean dev accuracy (%) over the selection runs (`{store}`; runs per cell in parentheses); the chosen",
        "rate is bold. Ties go to the smaller rate.",
        "",
        "| method | " + " | ".join(lrs) + " |",
        "|---|" + "---:|" * len(lrs),
    ]
    for method, c in chosen.items():
        cells = []
        for lr in lrs:
            if lr not in c["mean_dev_accuracy"]:
                cells.append("–")
                continue
            text = f"{c['mean_dev_accuracy'][lr]:.2f} ({c['runs'][lr]})"
            cells.append(f"**{text}**" if math.isclose(float(lr), c["lr"]) else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    floor = majority_rates(tasks, split="dev")
    lines += [
        "",
        "The floor, always predicting the training split's most frequent class, on the dev split: "
        + ", ".join(
            f"{t} {v:.2f} %" if v is not None else f"{t} (data not readable here)" for t, v in floor.items()
        )
        + ".",
        "",
        f"Made with `{COMMAND} lr --store {store} --out {out}`.",
        "",
    ]
    atomic_write_text(out / "lr_selection.md", "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("length", help="validation curve of uniform LoRA and the chosen training length")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tolerance", type=float, default=0.5, help="points below the best mean (default 0.5)")
    p = sub.add_parser("lr", help="learning rate per method from the dev-split selection runs")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("test-grid", help="write the test grids from the learning-rate choices")
    p.add_argument("--selection", required=True, type=Path, help="lr_selection.json from the `lr` step")
    p.add_argument("--from", dest="from_grid", required=True, type=Path, help="a selection grid (settings)")
    p.add_argument("--out", required=True, type=Path, help="folder for test.yaml and test_low.yaml")
    args = parser.parse_args(argv)
    if args.what == "length":
        _length_report(args.store, args.out, args.tolerance)
    elif args.what == "lr":
        _lr_report(args.store, args.out)
    else:
        _write_test_grids(args.selection, args.from_grid, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
