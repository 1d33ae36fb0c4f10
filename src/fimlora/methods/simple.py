"""Methods that fix the ranks before training: uniform LoRA (the baseline) and FIM-LoRA."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.initialize import initialize_lora_fim_ranks
from fimlora.methods.base import StaticRanksMethod, register_method
from fimlora.peft_glue import current_ranks
from fimlora.rankmap import RankMap

__all__ = ["FimMethod", "UniformMethod"]


def _wrap(base_model: nn.Module, lora_config: Any) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(base_model, copy.deepcopy(lora_config))


@register_method("uniform")
class UniformMethod(StaticRanksMethod):
    """Plain LoRA: every adapted module at the config's rank."""

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
        model = _wrap(base_model, lora_config)
        self.rank_map = RankMap(current_ranks(model), metadata={"method": "uniform"})
        return model


@register_method("fim")
class FimMethod(StaticRanksMethod):
    """FIM-LoRA: calibrate on the first batches, allocate the budget, then train as plain LoRA."""

    name = "fim"

    def __init__(self, fim_config: FimConfig | None = None, **overrides: Any) -> None:
        self.fim_config = fim_config or FimConfig(**overrides)

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        if calibration_batches is None:
            raise ValueError("the 'fim' method needs calibration batches (the first T training batches)")
        model = _wrap(base_model, lora_config)
        self.rank_map = initialize_lora_fim_ranks(
            model, calibration_batches, self.fim_config, loss_fn=loss_fn
        )
        return model
