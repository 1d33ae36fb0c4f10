"""Issue 13 below r2: the dev reading of the front criterion, from this step's store and the variant store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness import ResultStore
from bench.studies.below_r2 import NEW_ROWS, REFERENCE_ROWS, front_reading, main
from bench.studies.protocol import SELECTION_TASKS, TestSplitInSelection
from bench.studies.variants import SEEDS

_METHOD = {"uniform": "uniform", "fim-kind": "fim", "fim-kind-drop": "fim", "random-drop": "random"}


def _record(row: str, task: str, seed: int, acc: float, split: str = "dev") -> dict:
    variant, budget = row.split("@")
    return {
        "run_id": f"{task}-{variant}-{budget}-s{seed}",
        "status": "ok",
        "spec": {
            "method": _METHOD[variant],
            "task": task,
            "seed": seed,
            "budget": budget,
            "overrides": {"eval_split": split, "variant": variant},
        },
        "metrics": {"accuracy": acc / 100},
    }


def _records(acc: dict[str, float]) -> list[dict]:
    return [
        _record(row, task, seed, value + 0.1 * seed)
        for row, value in acc.items()
        for task in SELECTION_TASKS
        for seed in SEEDS
    ]


BASE = {"uniform@r2": 89.0, "uniform@r4": 89.5, "uniform@r8": 90.0, "fim-kind@r2": 89.6, "fim-kind@r8": 90.1}


def test_the_front_moves_only_when_uniform_falls_short_and_fim_holds() -> None:
    reading = front_reading(
        _records({**BASE, "uniform@r1": 88.5, "fim-kind-drop@r1": 89.7, "random-drop@r1": 88.0})
    )
    assert reading["complete"]
    assert reading["verdict"]["uniform_r1_short_of_r8"] == pytest.approx(1.5)
    assert reading["verdict"]["fim_kind_drop_r1_short_of_r8"] == pytest.approx(0.3)
    assert reading["verdict"]["front_moved_on_dev"] is True
    assert reading["pairs"]["fim-kind-drop@r1 - random-drop@r1"]["diff"] == pytest.approx(1.7)
    held = front_reading(
        _records({**BASE, "uniform@r1": 88.5, "fim-kind-drop@r1": 89.0, "random-drop@r1": 88.0})
    )
    assert held["verdict"]["front_moved_on_dev"] is False  # 1.0 short: more than 0.5
    flat = front_reading(
        _records({**BASE, "uniform@r1": 89.5, "fim-kind-drop@r1": 90.0, "random-drop@r1": 88.0})
    )
    assert flat["verdict"]["front_moved_on_dev"] is False  # uniform only 0.5 short: nothing to move


def test_no_reading_while_a_seed_is_missing_and_never_the_test_split(tmp_path: Path) -> None:
    records = _records({**BASE, "uniform@r1": 88.5, "fim-kind-drop@r1": 89.7, "random-drop@r1": 88.0})
    below, variants = ResultStore(tmp_path / "below"), ResultStore(tmp_path / "variants")
    for record in records[1:]:
        row = f"{record['spec']['overrides']['variant']}@{record['spec']['budget']}"
        (below if row in NEW_ROWS else variants).put(record)
    assert records[0]["spec"]["budget"] in {r.split("@")[1] for r in (*NEW_ROWS, *REFERENCE_ROWS)}
    out = tmp_path / "out"
    main(["--store", str(below.root), "--variants", str(variants.root), "--out", str(out)])
    data = json.loads((out / "below_r2.json").read_text())
    assert data["complete"] is False and data["verdict"] is None
    assert "no reading yet" in (out / "below_r2.md").read_text()
    with pytest.raises(TestSplitInSelection):
        front_reading([*records, _record("uniform@r1", "trec6", 0, 90.0, split="test")])
