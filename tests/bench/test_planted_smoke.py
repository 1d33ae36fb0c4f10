"""The planted suite end to end in seconds: a tiny random BERT, one planted module, uniform vs the oracle.

Also the metric on cases with a known answer: the base model closes none of the teacher gap, the teacher all
of it; and a spec stored by the harness reads back as the same cell (oracle included).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import BertConfig, BertModel

from bench.harness import ResultStore, run_grid
from bench.planted.cell import CellConfig, CellData, block_linears, mean_loss, run_cell
from bench.planted.metrics import gap_closed
from bench.planted.patterns import PlantedRanks, planted_ranks
from bench.planted.report import planted_runs, report_markdown
from bench.planted.suite import cell_config, planted_specs, run_planted_spec
from bench.planted.teacher import collect_inputs, plant_updates


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config, add_pooling_layer=False).eval()


def _data() -> CellData:
    rng = random.Random(0)

    def rows(n: int) -> list[dict[str, list[int]]]:
        return [{"input_ids": [rng.randrange(1, 97) for _ in range(rng.randrange(8, 20))]} for _ in range(n)]

    return CellData(
        load_model=_tiny, pad_id=0, train_rows=rows(1000), dev_rows=rows(64), test_rows=rows(64),
        planting_rows=rows(16), description={"model": "tiny"},
    )  # fmt: skip


# One module planted at rank 4 (sparse, 1 of 12 modules); budget r2: uniform has rank 2 there, the oracle 8.
CELL = dict(pattern="sparse", strength=5.0, budget_rank=2, seed=0, steps=40, lr=1e-2, eval_split="dev",
            planted=PlantedRanks(high=4, sparse_fraction=0.01))  # fmt: skip


def test_oracle_beats_uniform_on_one_planted_module() -> None:
    data = _data()
    uniform = run_cell(CellConfig(method="uniform", **CELL), data)  # type: ignore[arg-type]
    oracle = run_cell(CellConfig(method="oracle", **CELL), data)  # type: ignore[arg-type]
    planted = uniform["extra"]["planted"]
    assert sum(k > 0 for k in planted.values()) == 1
    (where,) = [n for n, k in planted.items() if k]
    assert oracle["extra"]["rank_map"][where] == 8 and uniform["extra"]["rank_map"][where] == 2
    assert oracle["metrics"]["auc"] == 1.0 and uniform["metrics"]["auc"] == 0.5
    for run in (uniform, oracle):  # equal parameter counts, both at the budget
        assert run["trainable_params"] <= run["extra"]["budget_params"]
        assert run["metrics"]["lora_param_ratio"] > 0.95
    assert 0.5 < uniform["metrics"]["gap_closed"] < oracle["metrics"]["gap_closed"] < 1.0


def test_gap_closed_is_zero_for_the_base_and_one_for_the_teacher() -> None:
    data = _data()
    base = _tiny()
    names = sorted(block_linears(base))
    planted = planted_ranks("sparse", names, 0, ranks=PlantedRanks(high=4, sparse_fraction=0.01))
    batches = [
        {"input_ids": torch.randint(1, 97, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    ]
    inputs = collect_inputs(base, names, batches, max_rows=48)
    teacher, relative = plant_updates(base, planted, inputs, strength=5.0, seed=0)
    assert list(relative) == [n for n, k in planted.items() if k]
    base_loss = mean_loss(base, teacher, data.dev_rows, 0)
    assert base_loss > 0
    assert gap_closed(mean_loss(base, teacher, data.dev_rows, 0), base_loss) == 0.0
    assert gap_closed(mean_loss(teacher, teacher, data.dev_rows, 0), base_loss) == 1.0
    # the update has rank 4 exactly: the difference of the weights
    (where,) = [n for n, k in planted.items() if k]
    delta = dict(teacher.named_modules())[where].weight - dict(base.named_modules())[where].weight
    assert int(torch.linalg.matrix_rank(delta.double(), rtol=1e-6)) == 4


def test_specs_round_trip_through_the_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    specs = planted_specs(patterns=["sparse"], budgets=["r2"], seeds=[0], methods=["uniform", "oracle"],
                          settings={"steps": 4, "eval_split": "dev"}, model="tiny")  # fmt: skip
    assert [cell_config(s).method for s in specs] == ["uniform", "oracle"]
    assert len({s.run_id for s in specs}) == 2
    data = _data()
    store = ResultStore(tmp_path)
    summary = run_grid(specs, lambda spec: run_planted_spec(spec, data), store, progress=False)
    assert summary.failed == [] and len(summary.completed) == 2
    runs = planted_runs(store.records(), split="dev")
    assert sorted(r["method"] for r in runs) == ["oracle", "uniform"]
    text = report_markdown(runs)
    assert "| sparse |" in text and "oracle" in text
    with pytest.raises(ValueError, match="strength"):
        cell_config(specs[0].__class__("planted", "sparse", "tiny", "uniform", "r2", 0, {}))
