"""A control for FIM-LoRA: ranks from random scores, under FIM-LoRA's bounds and budget, no calibration.

If FIM-LoRA's scores carry information, FIM-LoRA should beat an allocation that spends the same budget
within the same bounds ``[r_min, r_max]`` but ignores the data. This method feeds i.i.d. random scores to
the same planner FIM-LoRA uses (:func:`fimlora.initialize.plan_rank_map`, hence the exact allocator
:func:`fimlora.allocate.allocate_ranks`): the rank budget is met exactly, a parameter budget with slack
under one rank of the cheapest module that can still grow, exactly as for ``fim`` with the same
:class:`~fimlora.config.FimConfig` (its ``score_power`` applies to the random scores too; its calibration
options are unused). Its ``normalize`` does not apply: i.i.d. draws have no bias between module kinds or
layers to remove, and dividing them by their group's mean would only pull the map toward uniform.

The scores are i.i.d. Exp(1). Proportional allocation turns scores into rank shares ``s_m / sum_j s_j``,
and normalised i.i.d. exponentials are exactly a uniform draw from the simplex (Dirichlet(1, ..., 1)):
before the bounds clip and the rounding, every split of the budget among the modules is equally likely,
so the map spreads over the range the bounds allow (ranks about ``r * Exp(1)``, coefficient of variation
1) instead of clustering at the uniform map, as bounded scores such as U(0, 1) would (c.v. 0.58). The
draws come from :class:`random.Random` seeded with ``seed``, in the model's module order, so a seed gives
the same map on every platform and torch version.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.initialize import plan_rank_map
from fimlora.methods.base import BUDGET_OPTIONS, StaticRanksMethod, register_method
from fimlora.methods.budget import check_int
from fimlora.methods.fim import fim_config_with
from fimlora.peft_glue import apply_rank_map, lora_modules, module_shapes

__all__ = ["RandomRanksMethod", "random_scores"]


def random_scores(names: Iterable[str], seed: int) -> dict[str, float]:
    """I.i.d. Exp(1) scores, one per module in the order given (a pure function of ``names`` and ``seed``).

    Args:
        names: module names, shape (n,).
        seed: seeds a private :class:`random.Random` (the global RNGs are not touched).

    Returns:
        module name -> score > 0.
    """
    rng = random.Random(seed)
    return {n: rng.expovariate(1.0) for n in names}


@register_method("random")
class RandomRanksMethod(StaticRanksMethod):
    """Control: random ranks within FIM-LoRA's bounds and budget (Exp(1) scores, no calibration)."""

    run_options = frozenset(BUDGET_OPTIONS)  # no calibration
    """The run-level budget and calibration options this method honours (see ``RUN_OPTIONS``)."""

    name = "random"

    def __init__(self, fim_config: FimConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        """
        Args:
            fim_config: budget and bounds, as for ``fim`` (``fimlora train`` passes the run's).
            seed: seeds the random scores (``fimlora train`` passes the run's seed); LoRA-A's init after
                resizing is seeded by ``fim_config.seed``, as for ``fim``.
            **overrides: :class:`FimConfig` fields, applied on top of ``fim_config``.
        """
        check_int("seed", seed, minimum=0)
        self.fim_config = fim_config_with(fim_config, overrides)
        self.seed = seed

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        """Wrap with LoRA and rebuild every module at its random rank; ``calibration_batches`` is not read.

        Raises:
            ValueError: bounds or budget infeasible for this model (as for ``fim``).
        """
        from peft import get_peft_model

        cfg = self.fim_config
        model = get_peft_model(base_model, copy.deepcopy(lora_config))
        shapes = module_shapes(lora_modules(model))
        scores = random_scores(shapes, self.seed)
        meta = {
            **cfg.extra,
            "method": self.name,
            "control": "random",
            "seed": self.seed,
            "score_distribution": "exponential(1)",
        }
        plan = dataclasses.replace(cfg, normalize="none")  # see the module docstring
        self.rank_map = plan_rank_map(scores, shapes, plan, r=int(lora_config.r), metadata=meta)
        apply_rank_map(model, self.rank_map, adjust_scaling_factors=cfg.adjust_scaling_factors, seed=cfg.seed)
        return model
