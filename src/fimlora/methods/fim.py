"""FIM-LoRA as a method: calibrate on the first training batches, allocate the budget, train as plain LoRA.

The ranks come from the empirical Fisher (or variance) of each module's LoRA-B gradient at init (see
:mod:`fimlora.initialize` and :mod:`fimlora.allocate`); they are fixed before training.

``gradient_init=True`` combines FIM's map with GoRA's initialisation (:mod:`fimlora.methods.gora`): after the
ranks are set, B starts as one gradient-descent step of size ``init_step_size`` on W compressed into A's row
space, from the mean full-weight gradient over the same calibration batches (one more pass over them).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from fimlora.config import FimConfig
from fimlora.initialize import compute_lora_fim_ranks, initialize_lora_fim_ranks, plan_rank_map
from fimlora.methods.base import LossFn, StaticRanksMethod, register_method
from fimlora.methods.budget import check_float
from fimlora.rankmap import RankMap

__all__ = ["FimMethod", "FimOptions"]


@dataclass
class FimOptions(FimConfig):
    """FIM-LoRA's options as a method: every :class:`FimConfig` field (calibration, budget, bounds), and
    GoRA's initialisation as an option. Each field's docstring is its help text."""

    gradient_init: bool = False
    """Start B from the calibration gradient (GoRA's initialisation) instead of 0."""

    init_step_size: float = 0.05
    """GoRA's xi, the size of that initial step (GoRA: 5e-2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.gradient_init, bool):
            raise ValueError(f"`gradient_init` must be true or false, got {self.gradient_init!r}")
        check_float("init_step_size", self.init_step_size, low=0.0)

    def fim_config(self) -> FimConfig:
        """The :class:`FimConfig` part (calibration and allocation), as the library's functions take it."""
        return fim_config_part(self)


def fim_config_part(options: FimConfig) -> FimConfig:
    """A plain :class:`FimConfig` with the FimConfig fields of ``options`` (an options class derived from it)."""
    return FimConfig(**{f.name: getattr(options, f.name) for f in dataclasses.fields(FimConfig)})


@register_method("fim")
class FimMethod(StaticRanksMethod):
    """FIM-LoRA: calibrate on the first batches, allocate the budget, then train as plain LoRA."""

    name = "fim"
    options_class = FimOptions
    options: FimOptions
    apply_ranks = True
    """False: ``prepare`` computes ``rank_map`` but leaves the adapter at the config's rank (and skips
    ``gradient_init``), for a control that applies a map of its own (``fim-shuffled``)."""

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """See :meth:`fimlora.methods.base.MethodBase.check_budget`."""
        plan_rank_map(dict.fromkeys(shapes, 1.0), shapes, self.options.fim_config(), r=r)

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        from peft import get_peft_model

        assert batches is not None  # checked by prepare
        config = self.options.fim_config()
        model = get_peft_model(base_model, lora_config)
        if self.options.gradient_init:  # both passes see the same batches
            batches = list(itertools.islice(iter(batches), config.calibration_batches))
        if not self.apply_ranks:
            return model, compute_lora_fim_ranks(model, batches, config, loss_fn=loss_fn)
        rank_map = initialize_lora_fim_ranks(model, batches, config, loss_fn=loss_fn)
        if self.options.gradient_init:
            from fimlora.methods.gora import gradient_init_lora_b

            step = self.options.init_step_size
            gradient_init_lora_b(model, batches, step, loss_fn=loss_fn)
            rank_map = RankMap(
                dict(rank_map), metadata={**rank_map.metadata, "gradient_init": {"init_step_size": step}}
            )
        return model, rank_map
