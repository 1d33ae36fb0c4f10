"""Methods that fix the ranks before training: uniform LoRA (the baseline) and FIM-LoRA."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.initialize import initialize_lora_fim_ranks
from fimlora.methods.base import register_method, trainable_param_groups
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = ["FimMethod", "UniformMethod"]


class _StaticRanks:
    """Shared behaviour of methods whose ranks don't change during training."""

    name = "static"
    rank_map: RankMap | None = None

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        return trainable_param_groups(model, lr=lr, weight_decay=weight_decay)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def on_step_end(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        return None

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        ranks = current_ranks(model)
        meta: dict[str, Any] = (
            dict(self.rank_map.metadata) if self.rank_map is not None else {"method": self.name}
        )
        shapes = module_shapes(lora_modules(model))
        meta["shapes"] = {n: list(s) for n, s in shapes.items()}
        return model, RankMap(ranks, metadata=meta)

    def state_dict(self) -> dict[str, Any]:
        return {"rank_map": self.rank_map.to_dict() if self.rank_map is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state.get("rank_map")
        self.rank_map = RankMap.from_dict(data) if data else None


def _wrap(base_model: nn.Module, lora_config: Any) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(base_model, copy.deepcopy(lora_config))


@register_method("uniform")
class UniformMethod(_StaticRanks):
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
class FimMethod(_StaticRanks):
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
