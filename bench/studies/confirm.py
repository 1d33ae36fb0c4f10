"""Issue 13, last step: the chosen variant on the test split, its held-out confirmation and the target.

The variant is chosen on the dev splits of three tasks (:mod:`bench.studies.variants`); here it runs like every other
method of the test grid (five tasks, five seeds, test split read once per run) at the r2, r4 and r8 parameter
counts, and two reports are read from the test store:

* the **confirmation** on the two held-out tasks (:data:`bench.studies.protocol.HELD_OUT_TASKS`), which took no part
  in any choice: the variant against uniform LoRA at each budget, per task and pooled;
* the **target** of issue 13 over all five tasks (:func:`target_verdict`): a gain of at least 1 point over
  uniform at one budget with the pooled 95% CI above 0, or uniform r8's accuracy (within 0.5) reached at a
  smaller budget where uniform itself is at least 1 point short; no task below uniform by more than one
  standard deviation; better than both random-allocation controls; at least level with GoRA, EVA, AdaLoRA;
* the **library default** (:func:`default_verdict`): the rule, declared before the last seed was read,
  by which the test grid keeps the chosen variant as ``FimConfig``'s default or refutes it.

The random-allocation controls of the test grid are ``random`` and ``fim-shuffled`` (FIM's map permuted among
same-shape modules). A variant with a map of its own gets its own shuffle too (:func:`shuffled_control`:
``fim-shuffled`` on the variant's map, at r8), and the target asks it to beat all three.

Steps::

    python -m bench.studies.confirm grid --choice docs/results/full/variants.json \\
        --selection docs/results/full/lr_selection.json --from bench/grids/full/select_lr_0.001.yaml \\
        --out bench/grids/full/test_variant.yaml      # + test_variant_low.yaml, test_variant_shuffled.yaml
    bash bench/grids/full/run_test.sh            # runs every test_variant*.yaml too
    python -m bench.studies.confirm report --store bench/results/full/test \\
        --choice docs/results/full/variants.json --out docs/results/full

Torch-free.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import ResultStore, mean_std
from bench.studies.full_report import test_split_records
from bench.studies.protocol import (
    COMPRESS_FRACTIONS,
    CONTROLS,
    HELD_OUT_TASKS,
    TEST_SEEDS,
    TEST_TASKS,
    Cells,
    accuracy_cells,
    format_difference,
    of_seeds,
    paired_difference,
    seeds_arg,
    write_grid,
)
from bench.studies.variants import REFERENCES, VARIANTS, make_variant_grids
from fimlora.io import atomic_write_json, atomic_write_text

__all__ = [
    "CONFIRM_BUDGETS",
    "RIVALS",
    "TOP_BUDGET",
    "confirmation_table",
    "default_verdict",
    "make_confirmation_grid",
    "make_confirmation_grids",
    "make_shuffled_control_grid",
    "main",
    "shuffled_control",
    "target_verdict",
]

CONFIRM_BUDGETS: tuple[str, ...] = ("r2", "r4", "r8")
"""The chosen variant runs at the same parameter counts as uniform LoRA's front."""

TOP_BUDGET = CONFIRM_BUDGETS[-1]
"""The reference budget (uniform r8's parameter count): the controls and rivals run only here, the adapters
compressed for issue 14 are trained here, and target (b) measures the front against uniform at it."""

RIVALS: tuple[str, ...] = ("gora", "eva", "adalora")
"""Published allocators the chosen variant must be at least level with (at r8's parameter count)."""

GAIN_POINTS = 1.0
"""Target (a): pooled gain over uniform at one budget, in points, with the 95% CI above 0."""

MATCH_MARGIN = 0.5
"""Target (b): within this many points of uniform r8's pooled accuracy ..."""

SHORTFALL_POINTS = 1.0
"""... at a budget where uniform itself is at least this many points below its r8 accuracy."""

FALLBACK_DEFAULT = "fim"
"""What the library default returns to if the test grid refutes the chosen variant: plain FIM-LoRA scores
(``normalize="none"``), the default before the variant grid. Nothing else is picked from the test split."""

COMMAND = "python -m bench.studies.confirm"
"""How this study runs: ``confirmation.md`` and the ``test_variant*`` grids it writes name it."""


