"""FIM-LoRA as a method: calibrate on the first training batches, allocate the budget, train as plain LoRA.

The ranks come from the empirical Fisher (or variance) of each module's LoRA-B gradient at init (see
:mod:`fimlora.initialize` and :mod:`fimlora.allocate`); they are fixed before training.

``gradient_init=True`` combines FIM's map with GoRA's initialisation (:mod:`fimlora.methods.gora`): after the
ranks are set, B starts as one gradient-descent step of size ``init_step_size`` on W compressed into A's row
space, from the mean full-weight gradient over the same calibration batches (one more pass over them).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.initialize import compute_lora_fim_ranks, initialize_lora_fim_ranks
from fimlora.methods.base import RUN_OPTIONS, StaticRanksMethod, register_method
from fimlora.rankmap import RankMap

__all__ = ["FimMethod", "fim_config_with"]


def fim_config_with(fim_config: FimConfig | None, overrides: dict[str, Any]) -> FimConfig:
    """``fim_config`` with ``overrides`` (FimConfig fields) applied on top; a default config without one.

    The controls (``random``, ``fim-shuffled``) take fim's config plus field overrides through this.
    """
    return dataclasses.replace(fim_config, **overrides) if fim_config is not None else FimConfig(**overrides)


@register_method("fim")
class FimMethod(StaticRanksMethod):
    """FIM-LoRA: calibrate on the first batches, allocate the budget, then train as plain LoRA."""

    run_options = frozenset(RUN_OPTIONS)
    """The run-level budget and calibration options this method honours (see ``RUN_OPTIONS``)."""

    name = "fim"

    def __init__(
        self,
        fim_config: FimConfig | None = None,
        *,
        gradient_init: bool = False,
        init_step_size: float = 0.05,
        **overrides: Any,
    ) -> None:
        """Args:
        fim_config: calibration, budget and bounds (default: ``FimConfig(**overrides)``).
        gradient_init: start B from the calibration gradient (GoRA's init) instead of 0.
        init_step_size: GoRA's xi, the size of that initial step (GoRA: 5e-2).
        """
        if not isinstance(gradient_init, bool):
            raise ValueError(f"`gradient_init` must be true or false, got {gradient_init!r}")
        if (
            isinstance(init_step_size, bool)
            or not isinstance(init_step_size, int | float)
            or init_step_size < 0
        ):
            raise ValueError(f"`init_step_size` must be a number >= 0, got {init_step_size!r}")
        self.fim_config = fim_config or FimConfig(**overrides)
        self.gradient_init = gradient_init
        self.init_step_size = float(init_step_size)
        self.apply_ranks = True
        """False: ``prepare`` computes ``rank_map`` but leaves the adapter at the config's rank (and skips
        ``gradient_init``), for a control that applies a map of its own (``fim-shuffled``)."""

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
        if self.gradient_init:  # both passes see the same batches
            calibration_batches = list(
                itertools.islice(iter(calibration_batches), self.fim_config.calibration_batches)
            )
        if not self.apply_ranks:
            self.rank_map = compute_lora_fim_ranks(
                model, calibration_batches, self.fim_config, loss_fn=loss_fn
            )
            return model
        self.rank_map = initialize_lora_fim_ranks(
            model, calibration_batches, self.fim_config, loss_fn=loss_fn
        )
        if self.gradient_init:
            from fimlora.methods.gora import gradient_init_lora_b

            gradient_init_lora_b(model, calibration_batches, self.init_step_size, loss_fn=loss_fn)
            meta = {**self.rank_map.metadata, "gradient_init": {"init_step_size": self.init_step_size}}
            self.rank_map = RankMap(dict(self.rank_map), metadata=meta)
        return model
