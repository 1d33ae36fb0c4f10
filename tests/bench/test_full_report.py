"""The full-length test report: front points, pooling, matching budgets, controls; test-split records only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.harness import ResultStore, RunSpec, make_record
from bench.harness import record as record_module
from bench.studies.full_report import (
    budget_to_match,
    control_verdicts,
    front_points,
    pooled_front,
    write_full_report,
)

PARAMS = {"r2": 1000, "r4": 2000, "r8": 4000}


@pytest.fixture(autouse=True)
def _fake_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_module, "git_state", lambda repo=None: {"commit": "b" * 40, "dirty": False})


def _record(
    task: str,
    method: str,
    budget: str,
    seed: int,
    acc: float,
    split: str = "test",
    compress: dict | None = None,
    overrides: dict | None = None,
) -> dict[str, Any]:
    spec = RunSpec(
        "encoder",
        task,
        "minilm",
        method,
        budget,
        seed,
        {"eval_split": split, "lr": 1e-3, **(overrides or {})},
    )
    return make_record(
        spec,
        {"accuracy": acc / 100},
        trainable_params=PARAMS[budget] + 50,  # + the classifier head: not LoRA
        calibration_seconds=0.0,
        train_seconds=1.0,
        peak_memory_bytes=None,
        device="cpu",
        extra={"lora_params": PARAMS[budget], **({"compress": compress} if compress else {})},
    )


def _grid() -> list[dict[str, Any]]:
    # task a: fim beats both controls; task b: fim-shuffled equals fim (no information in the score).
    # uniform: 80 / 85 / 90 at r2 / r4 / r8; fim reaches 89.6 at r4 on task a (within 0.5 of 90).
    accs = {
        ("uniform", "r2"): 80.0,
        ("uniform", "r4"): 85.0,
        ("uniform", "r8"): 90.0,
        ("fim", "r2"): 84.0,
        ("fim", "r4"): 89.6,
        ("fim", "r8"): 91.0,
        ("random", "r8"): 88.0,
        ("fim-shuffled", "r8"): 88.5,
    }
    records = []
    for task in ("a", "b"):
        for (method, budget), acc in accs.items():
            if task == "b" and method == "fim-shuffled":
                acc = 91.0
            for seed in range(5):
                jitter = 0.1 * ((seed * 7 + len(method)) % 3 - 1)
                records.append(_record(task, method, budget, seed, acc + jitter))
    return records


def test_front_points_use_lora_params_and_percent_and_pool_over_tasks() -> None:
    points = front_points(_grid())
    assert {p.lora_params for p in points} == {1000.0, 2000.0, 4000.0}  # the head is not counted
    uni8 = next(p for p in points if (p.task, p.method, p.budget) == ("a", "uniform", "r8"))
    assert uni8.mean == pytest.approx(90.0, abs=0.11) and uni8.seeds == (0, 1, 2, 3, 4)
    pooled = {(p.method, p.budget): p for p in pooled_front(points)}
    assert pooled[("fim-shuffled", "r8")].mean == pytest.approx((88.5 + 91.0) / 2, abs=0.11)
    # the pooled spread is over seeds (the jitter, < 0.2), not between the tasks' levels (88.5 vs 91.0)
    shuffled = pooled[("fim-shuffled", "r8")]
    assert shuffled.std < 0.2 and len(shuffled.values) == 5
    assert shuffled.values[0] == pytest.approx(
        sum(p.values[0] for p in points if (p.method, p.budget) == ("fim-shuffled", "r8")) / 2
    )
    # a (method, budget) missing on one task is not pooled
    partial = [p for p in points if not (p.task == "b" and p.method == "random")]
    assert ("random", "r8") not in {(p.method, p.budget) for p in pooled_front(partial)}


def test_budget_to_match_is_the_smallest_budget_within_the_margin() -> None:
    points = front_points(_grid())
    match = budget_to_match(points, margin=0.5)
    assert match["a"] == {"uniform": "r8", "fim": "r4"}
    assert budget_to_match(points, margin=0.3)["a"]["fim"] == "r8"  # 89.6 is 0.4 below


def test_controls_say_where_fims_score_carried_information() -> None:
    verdicts = control_verdicts(_grid())
    assert verdicts["per_task"]["a"]["random"]["verdict"] == "win"
    assert verdicts["per_task"]["a"]["fim-shuffled"]["verdict"] == "win"
    assert verdicts["per_task"]["b"]["fim-shuffled"]["verdict"] != "win"
    assert verdicts["informative"] == {"a": True, "b": False}
    assert verdicts["pooled"]["random"]["diff"] == pytest.approx(3.0, abs=0.2)


def test_report_refuses_dev_split_records(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dev"):
        front_points([*_grid(), _record("a", "uniform", "r8", 9, 50.0, split="dev")])


def test_full_report_writes_tables_and_front(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store")
    for record in _grid():
        store.put(record)
    written = write_full_report(tmp_path / "store", tmp_path / "out")
    text = (tmp_path / "out" / "test.md").read_text()
    assert "| a | +" in text and "| b |" in text and "informative" in text
    assert (tmp_path / "out" / "test" / "results.md").is_file()
    assert (tmp_path / "out" / "test.json") in written
    if (tmp_path / "out" / "front.png").exists():
        assert (tmp_path / "out" / "front.png").stat().st_size > 10_000


def test_compression_is_paired_with_training_at_the_equal_budget() -> None:
    from bench.studies.full_report import compression_comparison

    records = [
        r for r in _grid() if not (r["spec"]["budget"] == "r8" and r["spec"]["method"] in ("uniform", "fim"))
    ]
    for task in ("a", "b"):
        for seed in range(5):
            for method, acc in (("uniform", 90.0), ("fim", 91.0)):
                compress = {
                    "0.5": {"accuracy": (acc - 1.0) / 100, "lora_params": 1990, "kept_energy_fraction": 0.8},
                    "0.25": {"accuracy": (acc - 3.0) / 100, "lora_params": 995, "kept_energy_fraction": 0.5},
                }
                records.append(_record(task, method, "r8", seed, acc, compress=compress))
    rows = {(r["task"], r["method"], r["fraction"]): r for r in compression_comparison(records)}
    half = rows[("a", "uniform", "0.5")]
    assert half["trained_budget"] == "r4" and half["pairs"] == 5
    assert half["compressed"] == pytest.approx(89.0) and half["diff"] == pytest.approx(89.0 - 85.0, abs=0.11)
    assert rows[("pooled", "fim", "0.25")]["diff"] == pytest.approx(88.0 - 84.0, abs=0.11)
    assert rows[("pooled", "fim", "0.25")]["pairs"] == 10 and rows[("a", "fim", "0.25")]["kept_energy"] == 0.5


def test_methods_at_their_own_learning_rates_and_a_variant_are_named_by_method() -> None:
    """The protocol gives each method its own learning rate (and uniform/fim r8 a compression hook): the report
    still names runs by method, and a variant (a method with settings) by the variant's name."""
    lr = {"uniform": 1e-3, "fim": 3e-3, "random": 1e-3, "fim-shuffled": 3e-4}
    records = []
    for r in _grid():
        spec = r["spec"]
        extra_overrides = {"lr": lr[spec["method"]]}
        if spec["budget"] == "r8" and spec["method"] in ("uniform", "fim"):
            extra_overrides["compress_fractions"] = [0.5, 0.25]
        records.append(
            _record(spec["task"], spec["method"], spec["budget"], spec["seed"], 100 * r["metrics"]["accuracy"],
                    overrides=extra_overrides)
        )  # fmt: skip
    for task in ("a", "b"):
        for seed in range(5):
            records.append(
                _record(task, "fim", "r8", seed, 92.0, overrides={"lr": 3e-3, "variant": "fim-kind", "normalize": "kind"})
            )  # fmt: skip
    verdicts = control_verdicts(records)
    assert verdicts["informative"] == {"a": True, "b": False}  # as with one shared learning rate
    points = {(p.task, p.method, p.budget): p for p in front_points(records)}
    assert points[("a", "fim", "r8")].mean == pytest.approx(
        91.0, abs=0.11
    )  # the variant is not pooled into fim
    assert points[("a", "fim-kind", "r8")].mean == pytest.approx(92.0)


