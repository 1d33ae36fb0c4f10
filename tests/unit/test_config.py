"""Unit tests for fimlora.config.FimConfig (defaults, validation, bounds, serialisation)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from fimlora.config import FimConfig


def test_defaults() -> None:
    cfg = FimConfig()
    assert cfg.calibration_batches == 8
    assert cfg.score == "fisher"
    assert cfg.aggregation == "mean"
    assert cfg.budget_ranks is None
    assert cfg.budget_params is None
    assert cfg.budget_unit == "ranks"
    assert cfg.r_min is None
    assert cfg.r_max is None
    assert cfg.adjust_scaling_factors is True
    assert cfg.freeze_lora_A is True
    assert cfg.seed == 0
    assert cfg.show_progress is True
    assert cfg.extra == {}


def test_extra_is_not_shared_between_instances() -> None:
    a, b = FimConfig(), FimConfig()
    a.extra["task"] = "sst2"
    assert b.extra == {}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"calibration_batches": -2}, "calibration_batches"),
        ({"calibration_batches": True}, "calibration_batches"),
        ({"calibration_batches": 2.0}, "calibration_batches"),
        ({"score": "x"}, "score"),
        ({"aggregation": "x"}, "aggregation"),
        ({"budget_unit": "x"}, "budget_unit"),
        ({"budget_ranks": 0}, "budget_ranks"),
        ({"budget_ranks": -8}, "budget_ranks"),
        ({"budget_ranks": True}, "budget_ranks"),
        ({"budget_ranks": 8.0}, "budget_ranks"),
        ({"budget_params": 0}, "budget_params"),
        ({"budget_params": -100}, "budget_params"),
        ({"budget_params": False}, "budget_params"),
        ({"r_min": -1}, "r_min"),
        ({"r_min": True}, "r_min"),
        ({"r_max": -1}, "r_max"),
        ({"r_max": True}, "r_max"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_invalid_field_is_named(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        FimConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "allowed"), [("score", "fisher"), ("aggregation", "mean"), ("budget_unit", "params")]
)
def test_invalid_choice_lists_the_choices(field: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}` must be one of .*'{allowed}'.*got 'x'"):
        FimConfig(**{field: "x"})


def test_both_budgets_rejected() -> None:
    with pytest.raises(ValueError, match="`budget_ranks` and `budget_params`"):
        FimConfig(budget_ranks=32, budget_params=10_000)


def test_r_min_above_r_max_rejected() -> None:
    with pytest.raises(ValueError, match=r"`r_min` \(9\) must be <= `r_max` \(8\)"):
        FimConfig(r_min=9, r_max=8)


def test_valid_choices_accepted() -> None:
    cfg = FimConfig(
        score="variance", aggregation="sum", budget_unit="params", budget_params=1, r_min=3, r_max=3
    )
    assert (cfg.score, cfg.aggregation, cfg.budget_unit, cfg.budget_params) == (
        "variance",
        "sum",
        "params",
        1,
    )
    assert FimConfig(budget_ranks=1, seed=0, calibration_batches=1).budget_ranks == 1


@pytest.mark.parametrize(
    ("r", "expected"), [(1, (1, 4)), (2, (1, 8)), (3, (1, 12)), (8, (4, 32)), (16, (8, 64))]
)
def test_resolved_bounds_defaults(r: int, expected: tuple[int, int]) -> None:
    assert FimConfig().resolved_bounds(r) == expected


def test_resolved_bounds_explicit_values_win() -> None:
    assert FimConfig(r_min=2).resolved_bounds(8) == (2, 32)
    assert FimConfig(r_max=6).resolved_bounds(8) == (4, 6)
    assert FimConfig(r_min=5, r_max=7).resolved_bounds(100) == (5, 7)


def test_resolved_bounds_explicit_r_min_above_default_r_max() -> None:
    with pytest.raises(ValueError, match=r"`r_min` \(40\) exceeds `r_max` \(32\) for LoRA rank r=8"):
        FimConfig(r_min=40).resolved_bounds(8)
    with pytest.raises(ValueError, match=r"`r_min` \(8\) exceeds `r_max` \(2\)"):
        FimConfig(r_max=2).resolved_bounds(16)


def test_to_dict_is_json_serialisable_and_complete() -> None:
    cfg = FimConfig(budget_ranks=48, score="variance", extra={"task": "sst2", "tags": [1, 2]})
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {f.name for f in dataclasses.fields(FimConfig)}
    assert data["budget_ranks"] == 48
    assert data["extra"] == {"task": "sst2", "tags": [1, 2]}
    assert FimConfig(**data) == cfg
    data["extra"]["task"] = "changed"  # a copy, not a view
    assert cfg.extra["task"] == "sst2"
