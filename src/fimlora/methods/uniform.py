"""Uniform LoRA, the baseline: every adapted module at the config's rank, fixed before training."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fimlora.config import BudgetUnit
from fimlora.methods.base import LossFn, StaticRanksMethod, register_method
from fimlora.methods.budget import check_budget
from fimlora.peft_glue import current_ranks
from fimlora.rankmap import RankMap

__all__ = ["UniformMethod", "UniformOptions"]


@dataclass
class UniformOptions:
    """Uniform LoRA's one option. An explicit budget or bounds are not options: uniform LoRA *is* the default
    budget (r per module); set r instead."""

    budget_unit: BudgetUnit = "ranks"
    """The unit the run's budget is counted in; uniform LoRA meets it in both, at r per module."""

    def __post_init__(self) -> None:
        check_budget(self.budget_unit, None, None)


@register_method("uniform")
class UniformMethod(StaticRanksMethod):
    """Plain LoRA: every adapted module at the config's rank."""

    name = "uniform"
    options_class = UniformOptions
    needs_calibration = False

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        from peft import get_peft_model

        model = get_peft_model(base_model, lora_config)
        return model, RankMap(current_ranks(model), metadata={"method": "uniform"})
