"""The planted suite's pure parts on cases with known answers: metrics, patterns, the oracle map."""

from __future__ import annotations

import math

import pytest

from bench.planted.methods import oracle_ranks
from bench.planted.metrics import gap_closed, gap_recovered, map_agreement, planted_auc
from bench.planted.patterns import PATTERNS, PlantedRanks, module_kind, planted_ranks

BERT = [f"encoder.layer.{i}.{k}" for i in range(6) for k in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]  # fmt: skip


def test_gap_closed_known_values() -> None:
    assert gap_closed(0.0, 2.0) == 1.0
    assert gap_closed(2.0, 2.0) == 0.0
    assert gap_closed(0.5, 2.0) == pytest.approx(0.75)
    assert gap_closed(3.0, 2.0) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="base_loss"):
        gap_closed(0.1, 0.0)


def test_gap_recovered_known_values() -> None:
    assert gap_recovered(0.7, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_recovered(0.55, 0.6, 0.8) == pytest.approx(-0.25)
    assert math.isnan(gap_recovered(0.7, 0.6, 0.6))  # the oracle does not beat uniform: undefined


def test_auc_known_values() -> None:
    assert planted_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert planted_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert planted_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5  # ties count one half
    # pairs (planted, unplanted): (2>1) (2>3 no) (0>1 no) (0>3 no) -> 1 of 4
    assert planted_auc([2, 1, 0, 3], [True, False, True, False]) == 0.25
    assert math.isnan(planted_auc([1, 2], [True, True]))


def test_map_agreement_perfect_and_reversed() -> None:
    planted = {"a": 16, "b": 8, "c": 0, "d": 0}
    same = map_agreement({"a": 9, "b": 5, "c": 1, "d": 1}, planted)
    assert same["spearman"] == pytest.approx(1.0) and same["auc"] == 1.0
    reversed_ = map_agreement({"a": 1, "b": 2, "c": 3, "d": 4}, planted)
    assert reversed_["auc"] == 0.0 and reversed_["spearman"] < -0.9
    control = map_agreement({"a": 1, "b": 2, "c": 3, "d": 4}, dict.fromkeys(planted, 8))
    assert math.isnan(control["spearman"]) and math.isnan(control["auc"])


def test_module_kind_bert_and_llama() -> None:
    assert module_kind("encoder.layer.0.attention.output.dense") == "attention"
    assert module_kind("encoder.layer.0.output.dense") == "mlp"
    assert module_kind("model.layers.3.self_attn.o_proj") == "attention"
    assert module_kind("model.layers.3.mlp.down_proj") == "mlp"


def test_patterns_on_bert_names() -> None:
    sparse = planted_ranks("sparse", BERT, 0)
    assert sorted(set(sparse.values())) == [0, 16] and sum(v > 0 for v in sparse.values()) == 6
    assert planted_ranks("sparse", BERT, 1) != sparse  # each seed a new planting
    graded = planted_ranks("graded", BERT, 0)
    by_layer = [graded[f"encoder.layer.{i}.intermediate.dense"] for i in range(6)]
    assert by_layer == [3, 8, 13, 13, 8, 3]  # a tent over depth peaking at 16 * 5/6
    mlp = planted_ranks("mlp", BERT, 0)
    assert {n for n, k in mlp.items() if k} == {n for n in BERT if module_kind(n) == "mlp"}
    attention = planted_ranks("attention", BERT, 0)
    assert sum(k > 0 for k in attention.values()) == 24
    assert set(planted_ranks("homogeneous", BERT, 0).values()) == {8}
    capped = planted_ranks("sparse", BERT, 0, ranks=PlantedRanks(high=4), max_rank=dict.fromkeys(BERT, 2))
    assert capped == {n: 2 if k else 0 for n, k in sparse.items()}  # min(in, out) caps a planted rank
    with pytest.raises(ValueError, match="unknown pattern"):
        planted_ranks("dense", BERT, 0)
    assert len(PATTERNS) == 5


def test_oracle_scales_planted_ranks_to_the_budget() -> None:
    costs = dict.fromkeys(BERT, 100)
    budget = 4 * 100 * len(BERT)
    homogeneous = oracle_ranks(
        planted_ranks("homogeneous", BERT, 0), costs, budget_params=budget, r_min=1, r_max=16
    )
    assert set(homogeneous.values()) == {4}  # equal planted ranks: the oracle is uniform
    sparse = planted_ranks("sparse", BERT, 0)
    oracle = oracle_ranks(sparse, costs, budget_params=budget, r_min=1, r_max=16)
    assert all(oracle[n] == 16 for n, k in sparse.items() if k)  # the planted modules get all they can hold
    assert sum(oracle[n] * costs[n] for n in BERT) <= budget
    assert min(oracle.values()) >= 1


def test_every_planting_seed_draws_its_own_random_map_and_a_init() -> None:
    from bench.planted.methods import build_method

    common = {"budget_params": 1000, "r_min": 1, "r_max": 8, "calibration_batches": 2}
    for name in ("random", "fim-shuffled"):
        method = build_method(name, seed=3, **common)
        assert (method.options.seed, method.options.draw_seed) == (3, 3), name
    assert build_method("fim", seed=3, **common).options.seed == 3