def make_confirmation_grid(
    variant: str, chosen: Mapping[str, Mapping[str, Any]], selection_grid: Mapping[str, Any]
) -> dict[str, Any]:
    """The chosen variant's test grid: its dev-split grid's settings, on the test split of the five tasks,
    five seeds, at :data:`CONFIRM_BUDGETS`.

    Raises:
        ValueError: no variant chosen yet, a reference chosen, or plain ``fim`` (already in the test grid).
    """
    if not variant:
        raise ValueError(
            "no variant chosen yet: finish the variant grid and run `bench.studies.variants report`"
        )
    if variant in REFERENCES or variant == "fim":
        raise ValueError(
            f"{variant!r} is already in the test grid (test.yaml, test_low.yaml): nothing to add"
        )
    grid = dict(make_variant_grids(chosen, selection_grid)[variant])
    grid["overrides"] = {**grid["overrides"], "eval_split": "test"}
    grid.update(tasks=list(TEST_TASKS), seeds=list(TEST_SEEDS), budgets=list(CONFIRM_BUDGETS))
    return grid


def make_confirmation_grids(
    variant: str, chosen: Mapping[str, Mapping[str, Any]], selection_grid: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The grid files ``grid`` writes, by the suffix of their name: ``""`` the variant at r8, its adapters also
    compressed to :data:`bench.studies.protocol.COMPRESS_FRACTIONS` as uniform's and fim's are (issue 14's table then
    covers the new default too; compressing an r2 or r4 adapter is compared with nothing, so only r8);
    ``"_low"`` the variant at the smaller budgets; ``"_shuffled"`` its own shuffle control, where it has one.
    Together: :func:`make_confirmation_grid`'s runs plus the control.

    Raises:
        ValueError: as :func:`make_confirmation_grid`.
    """
    grid = make_confirmation_grid(variant, chosen, selection_grid)
    grids = {
        "": {
            **grid,
            "budgets": [TOP_BUDGET],
            "overrides": {**grid["overrides"], "compress_fractions": list(COMPRESS_FRACTIONS)},
        },
        "_low": {**grid, "budgets": [b for b in CONFIRM_BUDGETS if b != TOP_BUDGET]},
    }
    control = make_shuffled_control_grid(variant, chosen, selection_grid)
    if control is not None:
        grids["_shuffled"] = control
    return grids


def shuffled_control(variant: str) -> tuple[str, dict[str, Any]] | None:
    """The variant's own shuffle control: ``(name, spec overrides)`` of a ``fim-shuffled`` run that permutes
    the variant's map among same-shape modules (same budget and bounds, assignment destroyed).

    None where the test grid's ``fim-shuffled`` already is that control (``fim``; ``fim-ginit``, whose map is
    fim's), where the ranks are not fixed before training (``l1ra-fimstart``), and for the references.

    Raises:
        KeyError: not a variant of :data:`bench.studies.variants.VARIANTS`.
    """
    method, extra = VARIANTS[variant]
    name = f"{variant}-shuffled"
    if method == "fim" and extra and "method_options" not in extra:
        return name, dict(extra)  # FimConfig / LoRA fields: fim-shuffled allocates with them, then permutes
    if method == "fim-spectrum":
        options = dict(extra.get("method_options", {}))
        rest = {k: v for k, v in extra.items() if k != "method_options"}
        return name, {**rest, "method_options": {"source": "fim-spectrum", "source_options": options}}
    return None


def make_shuffled_control_grid(
    variant: str, chosen: Mapping[str, Mapping[str, Any]], selection_grid: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The test grid of the variant's own shuffle control (:func:`shuffled_control`): the variant's test grid
    at r8 only (as the other controls), method ``fim-shuffled`` at its own chosen learning rate; None where
    the variant has none."""
    control = shuffled_control(variant)
    if control is None:
        return None
    name, extra = control
    grid = make_confirmation_grid(variant, chosen, selection_grid)
    _, variant_extra = VARIANTS[variant]
    overrides = {k: v for k, v in grid["overrides"].items() if k not in variant_extra}
    overrides.update(extra, variant=name, lr=float(chosen["fim-shuffled"]["lr"]))
    return {**grid, "methods": ["fim-shuffled"], "budgets": [TOP_BUDGET], "overrides": overrides}


def _cells(records: Iterable[Mapping[str, Any]]) -> Cells:
    """(method or variant, budget) -> (task, seed) -> test accuracy in %, of the test-split records."""
    return accuracy_cells(test_split_records(records))


def _paired(
    cells: Cells, a: tuple[str, str], b: tuple[str, str], tasks: Sequence[str]
) -> dict[str, Any] | None:
    """``a`` minus ``b`` over the (task, seed) pairs both have on ``tasks``, with the tasks they cover; None
    with fewer than 2 pairs."""
    mine = {k: v for k, v in cells.get(a, {}).items() if k[0] in tasks}
    other = {k: v for k, v in cells.get(b, {}).items() if k[0] in tasks}
    diff = paired_difference(mine, other)
    if diff is None:
        return None
    return {**diff, "tasks": sorted({t for t, _ in set(mine) & set(other)})}


def _seed_values(cells: Cells, key: tuple[str, str], task: str) -> list[float]:
    """The per-seed accuracies of one (method, budget) on one task."""
    return [v for (t, _), v in cells.get(key, {}).items() if t == task]


def _pooled_mean(cells: Cells, key: tuple[str, str], tasks: Sequence[str]) -> float | None:
    """Mean over tasks of the per-task mean over seeds; None unless every task has runs."""
    per_task = [_seed_values(cells, key, task) for task in tasks]
    if not all(per_task):
        return None
    return math.fsum(math.fsum(v) / len(v) for v in per_task) / len(tasks)


def confirmation_table(
    records: Iterable[Mapping[str, Any]], variant: str, *, tasks: Sequence[str] = HELD_OUT_TASKS
) -> dict[str, Any]:
    """``variant`` against uniform LoRA at each budget on ``tasks`` (default: the held-out ones): per task
    (means, paired difference, CI) and pooled over them."""
    cells = _cells(records)
    out: dict[str, Any] = {}
    for budget in CONFIRM_BUDGETS:
        mine, ref = (variant, budget), ("uniform", budget)
        per_task = {}
        for task in tasks:
            values, base = _seed_values(cells, mine, task), _seed_values(cells, ref, task)
            if not values or not base:
                continue
            per_task[task] = {
                "variant": mean_std(values)[0],
                "uniform": mean_std(base)[0],
                "seeds": len(values),
                "vs_uniform": _paired(cells, mine, ref, [task]),
            }
        out[budget] = {"per_task": per_task, "pooled": _paired(cells, mine, ref, tasks)}
    return out


def target_verdict(
    records: Iterable[Mapping[str, Any]], variant: str, *, tasks: Sequence[str] = TEST_TASKS
) -> dict[str, Any]:
    """Issue 13's target for ``variant`` over ``tasks`` (all five by default), criterion by criterion.

    Returns a dict with ``gain`` (per budget: pooled paired difference from uniform at that budget; met when
    one is >= :data:`GAIN_POINTS` with its CI above 0), ``front`` (per smaller budget: the variant's and
    uniform's pooled accuracy against uniform r8's; met when the variant is within :data:`MATCH_MARGIN` and
    uniform at least :data:`SHORTFALL_POINTS` short), ``no_task_below`` (tasks and budgets where the
    variant's mean is more than one sample standard deviation of uniform's seeds below uniform's),
    ``controls`` (pooled at r8 against ``random``, ``fim-shuffled`` and the variant's own
    shuffle where it has one; met when every CI is above 0), ``rivals`` (pooled at r8
    against GoRA, EVA, AdaLoRA; level unless the whole CI is below 0), ``complete`` (every cell the
    criteria read has all of its tasks and seeds) and ``met`` (all criteria). While runs are missing every verdict
    (``*_met``, ``met``) is None, pending: a partial store shows the numbers but decides nothing.
    """
    cells = _cells(records)
    uniform_r8 = _pooled_mean(cells, ("uniform", TOP_BUDGET), tasks)
    gain = {b: _paired(cells, (variant, b), ("uniform", b), tasks) for b in CONFIRM_BUDGETS}
    front: dict[str, Any] = {}
    for budget in CONFIRM_BUDGETS:
        if budget == TOP_BUDGET:
            continue
        mine = _pooled_mean(cells, (variant, budget), tasks)
        base = _pooled_mean(cells, ("uniform", budget), tasks)
        front[budget] = {"variant": mine, "uniform": base, "uniform_r8": uniform_r8}
        front[budget]["met"] = None not in (mine, base, uniform_r8) and (
            mine >= uniform_r8 - MATCH_MARGIN and base <= uniform_r8 - SHORTFALL_POINTS  # type: ignore[operator]
        )
    below = []
    for budget in CONFIRM_BUDGETS:
        for task in tasks:
            values = _seed_values(cells, (variant, budget), task)
            base = _seed_values(cells, ("uniform", budget), task)
            if len(values) < 2 or len(base) < 2:
                continue
            (mine_mean, _), (base_mean, base_std) = mean_std(values), mean_std(base)
            if mine_mean < base_mean - base_std:
                below.append({"task": task, "budget": budget, "diff": mine_mean - base_mean, "std": base_std})
    own = shuffled_control(variant) if variant in VARIANTS else None
    control_names = (*CONTROLS, own[0]) if own is not None else CONTROLS
    top = (variant, TOP_BUDGET)
    controls = {c: _paired(cells, top, (c, TOP_BUDGET), tasks) for c in control_names}
    rivals = {r: _paired(cells, top, (r, TOP_BUDGET), tasks) for r in RIVALS}
    complete = all(
        all((task, seed) in cells.get(key, {}) for task in tasks for seed in TEST_SEEDS)
        for key in [(m, b) for m in (variant, "uniform") for b in CONFIRM_BUDGETS]
        + [(c, TOP_BUDGET) for c in (*control_names, *RIVALS)]
    )
    gain_met = any(g is not None and g["diff"] >= GAIN_POINTS and g["ci"][0] > 0 for g in gain.values())
    front_met = any(f["met"] for f in front.values())
    controls_met = all(c is not None and c["ci"][0] > 0 for c in controls.values())
    rivals_met = all(r is not None and r["ci"][1] >= 0 for r in rivals.values())
    met = (gain_met or front_met) and not below and controls_met and rivals_met

    def decided(flag: bool) -> bool | None:
        return flag if complete else None

    return {
        "variant": variant,
        "tasks": list(tasks),
        "gain": gain,
        "gain_met": decided(gain_met),
        "front": front,
        "front_met": decided(front_met),
        "no_task_below": below,
        "no_task_below_met": decided(not below),
        "controls": controls,
        "controls_met": decided(controls_met),
        "rivals": rivals,
        "rivals_met": decided(rivals_met),
        "complete": complete,
        "met": decided(met),
    }


def default_verdict(records: Iterable[Mapping[str, Any]], variant: str) -> dict[str, Any]:
    """Whether the test grid refutes ``variant`` as the library default: the rule pre-declared in
    ``docs/results/full/README.md`` (Step 4, "What the confirmation decides about the default").

    Refuted if (1) on the held-out tasks, pooled, its difference to uniform at some budget of
    :data:`CONFIRM_BUDGETS` has a 95% CI wholly below 0, or (2) over all five tasks at r8 it loses to its own
    shuffle control (:func:`shuffled_control`, where it has one) with a CI wholly below 0. Returns a dict
    with ``held_out`` (per budget: the pooled paired difference), ``own_shuffle`` (name and difference, or
    None), ``refuted_by`` (the criteria that refute it, as text), ``complete`` (every cell the rule reads has
    all of its tasks and seeds), ``keeps_default`` (None while incomplete) and ``default`` (the variant, or
    :data:`FALLBACK_DEFAULT` if refuted; None while incomplete).
    """
    cells = _cells(records)
    held_out = {b: _paired(cells, (variant, b), ("uniform", b), HELD_OUT_TASKS) for b in CONFIRM_BUDGETS}
    own = shuffled_control(variant) if variant in VARIANTS else None
    own_shuffle = None
    if own is not None:
        own_shuffle = {
            "control": own[0],
            "vs": _paired(cells, (variant, TOP_BUDGET), (own[0], TOP_BUDGET), TEST_TASKS),
        }
    needed = [((variant, b), HELD_OUT_TASKS) for b in CONFIRM_BUDGETS]
    needed += [(("uniform", b), HELD_OUT_TASKS) for b in CONFIRM_BUDGETS]
    if own is not None:
        needed += [((variant, TOP_BUDGET), TEST_TASKS), ((own[0], TOP_BUDGET), TEST_TASKS)]
    complete = all(
        (task, seed) in cells.get(key, {}) for key, tasks in needed for task in tasks for seed in TEST_SEEDS
    )
    refuted_by = [
        f"held-out {b}: {format_difference(d)}"
        for b, d in held_out.items()
        if d is not None and d["ci"][1] < 0
    ]
    if own_shuffle is not None and own_shuffle["vs"] is not None and own_shuffle["vs"]["ci"][1] < 0:
        refuted_by.append(
            f"below its own shuffle ({own_shuffle['control']}) at r8: {format_difference(own_shuffle['vs'])}"
        )
    keeps = not refuted_by if complete else None
    return {
        "variant": variant,
        "held_out": held_out,
        "own_shuffle": own_shuffle,
        "refuted_by": refuted_by,
        "complete": complete,
        "keeps_default": keeps,
        "default": None if keeps is None else (variant if keeps else FALLBACK_DEFAULT),
    }


def _yes(flag: bool | None) -> str:
    if flag is None:
        return "pending (runs missing)"
    return "**met**" if flag else "not met"


def _markdown(
    confirm: Mapping[str, Any],
    target: Mapping[str, Any],
    default: Mapping[str, Any],
    store: Path,
    out: Path,
    choice: Path,
    seeds: Sequence[int] | None = None,
) -> str:
    variant = target["variant"]
    lines = [
        f"# Issue 13: `{variant}` on the test split",
        "",
        f"`{variant}` was chosen on the dev splits of the selection tasks ([variants.md](variants.md)). Test",
        "accuracy (%), each run read once at the end; differences are paired by (task, seed) with 95% bootstrap",
        "CIs. Both reports read the same test store; the held-out tasks took no part in any choice.",
        "",
        f"## Confirmation on the held-out tasks ({', '.join(HELD_OUT_TASKS)})",
        "",
        f"| budget | task | {variant} | uniform | difference [95% CI] |",
        "|---|---|---:|---:|---|",
    ]
    for budget, row in confirm.items():
        for task, cell in row["per_task"].items():
            lines.append(
                f"| {budget} | {task} | {cell['variant']:.2f} | {cell['uniform']:.2f} | {format_difference(cell['vs_uniform'])} |"
            )
        lines.append(f"| {budget} | **pooled** | | | {format_difference(row['pooled'])} |")
    lines += [
        "",
        f"## The target, over all five tasks ({'complete' if target['complete'] else 'INCOMPLETE: runs missing'})",
        "",
        f"* **Gain** (≥ {GAIN_POINTS:g} point over uniform at the same budget, CI above 0): {_yes(target['gain_met'])}. "
        + "; ".join(f"{b}: {format_difference(g)}" for b, g in target["gain"].items()),
    ]
    front = "; ".join(
        f"{b}: {f['variant']:.2f} vs uniform {f['uniform']:.2f} (uniform r8 {f['uniform_r8']:.2f})"
        if None not in (f["variant"], f["uniform"], f["uniform_r8"])
        else f"{b}: –"
        for b, f in target["front"].items()
    )
    lines.append(
        f"* **Front** (within {MATCH_MARGIN:g} of uniform r8 at a budget where uniform is ≥ {SHORTFALL_POINTS:g} "
        f"short): {_yes(target['front_met'])}. {front}"
    )
    below = ", ".join(
        f"{b['task']} at {b['budget']} ({b['diff']:+.2f}, sd {b['std']:.2f})" for b in target["no_task_below"]
    )
    lines.append(
        f"* **No task below uniform by more than one sd**: {_yes(target['no_task_below_met'])}. {below}"
    )
    lines.append(
        f"* **Beats the random-allocation controls** (r8, CI above 0): {_yes(target['controls_met'])}. "
        + "; ".join(f"{c}: {format_difference(d)}" for c, d in target["controls"].items())
    )
    lines.append(
        f"* **At least level with GoRA, EVA, AdaLoRA** (r8, CI not wholly below 0): {_yes(target['rivals_met'])}. "
        + "; ".join(f"{r}: {format_difference(d)}" for r, d in target["rivals"].items())
    )
    lines += [
        "",
        "**Target pending: runs missing.**"
        if target["met"] is None
        else f"**Target {'met' if target['met'] else 'not met'}.**",
        "",
        *_default_lines(default),
        "",
        f"Made with `{COMMAND} report --store {store} --choice {choice} --out {out}{seeds_arg(seeds)}`.",
        "",
    ]
    return "\n".join(lines)


def _default_lines(default: Mapping[str, Any]) -> list[str]:
    variant = default["variant"]
    lines = [
        "## The library default",
        "",
        f"The rule pre-declared in [README.md](README.md) (Step 4): `{variant}` stays the default unless, on the",
        "held-out tasks, its pooled difference to uniform at some budget has a CI wholly below 0, or, over all",
        "five tasks at r8, it loses to its own shuffle control with a CI wholly below 0; if refuted, the default",
        f"returns to `{FALLBACK_DEFAULT}` (plain FIM-LoRA scores). Nothing else is chosen on the test split.",
        "",
    ]
    lines += [f"* held-out {b}: {format_difference(d)}" for b, d in default["held_out"].items()]
    own = default["own_shuffle"]
    if own is not None:
        lines.append(f"* against {own['control']} at r8, all five tasks: {format_difference(own['vs'])}")
    lines.append("")
    if default["keeps_default"] is None:
        lines.append("**Default: pending (runs missing).**")
    elif default["keeps_default"]:
        lines.append(f"**Default: `{variant}` stays** (not refuted).")
    else:
        lines.append(
            f"**Default: `{variant}` is refuted** ({'; '.join(default['refuted_by'])}); "
            f"it returns to `{default['default']}`."
        )
    return lines


def _report(store: Path, choice: Path, out: Path, seeds: Sequence[int] | None = None) -> None:
    variant = json.loads(choice.read_text()).get("chosen")
    if not variant:
        raise SystemExit(f"{choice} names no chosen variant yet: finish the variant grid first")
    records = of_seeds(ResultStore(store).records(), seeds)
    confirm, target = confirmation_table(records, variant), target_verdict(records, variant)
    default = default_verdict(records, variant)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "confirmation.json", {"confirmation": confirm, "target": target, "default": default}
    )
    atomic_write_text(out / "confirmation.md", _markdown(confirm, target, default, store, out, choice, seeds))
    print(f"wrote {out / 'confirmation.md'}")


