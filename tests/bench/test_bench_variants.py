"""Issue 13's variant selection: grids from the dev-split choices, the table, the choice; dev split only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness import ExperimentGrid, ResultStore
from bench.studies.protocol import SELECTION_TASKS, TestSplitInSelection
from bench.studies.variants import (
    BUDGETS,
    EXPECTED_RUNS,
    SEEDS,
    VARIANTS,
    choose_variant,
    layer_shares,
    main,
    make_variant_grids,
    variant_table,
)

_SELECTION_GRID = {
    "suite": "encoder",
    "models": ["minilm"],
    "tasks": ["trec6", "movie_sentiment"],
    "methods": ["uniform", "fim", "l1ra", "gora"],
    "budgets": ["r8"],
    "seeds": [0],
    "overrides": {"max_train": 2000, "epochs": 4, "lr": 0.001, "eval_split": "dev"},
    "method_overrides": {"l1ra": {"method_options": {"gate_lr": 0.02}}},
}
_CHOSEN = {"uniform": {"lr": 0.001}, "fim": {"lr": 0.003}, "l1ra": {"lr": 0.0003}}


def test_variant_grids_are_dev_only_with_their_base_methods_rate() -> None:
    grids = make_variant_grids(_CHOSEN, _SELECTION_GRID)
    assert set(grids) == set(VARIANTS) | {"uniform-r4"}
    specs = [s for g in grids.values() for s in ExperimentGrid.from_dict(g).expand()]  # valid harness grids
    assert all(s.overrides["eval_split"] == "dev" for s in specs)
    from bench.studies.variants import EXPECTED_RUNS

    assert len(specs) == len({s.run_id for s in specs}) == EXPECTED_RUNS  # the report's "runs finished of N"
    assert {s.task for s in specs} == set(SELECTION_TASKS)
    lrs = {g["overrides"]["variant"]: g["overrides"]["lr"] for g in grids.values()}
    assert lrs["fim-spectrum"] == lrs["fim-kind"] == 0.003 and lrs["l1ra-fimstart"] == 0.0003
    # the selection grid's method options stay, the variant's are added
    assert grids["l1ra-fimstart"]["overrides"]["method_options"] == {"gate_lr": 0.02, "start": "fim"}
    assert grids["uniform-r4"]["budgets"] == ["r4"] and grids["fim"]["budgets"] == list(BUDGETS)
    with pytest.raises(ValueError, match="l1ra"):
        make_variant_grids({k: v for k, v in _CHOSEN.items() if k != "l1ra"}, _SELECTION_GRID)


def _record(variant: str, task: str, seed: int, budget: str, acc: float, split: str = "dev") -> dict:
    method = VARIANTS[variant][0]
    return {
        "run_id": f"{task}-{variant}-{budget}-s{seed}",
        "status": "ok",
        "spec": {
            "method": method,
            "task": task,
            "seed": seed,
            "budget": budget,
            "overrides": {"eval_split": split, "variant": variant},
        },
        "metrics": {"accuracy": acc / 100},
    }


def _records(gain: dict[str, float]) -> list[dict]:
    out = []
    for variant, plus in gain.items():
        for task in SELECTION_TASKS:
            for seed in SEEDS:
                for budget in BUDGETS:
                    out.append(_record(variant, task, seed, budget, 80.0 + plus + 0.1 * seed))
    return out


def test_table_pairs_by_task_and_seed_and_the_choice_skips_references_and_incomplete_variants() -> None:
    records = _records({"uniform": 3.0, "fim": 0.5, "fim-kind": 1.5})
    records += [_record("fim-spectrum", "trec6", 0, "r2", 99.0)]  # incomplete: never chosen
    table = variant_table(records)
    assert table["fim-kind@r2"]["vs_uniform"]["diff"] == pytest.approx(-1.5)
    assert table["fim-kind@r8"]["vs_fim"]["diff"] == pytest.approx(1.0)
    assert table["fim-kind@r2"]["pooled"] == pytest.approx(81.55)
    assert table["fim-spectrum@r2"]["pooled"] is None  # one task of three: no pooled mean to mislead
    assert choose_variant(table) == "fim-kind"  # uniform is higher, but the reference
    assert choose_variant(variant_table(_records({"uniform": 0.0}))) is None


def test_the_report_makes_no_choice_while_runs_are_missing(tmp_path: Path) -> None:
    gains = {name: float(i) for i, name in enumerate(VARIANTS)}  # the last variant leads
    records = _records(gains)
    records += [_record("uniform", task, seed, "r4", 80.0) for task in SELECTION_TASKS for seed in SEEDS]
    assert len(records) == EXPECTED_RUNS
    store = ResultStore(tmp_path / "store")
    for record in records[1:]:  # one run missing (the first variant's)
        store.put(record)
    out = tmp_path / "out"
    main(["report", "--store", str(store.root), "--out", str(out)])
    report = json.loads((out / "variants.json").read_text())
    leader = list(VARIANTS)[-1]
    assert report["chosen"] is None and report["leading"] == leader
    assert f"No choice yet: 1 of {EXPECTED_RUNS} runs missing" in (out / "variants.md").read_text()
    store.put(records[0])
    main(["report", "--store", str(store.root), "--out", str(out)])
    report = json.loads((out / "variants.json").read_text())
    assert report["chosen"] == leader and report["runs_finished"] == EXPECTED_RUNS
    assert f"**{leader}**" in (out / "variants.md").read_text()


def test_variant_selection_never_reads_the_test_split() -> None:
    with pytest.raises(TestSplitInSelection):
        variant_table([*_records({"fim": 0.0}), _record("fim", "trec6", 0, "r2", 80.0, split="test")])


def test_layer_shares_say_where_each_variant_puts_its_rank() -> None:
    def with_map(variant: str, seed: int, budget: str, ranks: dict[str, int]) -> dict:
        record = _record(variant, "trec6", seed, budget, 80.0)
        return {**record, "extra": {"rank_map": ranks}}

    layer = "bert.encoder.layer.{}.attention.self.query"
    even = {layer.format(i): 8 for i in range(3)}
    records = [
        with_map("uniform", 0, "r8", even),
        with_map("fim", 0, "r8", {layer.format(0): 4, layer.format(1): 4, layer.format(2): 16}),
        with_map(
            "fim", 1, "r8", {layer.format(0): 2, layer.format(1): 6, layer.format(2): 16, "classifier": 8}
        ),
        with_map("fim", 0, "r2", {layer.format(0): 1, layer.format(1): 1, layer.format(2): 10}),  # not r8
        _record("fim-kind", "trec6", 0, "r8", 80.0),  # no map recorded: left out
    ]
    shares = layer_shares(records)
    assert set(shares) == {"uniform", "fim"}
    assert shares["uniform"] == pytest.approx({"0": 1 / 3, "1": 1 / 3, "2": 1 / 3})
    # per run, then the mean over runs: (1/6 + 1/16) / 2 for layer 0; "other" (the head) listed last
    assert list(shares["fim"]) == ["0", "1", "2", "other"]
    assert shares["fim"] == pytest.approx(
        {
            "0": (4 / 24 + 2 / 32) / 2,
            "1": (4 / 24 + 6 / 32) / 2,
            "2": (16 / 24 + 16 / 32) / 2,
            "other": 8 / 32 / 2,
        }
    )
    with pytest.raises(TestSplitInSelection):
        layer_shares(
            [
                *records,
                {
                    **with_map("fim", 2, "r8", even),
                    "spec": {**records[0]["spec"], "overrides": {"eval_split": "test"}},
                },
            ]
        )
