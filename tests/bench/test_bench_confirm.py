"""Issue 13's last step: the chosen variant's test grid, the held-out confirmation and the target's criteria."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import ExperimentGrid
from bench.studies.confirm import (
    CONFIRM_BUDGETS,
    confirmation_table,
    default_verdict,
    main,
    make_confirmation_grid,
    make_confirmation_grids,
    make_shuffled_control_grid,
    shuffled_control,
    target_verdict,
)
from bench.studies.protocol import HELD_OUT_TASKS, TEST_SEEDS, TEST_TASKS
from bench.studies.variants import VARIANTS

_SELECTION_GRID = {
    "suite": "encoder",
    "models": ["minilm"],
    "tasks": ["trec6", "movie_sentiment"],
    "methods": ["uniform", "fim", "l1ra"],
    "budgets": ["r8"],
    "seeds": [0],
    "overrides": {"max_train": 2000, "epochs": 4, "lr": 0.001, "eval_split": "dev"},
}
_CHOSEN = {
    "uniform": {"lr": 0.001},
    "fim": {"lr": 0.003},
    "l1ra": {"lr": 0.0003},
    "fim-shuffled": {"lr": 0.002},
}


def test_confirmation_grid_runs_the_variant_on_every_test_task_and_budget() -> None:
    grid = make_confirmation_grid("fim-kind", _CHOSEN, _SELECTION_GRID)
    specs = ExperimentGrid.from_dict(grid).expand()
    assert {s.overrides["eval_split"] for s in specs} == {"test"}
    assert {s.task for s in specs} == set(TEST_TASKS) and {s.seed for s in specs} == set(TEST_SEEDS)
    assert {s.budget for s in specs} == set(CONFIRM_BUDGETS)
    assert {s.overrides["variant"] for s in specs} == {"fim-kind"}
    assert specs[0].overrides["normalize"] == "kind" and specs[0].overrides["lr"] == 0.003
    for not_a_new_variant in (None, "uniform", "fim"):
        with pytest.raises(ValueError):
            make_confirmation_grid(not_a_new_variant, _CHOSEN, _SELECTION_GRID)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["fim-kind", "fim-ginit"])
def test_confirmation_files_split_the_grid_and_compress_the_r8_adapters(variant: str) -> None:
    def cells(grid: dict) -> set[tuple]:
        return {(s.task, s.seed, s.budget) for s in ExperimentGrid.from_dict(grid).expand()}

    grids = make_confirmation_grids(variant, _CHOSEN, _SELECTION_GRID)
    assert set(grids) == ({"", "_low", "_shuffled"} if variant == "fim-kind" else {"", "_low"})
    assert cells(grids[""]) | cells(grids["_low"]) == cells(
        make_confirmation_grid(variant, _CHOSEN, _SELECTION_GRID)
    )
    assert grids[""]["budgets"] == ["r8"] and grids[""]["overrides"]["compress_fractions"] == [0.5, 0.25]
    assert "compress_fractions" not in grids["_low"]["overrides"]  # nothing to compare a compressed r2 with
    for grid in (grids[""], grids["_low"]):
        assert grid["overrides"]["variant"] == variant and grid["overrides"]["eval_split"] == "test"


def _record(method: str, budget: str, task: str, seed: int, acc: float, split: str = "test") -> dict:
    variant = method if method in VARIANTS and VARIANTS[method][0] != method else None
    base = VARIANTS[method][0] if variant else method
    if method.endswith("-shuffled") and method != "fim-shuffled":  # a variant's own control
        variant, base = method, "fim-shuffled"
    overrides = {"eval_split": split, "lr": 0.001, **({"variant": variant} if variant else {})}
    return {
        "run_id": f"{task}-{method}-{budget}-s{seed}",
        "status": "ok",
        "spec": {"method": base, "task": task, "seed": seed, "budget": budget, "overrides": overrides},
        "metrics": {"accuracy": acc / 100},
    }


def _store(levels: dict[tuple[str, str], float], *, task_shift: dict[str, float] | None = None) -> list[dict]:
    records = []
    for (method, budget), acc in levels.items():
        for task in TEST_TASKS:
            for seed in TEST_SEEDS:
                shift = (task_shift or {}).get(task, 0.0) if method == "fim-kind" else 0.0
                jitter = 0.2 * ((seed * 5 + len(task)) % 3 - 1)  # same jitter for every method: paired
                records.append(_record(method, budget, task, seed, acc + shift + jitter))
    return records


_LEVELS = {
    ("uniform", "r2"): 85.0,
    ("uniform", "r4"): 87.0,
    ("uniform", "r8"): 89.0,
    ("fim-kind", "r2"): 86.0,
    ("fim-kind", "r4"): 88.8,
    ("fim-kind", "r8"): 90.5,
    ("random", "r8"): 88.0,
    ("fim-shuffled", "r8"): 88.5,
    ("fim-kind-shuffled", "r8"): 88.7,
    ("gora", "r8"): 90.5,
    ("eva", "r8"): 87.0,
    ("adalora", "r8"): 89.0,
}


def test_target_met_by_a_gain_and_by_moving_the_front() -> None:
    verdict = target_verdict(_store(_LEVELS), "fim-kind")
    assert verdict["complete"] and verdict["met"]
    assert verdict["gain"]["r8"]["diff"] == pytest.approx(1.5) and verdict["gain_met"]
    assert verdict["front"]["r4"]["met"]  # 88.8 is within 0.5 of 89.0, uniform r4 is 2 short
    assert not verdict["front"]["r2"]["met"]
    assert verdict["controls_met"] and verdict["rivals_met"] and not verdict["no_task_below"]


def test_each_criterion_can_fail() -> None:
    # one task far below uniform: the gain may survive pooling, the per-task criterion does not
    low_task = target_verdict(_store(_LEVELS, task_shift={"sms_spam": -6.0}), "fim-kind")
    assert {(b["task"], b["budget"]) for b in low_task["no_task_below"]} >= {("sms_spam", "r8")}
    assert not low_task["met"]
    # a control as good as the variant: its score carried no information
    levels = {**_LEVELS, ("fim-shuffled", "r8"): 90.5}
    assert not target_verdict(_store(levels), "fim-kind")["controls_met"]
    # the variant's own shuffle as good as the variant: its own map carried no information
    levels = {**_LEVELS, ("fim-kind-shuffled", "r8"): 90.5}
    verdict = target_verdict(_store(levels), "fim-kind")
    assert set(verdict["controls"]) == {"random", "fim-shuffled", "fim-kind-shuffled"}
    assert not verdict["controls_met"] and not verdict["met"]
    # a rival clearly better: not level
    levels = {**_LEVELS, ("gora", "r8"): 93.0}
    verdict = target_verdict(_store(levels), "fim-kind")
    assert not verdict["rivals_met"] and not verdict["met"]
    # a small gain and no front move: neither (a) nor (b)
    levels = {**_LEVELS, ("fim-kind", "r8"): 89.5, ("fim-kind", "r4"): 87.5, ("fim-kind", "r2"): 85.5}
    verdict = target_verdict(_store(levels), "fim-kind")
    assert not verdict["gain_met"] and not verdict["front_met"] and not verdict["met"]
    # runs missing: nothing is decided, not even what the numbers so far would meet or fail
    partial = target_verdict([r for r in _store(_LEVELS) if r["spec"]["method"] != "adalora"], "fim-kind")
    assert not partial["complete"] and partial["gain"]["r8"]["diff"] == pytest.approx(1.5)
    flags = ("gain_met", "front_met", "no_task_below_met", "controls_met", "rivals_met", "met")
    assert [partial[f] for f in flags] == [None] * len(flags)
    no_own_control = [
        r for r in _store(_LEVELS) if r["spec"]["overrides"].get("variant") != "fim-kind-shuffled"
    ]
    assert not target_verdict(no_own_control, "fim-kind")["complete"]
    # every task present but a seed missing: still incomplete
    one_seed_short = [r for r in _store(_LEVELS) if (r["spec"]["method"], r["spec"]["seed"]) != ("eva", 4)]
    assert target_verdict(one_seed_short, "fim-kind")["met"] is None


def test_confirmation_reads_only_the_held_out_tasks_and_refuses_dev_records() -> None:
    records = _store(_LEVELS, task_shift={"trec6": 10.0})  # a selection task's gain must not leak in
    table = confirmation_table(records, "fim-kind")
    assert set(table["r8"]["per_task"]) == set(HELD_OUT_TASKS)
    assert table["r8"]["pooled"]["diff"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="dev"):
        confirmation_table([*records, _record("uniform", "r8", "trec6", 9, 50.0, split="dev")], "fim-kind")


def test_default_is_kept_unless_the_pre_declared_rule_refutes_it() -> None:
    kept = default_verdict(_store(_LEVELS), "fim-kind")
    assert kept["complete"] and kept["keeps_default"] and kept["default"] == "fim-kind"
    assert kept["refuted_by"] == [] and kept["own_shuffle"]["control"] == "fim-kind-shuffled"
    # (1) below uniform on the held-out tasks at one budget, CI wholly below 0: back to plain FIM
    low_r2 = default_verdict(_store({**_LEVELS, ("fim-kind", "r2"): 84.0}), "fim-kind")
    assert low_r2["keeps_default"] is False and low_r2["default"] == "fim"
    assert [r.split(":")[0] for r in low_r2["refuted_by"]] == ["held-out r2"]
    # ... read on the held-out tasks only: a loss on a selection task does not refute it
    selection_loss = default_verdict(_store(_LEVELS, task_shift={"trec6": -3.0}), "fim-kind")
    assert selection_loss["keeps_default"] and selection_loss["held_out"]["r8"]["diff"] == pytest.approx(1.5)
    held_out_loss = default_verdict(_store(_LEVELS, task_shift={t: -3.0 for t in HELD_OUT_TASKS}), "fim-kind")
    assert held_out_loss["default"] == "fim" and len(held_out_loss["refuted_by"]) == 3  # every budget
    # (2) its own shuffle control better at r8, CI wholly below 0
    own = default_verdict(_store({**_LEVELS, ("fim-kind-shuffled", "r8"): 91.5}), "fim-kind")
    assert own["default"] == "fim" and own["refuted_by"][0].startswith("below its own shuffle")
    # a variant without a control of its own is judged on (1) alone
    ginit = {(("fim-ginit" if m == "fim-kind" else m), b): v for (m, b), v in _LEVELS.items()}
    verdict = default_verdict(_store(ginit), "fim-ginit")
    assert verdict["own_shuffle"] is None and verdict["keeps_default"]
    # a run missing: nothing decided, whatever the numbers so far say
    missing = [
        r
        for r in _store({**_LEVELS, ("fim-kind", "r2"): 84.0})
        if (r["spec"]["method"], r["spec"]["task"], r["spec"]["seed"]) != ("uniform", "bbc_news", 4)
    ]
    partial = default_verdict(missing, "fim-kind")
    assert not partial["complete"] and partial["keeps_default"] is None and partial["default"] is None


def _write_store_and_choice(tmp_path: Path) -> Path:
    """A test store (``tmp_path/store``) at :data:`_LEVELS`, five seeds, and a choice file naming
    ``fim-kind``; returns the choice file."""
    from bench.harness import ResultStore

    store = ResultStore(tmp_path / "store")
    for record in _store(_LEVELS):
        store.put({**record, "schema_version": 1})
    choice = tmp_path / "variants.json"
    choice.write_text('{"chosen": "fim-kind"}')
    return choice


def test_report_command_writes_both_parts(tmp_path: Path) -> None:
    choice = _write_store_and_choice(tmp_path)
    assert (
        main(["report", "--store", str(tmp_path / "store"), "--choice", str(choice), "--out", str(tmp_path)])
        == 0
    )
    text = (tmp_path / "confirmation.md").read_text()
    assert "held-out" in text and "**Target met.**" in text
    assert "**Default: `fim-kind` stays** (not refuted)." in text
    # one seed only: the numbers are shown, one pair has no CI, and no verdict is printed
    from bench.harness import ResultStore

    one_seed = ResultStore(tmp_path / "one_seed")
    for record in _store(_LEVELS):
        if record["spec"]["seed"] == 0:
            one_seed.put({**record, "schema_version": 1})
    partial_out = tmp_path / "partial"
    assert (
        main(
            [
                "report",
                "--store",
                str(tmp_path / "one_seed"),
                "--choice",
                str(choice),
                "--out",
                str(partial_out),
            ]
        )
        == 0
    )
    text = (partial_out / "confirmation.md").read_text()
    assert "**Target pending: runs missing.**" in text and "pending (runs missing)" in text
    assert "**Default: pending (runs missing).**" in text
    assert "met**" not in text and "nan" not in text
    choice.write_text('{"chosen": null}')
    with pytest.raises(SystemExit):
        main(["report", "--store", str(tmp_path / "store"), "--choice", str(choice), "--out", str(tmp_path)])


def test_grid_command_refuses_a_choice_made_before_the_variant_grid_finished(tmp_path: Path) -> None:
    import json

    import yaml

    selection, from_grid = tmp_path / "lr.json", tmp_path / "sel.yaml"
    selection.write_text(json.dumps(_CHOSEN))
    from_grid.write_text(yaml.safe_dump(_SELECTION_GRID))
    choice, out = tmp_path / "variants.json", tmp_path / "test_variant.yaml"
    args = ["grid", "--choice", str(choice), "--selection", str(selection), "--from", str(from_grid)]
    choice.write_text(json.dumps({"chosen": "fim-kind", "runs_finished": 113, "expected_runs": 114}))
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(out)])
    assert exit_info.value.code == 2 and not out.exists()
    choice.write_text(json.dumps({"chosen": "fim-kind", "runs_finished": 114, "expected_runs": 114}))
    assert main([*args, "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["overrides"]["variant"] == "fim-kind"
    assert sorted(p.name for p in tmp_path.glob("test_variant*.yaml")) == [
        "test_variant.yaml",
        "test_variant_low.yaml",
        "test_variant_shuffled.yaml",
    ]
    control = yaml.safe_load((tmp_path / "test_variant_shuffled.yaml").read_text())
    assert control["methods"] == ["fim-shuffled"] and control["overrides"]["variant"] == "fim-kind-shuffled"


def test_grid_command_adds_nothing_when_plain_fim_is_chosen(tmp_path: Path) -> None:
    import json

    import yaml

    selection, from_grid = tmp_path / "lr.json", tmp_path / "sel.yaml"
    selection.write_text(json.dumps(_CHOSEN))
    from_grid.write_text(yaml.safe_dump(_SELECTION_GRID))
    choice, out = tmp_path / "variants.json", tmp_path / "test_variant.yaml"
    choice.write_text(json.dumps({"chosen": "fim", "runs_finished": 114, "expected_runs": 114}))
    args = ["grid", "--choice", str(choice), "--selection", str(selection), "--from", str(from_grid)]
    assert main([*args, "--out", str(out)]) == 0 and not out.exists()  # fim is in the test grid already


# ---- the variant's own shuffle control ------------------------------------------------------------------


def test_own_shuffle_control_exists_only_for_a_map_of_the_variants_own() -> None:
    for same_map_as_fim_or_none in ("uniform", "fim", "fim-ginit", "l1ra-fimstart"):
        assert shuffled_control(same_map_as_fim_or_none) is None
    assert shuffled_control("fim-kind") == ("fim-kind-shuffled", {"normalize": "kind"})
    assert shuffled_control("fim-rslora") == (
        "fim-rslora-shuffled",
        {"use_rslora": True, "adjust_scaling_factors": False},
    )
    name, extra = shuffled_control("fim-spectrum-raw")  # type: ignore[misc]
    assert name == "fim-spectrum-raw-shuffled"
    assert extra == {"method_options": {"source": "fim-spectrum", "source_options": {"normalize": False}}}
    assert set(VARIANTS) >= {"fim-kind", "fim-rslora", "fim-spectrum-raw"}


@pytest.mark.parametrize(
    "variant", ["fim-kind", "fim-power0.5", "fim-rslora", "fim-spectrum", "fim-spectrum-raw"]
)
def test_own_shuffle_control_grid_builds_runnable_fim_shuffled_runs_at_r8(variant: str) -> None:
    from bench.suites.encoder import run_config_for
    from fimlora.methods.fim import fim_config_part
    from fimlora.recipes import make_method

    grid = make_shuffled_control_grid(variant, _CHOSEN, _SELECTION_GRID)
    assert grid is not None
    specs = ExperimentGrid.from_dict(grid).expand()
    assert {s.method for s in specs} == {"fim-shuffled"} and {s.budget for s in specs} == {"r8"}
    assert {s.task for s in specs} == set(TEST_TASKS) and {s.seed for s in specs} == set(TEST_SEEDS)
    assert {s.overrides["variant"] for s in specs} == {f"{variant}-shuffled"}
    assert {s.overrides["eval_split"] for s in specs} == {"test"} and specs[0].overrides["lr"] == 0.002
    spec = next(s for s in specs if s.task == "trec6")
    run = run_config_for("encoder", spec.task, "minilm", spec.method, spec.budget, spec.seed, spec.overrides)
    method = make_method(run)
    variant_spec = next(
        s
        for s in ExperimentGrid.from_dict(make_confirmation_grid(variant, _CHOSEN, _SELECTION_GRID)).expand()
        if s.task == "trec6" and s.budget == "r8"
    )
    variant_run = run_config_for(
        "encoder", "trec6", "minilm", variant_spec.method, "r8", spec.seed, variant_spec.overrides
    )
    # the control allocates as the variant does: same LoRA settings, same FimConfig / source options
    assert run.lora == variant_run.lora
    if VARIANTS[variant][0] == "fim":
        source = make_method(variant_run).options
        assert method.options.source == "fim"
        assert fim_config_part(method.options) == fim_config_part(source)
    else:
        assert method.options.source == "fim-spectrum"  # the source is built exactly as the variant's method
        assert method.options.source_method().options == make_method(variant_run).options
    assert make_shuffled_control_grid("fim-ginit", _CHOSEN, _SELECTION_GRID) is None


def test_report_on_some_seeds_uses_only_their_records(tmp_path: Path) -> None:
    # the full store meets the target; restricted to seeds 0 and 1 it is a partial store, so the same
    # report prints no verdict and its command line names the seeds
    choice = _write_store_and_choice(tmp_path)
    args = ["report", "--store", str(tmp_path / "store"), "--choice", str(choice), "--out", str(tmp_path)]
    assert main([*args, "--seeds", "0", "1"]) == 0
    text = (tmp_path / "confirmation.md").read_text()
    assert "**Target pending: runs missing.**" in text and "--seeds 0 1`" in text
    assert "(4 pairs)" in text  # two held-out tasks × two seeds