def _write_grid(choice: Path, selection: Path, from_grid: Path, out: Path) -> None:
    import yaml

    report = json.loads(choice.read_text())
    finished, expected = report.get("runs_finished"), report.get("expected_runs")
    if finished is None or expected is None or finished < expected:
        raise ValueError(
            f"{choice}: the variant grid is not finished ({finished} of {expected} runs); a choice among "
            "incomplete variants is no choice: finish bench/grids/full/run_variants.sh, rerun `bench.studies.variants report`"
        )
    variant = report.get("chosen")
    if variant == "fim":
        print(
            f"the chosen variant is plain fim, already in the test grid at r2, r4 and r8: {out} not written"
        )
        return
    chosen, settings = json.loads(selection.read_text()), yaml.safe_load(from_grid.read_text())
    command = (
        f"#   {COMMAND} grid --choice {choice} --selection {selection} --from {from_grid} "
        f"--out {out}\n# (do not edit by hand). Run: bench/grids/full/run_test.sh\n"
    )
    grids = make_confirmation_grids(variant, chosen, settings)
    # the main file last: run_all.sh and run_test.sh pick up test_variant*.yaml, and the main file's presence
    # says that the rest are written
    for suffix in sorted(grids, key=lambda k: k == ""):
        path = out.with_name(f"{out.stem}{suffix}{out.suffix}")
        what = {"": "at r8", "_low": "at the smaller budgets", "_shuffled": "its own shuffle control"}[suffix]
        header = f"# Issue 13: the chosen variant {variant!r}, {what}, on the TEST split, written by\n"
        write_grid(path, header + command, grids[suffix])
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("grid", help="the chosen variant's test grid")
    p.add_argument(
        "--choice", required=True, type=Path, help="variants.json from `bench.studies.variants report`"
    )
    p.add_argument("--selection", required=True, type=Path, help="lr_selection.json")
    p.add_argument("--from", dest="from_grid", required=True, type=Path, help="a selection grid (settings)")
    p.add_argument("--out", required=True, type=Path, help="the grid file to write")
    p = sub.add_parser("report", help="held-out confirmation and the target")
    p.add_argument("--store", required=True, type=Path, help="the test store")
    p.add_argument("--choice", required=True, type=Path, help="variants.json")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="only these seeds' records; default: all"
    )
    args = parser.parse_args(argv)
    try:
        if args.what == "grid":
            _write_grid(args.choice, args.selection, args.from_grid, args.out)
        else:
            _report(args.store, args.choice, args.out, args.seeds)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