def test_majority_rate_is_the_training_majority_class_on_test(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import fimlora.data
    from bench.suites.data import majority_rates

    fake = types.SimpleNamespace(
        train=[{"label": 0}, {"label": 0}, {"label": 1}], test=[{"label": 1}, {"label": 1}, {"label": 0}]
    )

    def load(name: str) -> types.SimpleNamespace:
        if name != "toy":
            raise ValueError(f"unknown dataset {name}")
        return fake

    monkeypatch.setattr(fimlora.data, "load_builtin_dataset", load)
    rates = majority_rates(["toy", "missing"])
    assert rates["toy"] == pytest.approx(100 / 3)  # class 0 leads in train, is a third of test
    assert rates["missing"] is None


def test_a_variant_run_at_several_budgets_joins_the_front() -> None:
    from bench.studies.full_report import front_methods

    records = _grid() + [
        _record(task, "fim", budget, seed, 90.0, overrides={"variant": "fim-kind", "normalize": "kind"})
        for task in ("a", "b")
        for budget in ("r2", "r4", "r8")
        for seed in range(5)
    ]
    points = front_points(records)
    assert front_methods(points) == ["uniform", "fim", "fim-kind"]  # random (r8 only) is a point, not a line
    assert budget_to_match(points, margin=0.5)["a"]["fim-kind"] == "r2"


def test_budget_ratios_show_a_method_that_misses_uniforms_parameter_count(tmp_path: Path) -> None:
    from bench.studies.full_report import budget_ratios

    records = _grid()
    assert set(budget_ratios(front_points(records)).values()) == {(1.0, 1.0)}
    for record in records:
        if record["spec"]["method"] == "random" and record["spec"]["task"] == "b":
            record["extra"]["lora_params"] = 3900  # 2.5% under uniform r8's 4000
    assert budget_ratios(front_points(records))[("random", "r8")] == (pytest.approx(0.975), 1.0)
    store = ResultStore(tmp_path / "store")
    for record in records:
        store.put(record)
    write_full_report(tmp_path / "store", tmp_path / "out")
    rows = [line for line in (tmp_path / "out" / "test.md").read_text().splitlines() if line.startswith("| ")]
    assert any(line.startswith("| random | r8 |") and "0.975–1.000 ✗" in line for line in rows)
    assert any(line.startswith("| fim | r8 |") and "1.000–1.000 |" in line for line in rows)


def test_a_partial_store_reports_numbers_but_no_verdicts(tmp_path: Path) -> None:
    # the first records of a seed-major grid: one seed, fim only at r8
    records = [
        r
        for r in _grid()
        if r["spec"]["seed"] == 0
        and (r["spec"]["method"], r["spec"]["budget"]) != ("fim", "r2")
        and (r["spec"]["method"], r["spec"]["budget"]) != ("fim", "r4")
    ]
    verdicts = control_verdicts(records)
    assert verdicts["per_task"]["a"]["random"]["verdict"] == "n/a"
    assert verdicts["informative"] == {"a": None, "b": None}  # undecided, not "no"
    match = budget_to_match(front_points(records), margin=0.5)
    assert match["a"] == {"uniform": "r8", "fim": "r8"}  # reached at r8 with what there is
    below = [r for r in records if not (r["spec"]["method"] == "fim" and r["spec"]["task"] == "b")]
    below.append(_record("b", "fim", "r8", 0, 70.0))
    assert budget_to_match(front_points(below), margin=0.5)["b"]["fim"] == "incomplete"  # r2, r4 not run
    store = ResultStore(tmp_path / "store")
    for record in records:
        store.put(record)
    write_full_report(tmp_path / "store", tmp_path / "out")
    text = (tmp_path / "out" / "test.md").read_text()
    assert "nan" not in text and "[no CI]" in text and "n/a (too few seeds)" in text


def test_progress_counts_the_grids_runs_seed_by_seed(tmp_path: Path) -> None:
    import json

    from bench.studies.full_report import grid_progress

    grid = tmp_path / "grid.json"
    grid.write_text(
        json.dumps(
            {
                "suite": "encoder",
                "models": ["minilm"],
                "tasks": ["a", "b"],
                "methods": ["uniform", "fim"],
                "budgets": ["r8"],
                "seeds": [0, 1],
                "overrides": {"eval_split": "test", "lr": 1e-3},
            }
        )
    )
    records = [
        r
        for r in _grid()
        if r["spec"]["budget"] == "r8" and r["spec"]["method"] in ("uniform", "fim") and r["spec"]["seed"] < 2
    ]
    records = [r for r in records if (r["spec"]["seed"], r["spec"]["task"]) != (1, "b")]  # seed 1 half done
    progress = grid_progress(records, [grid])
    assert progress["expected"] == 8 and progress["present"] == 6
    assert progress["per_seed"] == {0: [4, 4], 1: [2, 4]}
    store = ResultStore(tmp_path / "store")
    for record in records:
        store.put(record)
    write_full_report(tmp_path / "store", tmp_path / "out", grids=[grid])
    text = (tmp_path / "out" / "test.md").read_text()
    assert "**Interim**: 6 of 8 runs of the test grids (seed 0: 4 of 4; seed 1: 2 of 4)" in text
    assert f"--grid {grid}`" in text


def test_every_method_on_the_front_figure_looks_different() -> None:
    pytest.importorskip("matplotlib")
    from bench.studies.full_report import method_styles

    methods = [f"m{i}" for i in range(20)]
    styles = method_styles(methods)
    assert len(set(styles.values())) == 20
    assert len({colour for colour, _, _ in styles.values()}) == 20
    # the eleventh method (where matplotlib's default cycle wraps) is dashed and lighter than the first
    assert styles["m10"][2] == "--" and styles["m0"][2] == "-"
    assert styles["m10"][0] != styles["m0"][0]


def test_seeds_option_keeps_a_started_seed_out_of_an_interim_report(tmp_path: Path) -> None:
    # seeds 0 and 1 complete, seed 2 begun on one task: its one record makes uniform r8's seeds differ
    # between the tasks, so uniform r8 is not pooled, unless the report is restricted to seeds 0 and 1
    import json

    from bench.studies.full_report import main

    store = ResultStore(tmp_path / "store")
    for record in _grid():
        if int(record["spec"]["seed"]) < 2:
            store.put(record)
    store.put(_record("a", "uniform", "r8", 2, 90.0))

    def pooled_uniform_r8(argv: list[str]) -> bool:
        assert main(["--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), *argv]) == 0
        data = json.loads((tmp_path / "out" / "test.json").read_text())
        return any(
            (p["task"], p["method"], p["budget"]) == ("pooled", "uniform", "r8") for p in data["points"]
        )

    assert not pooled_uniform_r8([])
    assert pooled_uniform_r8(["--seeds", "0", "1"])
    assert "--seeds 0 1`" in (tmp_path / "out" / "test.md").read_text()  # the command line says so


def test_seeds_without_records_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a seed with no record (a typo, or one not begun) is a one-line error naming it and the seeds held,
    # for the test report and the confirmation report alike; nothing is written
    from bench.studies.confirm import main as confirm_main
    from bench.studies.full_report import main

    store = ResultStore(tmp_path / "store")
    for record in _grid():
        if int(record["spec"]["seed"]) < 2:
            store.put(record)
    choice = tmp_path / "variants.json"
    choice.write_text('{"chosen": "fim-kind"}')
    for run in (
        lambda: main(
            ["--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--seeds", "0", "7"]
        ),
        lambda: confirm_main(
            [
                "report",
                "--store",
                str(tmp_path / "store"),
                "--choice",
                str(choice),
                "--out",
                str(tmp_path / "out"),
                "--seeds",
                "7",
            ]
        ),
    ):
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: --seeds: no records of seed 7; the store holds seeds 0 1", err
    assert not (tmp_path / "out").exists()
