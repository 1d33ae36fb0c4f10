"""FIM-LoRA as a method: calibrate on the first training batches, allocate the budget, train as plain LoRA.

The ranks come from the empirical Fisher (or variance) of each module's LoRA-B gradient at init (see
:mod:`fimlora.initialize` and :mod:`fimlora.allocate`); they are fixed before training.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.initialize import initialize_lora_fim_ranks
from fimlora.methods.base import StaticRanksMethod, register_method

__all__ = ["FimMethod", "fim_config_with"]


def fim_config_with(fim_config: FimConfig | None, overrides: dict[str, Any]) -> FimConfig:
    """``fim_config`` with ``overrides`` (FimConfig fields) applied on top; a default config without one.

    The controls (``random``, ``fim-shuffled``) take fim's config plus field overrides through this.
    """
    return dataclasses.replace(fim_config, **overrides) if fim_config is not None else FimConfig(**overrides)


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
        from peft import get_peft_model

        if calibration_batches is None:
            raise ValueError("the 'fim' method needs calibration batches (the first T training batches)")
        model = get_peft_model(base_model, copy.deepcopy(lora_config))
        self.rank_map = initialize_lora_fim_ranks(
            model, calibration_batches, self.fim_config, loss_fn=loss_fn
        )
        return model
