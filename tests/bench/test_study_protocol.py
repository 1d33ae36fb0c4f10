"""bench.studies.protocol: the split checks, the cells and the paired difference every study shares, and a
check that no study defines its own copy of them."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.studies import protocol
from bench.studies.protocol import (
    TestSplitInSelection,
    WrongSplit,
    accuracy_cells,
    check_dev_only,
    format_difference,
    of_seeds,
    paired_difference,
    records_on_split,
    seeds_arg,
    split_overrides,
    write_grid,
)

STUDIES = Path(protocol.__file__).parent


def _record(
    run_id: str,
    *,
    split: str | None,
    status: str = "ok",
    method: str = "fim",
    variant: str | None = None,
    task: str = "trec6",
    seed: int = 0,
    budget: str = "r8",
    acc: float = 0.5,
) -> dict[str, Any]:
    overrides: dict[str, Any] = {} if split is None else {"eval_split": split}
    if variant is not None:
        overrides["variant"] = variant
    return {
        "run_id": run_id,
        "status": status,
        "spec": {"method": method, "task": task, "seed": seed, "budget": budget, "overrides": overrides},
        "metrics": {"accuracy": acc},
    }


def test_records_on_split_keeps_finished_records_and_names_a_stray_one() -> None:
    records = [
        _record("a", split="dev"),
        _record("b", split="test", status="failed"),
        _record("c", split="dev"),
    ]
    assert [r["run_id"] for r in records_on_split(records, "dev", reader="r", hint="h")] == ["a", "c"]
    stray = [*records, _record("d", split="test")]
    with pytest.raises(
        WrongSplit, match=r"record d was evaluated on the 'test' split; r reads dev-split .*\(h\)"
    ):
        records_on_split(stray, "dev", reader="r", hint="h")


def test_a_record_without_a_split_counts_as_test() -> None:
    unnamed = [_record("x", split=None)]
    assert len(records_on_split(unnamed, "test", reader="r", hint="h")) == 1
    with pytest.raises(TestSplitInSelection, match="record x"):
        check_dev_only(unnamed)


def test_the_dev_only_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="set overrides.eval_split: dev"):
        check_dev_only([_record("t", split="test")])


def test_cells_are_named_by_variant_and_keyed_by_task_and_seed() -> None:
    records = [
        _record("a", split="dev", method="fim", variant="fim-kind", seed=0, acc=0.5),
        _record("b", split="dev", method="fim", seed=1, acc=0.25),
        _record("c", split="dev", method="fim", variant="fim-kind", seed=0, acc=0.75),  # replaces a
    ]
    cells = accuracy_cells(records)
    assert dict(cells) == {("fim-kind", "r8"): {("trec6", 0): 75.0}, ("fim", "r8"): {("trec6", 1): 25.0}}


def test_paired_difference_pairs_shared_keys_only() -> None:
    a = {("t", 0): 80.0, ("t", 1): 82.0, ("t", 2): 90.0, ("u", 0): 50.0}
    b = {("t", 0): 79.0, ("t", 1): 80.0, ("t", 2): 88.0}
    d = paired_difference(a, b)
    assert d is not None and d["pairs"] == 3
    assert d["diff"] == pytest.approx((1.0 + 2.0 + 2.0) / 3)
    assert d["ci"][0] <= d["diff"] <= d["ci"][1]
    assert paired_difference({("t", 0): 1.0}, {("t", 0): 0.0}) is None  # one pair: no interval


def test_format_difference() -> None:
    d = {"diff": 1.234, "ci": [-0.5, 2.0], "pairs": 6}
    assert format_difference(d) == "+1.23 [-0.50, +2.00] (6 pairs)"
    assert format_difference(d, pairs=False) == "+1.23 [-0.50, +2.00]"
    assert format_difference(None) == "–"


def test_of_seeds_keeps_the_given_seeds_and_refuses_an_absent_one() -> None:
    records = [_record(str(s), split="test", seed=s) for s in (0, 1, 2)]
    assert [r["run_id"] for r in of_seeds(records, [0, 2])] == ["0", "2"]
    assert len(of_seeds(records, None)) == 3
    with pytest.raises(ValueError, match="no records of seed 7; the store holds seeds 0 1 2"):
        of_seeds(records, [0, 7])
    assert seeds_arg(None) == "" and seeds_arg([0, 1]) == " --seeds 0 1"


def test_split_overrides_drop_the_rate_and_aim_at_the_split() -> None:
    grid = {"overrides": {"lr": 1e-3, "eval_split": "dev", "max_steps": 300, "eval_every": 25}}
    assert list(split_overrides(grid, "test").items()) == [
        ("max_steps", 300),
        ("eval_every", 25),
        ("eval_split", "test"),
    ]
    assert grid["overrides"]["lr"] == 1e-3  # the selection grid is left as it was


def test_write_grid_keeps_the_header_and_the_key_order(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path / "g.yaml", "# written by a test\n", {"suite": "encoder", "budgets": ["r8"], "a": 1}
    )
    text = path.read_text()
    assert text.startswith("# written by a test\nsuite: encoder\n")
    assert list(yaml.safe_load(text)) == ["suite", "budgets", "a"]


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_no_study_defines_its_own_copy_of_the_protocol() -> None:
    shared = set(protocol.__all__)
    found = {
        path.name: sorted(_top_level_names(path) & shared)
        for path in sorted(STUDIES.glob("*.py"))
        if path.name != "protocol.py"
    }
    assert not any(found.values()), {k: v for k, v in found.items() if v}
