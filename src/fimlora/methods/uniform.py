"""Uniform LoRA, the baseline: every adapted module at the config's rank, fixed before training."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fimlora.config import BudgetUnit
from fimlora.methods.base import StaticRanksMethod, register_method
from fimlora.methods.budget import check_budget
from fimlora.peft_glue import current_ranks
from fimlora.rankmap import RankMap

__all__ = ["UniformMethod"]


@register_method("uniform")
class UniformMethod(StaticRanksMethod):
    """Plain LoRA: every adapted module at the config's rank."""

    run_options = frozenset({"budget_unit"})
    """The run-level budget and calibration options this method honours (see ``RUN_OPTIONS``): only the unit,
    which uniform LoRA meets in both (it *is* the default budget, r per module); an explicit budget or bounds
    are refused: set r instead."""

    def __init__(self, budget_unit: BudgetUnit = "ranks") -> None:
        check_budget(budget_unit, None, None)
        self.budget_unit = budget_unit

    name = "uniform"

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        from peft import get_peft_model

        model = get_peft_model(base_model, copy.deepcopy(lora_config))
        self.rank_map = RankMap(current_ranks(model), metadata={"method": "uniform"})
        return model
