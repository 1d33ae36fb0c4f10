"""A control for FIM-LoRA: ranks from random scores, under FIM-LoRA's bounds and budget, no calibration.

If FIM-LoRA's scores carry information, FIM-LoRA should beat an allocation that spends the same budget
within the same bounds ``[r_min, r_max]`` but ignores the data. This method feeds i.i.d. random scores to
the same planner FIM-LoRA uses (:func:`fimlora.initialize.plan_rank_map`, hence the exact allocator
:func:`fimlora.allocate.allocate_ranks`): the rank budget is met exactly, a parameter budget with slack
under one rank of the cheapest module that can still grow, exactly as for ``fim`` with the same
budget and bounds (its ``score_power`` applies to the random scores too; it has no calibration
options). Its ``normalize`` does not apply: i.i.d. draws have no bias between module kinds or
layers to remove, and dividing them by their group's mean would only pull the map toward uniform.

The scores are i.i.d. Exp(1). Proportional allocation turns scores into rank shares ``s_m / sum_j s_j``,
and normalised i.i.d. exponentials are exactly a uniform draw from the simplex (Dirichlet(1, ..., 1)):
before the bounds clip and the rounding, every split of the budget among the modules is equally likely,
so the map spreads over the range the bounds allow (ranks about ``r * Exp(1)``, coefficient of variation
1) instead of clustering at the uniform map, as bounded scores such as U(0, 1) would (c.v. 0.58). The
draws come from :class:`random.Random` seeded with ``draw_seed``, in the model's module order, so a seed gives
the same map on every platform and torch version.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from fimlora.config import BudgetUnit
from fimlora.initialize import plan_rank_map
from fimlora.methods.base import LossFn, StaticRanksMethod, register_method
from fimlora.methods.budget import BudgetBoundsOptions, check_int
from fimlora.peft_glue import apply_rank_map, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = ["RandomRanksMethod", "RandomRanksOptions", "random_scores"]


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


@dataclass
class RandomRanksOptions(BudgetBoundsOptions):
    """The random control's budget, bounds and draw. Each field's docstring is its help text."""

    budget_unit: BudgetUnit = "ranks"
    """When no budget is given, match uniform LoRA at the config's r in this unit ("ranks" or "params")."""

    score_power: float = 1.0
    """Ranks proportional to score**score_power, as for ``fim`` (applies to the random scores too)."""

    draw_seed: int = 0
    """Seeds the random scores (``fimlora train`` passes the run's seed, so every run seed draws another map);
    LoRA-A's init after resizing is seeded by ``seed``, as for ``fim``."""

    def __post_init__(self) -> None:
        self.check_budget_bounds()
        check_int("draw_seed", self.draw_seed, minimum=0)
        self.allocation_config(score_power=self.score_power)  # FimConfig's own checks of the same fields


@register_method("random")
class RandomRanksMethod(StaticRanksMethod):
    """Control: random ranks within FIM-LoRA's bounds and budget (Exp(1) scores, no calibration)."""

    name = "random"
    options_class = RandomRanksOptions
    needs_calibration = False
    options: RandomRanksOptions

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """See :meth:`fimlora.methods.base.MethodBase.check_budget`."""
        plan_rank_map(
            dict.fromkeys(shapes, 1.0),
            shapes,
            self.options.allocation_config(score_power=self.options.score_power),
            r=r,
        )

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        """Wrap with LoRA and rebuild every module at its random rank; ``batches`` is not read.

        Raises:
            ValueError: bounds or budget infeasible for this model (as for ``fim``).
        """
        from peft import get_peft_model

        o = self.options
        model = get_peft_model(base_model, lora_config)
        shapes = module_shapes(lora_modules(model))
        scores = random_scores(shapes, o.draw_seed)
        meta = {
            "method": self.name,
            "control": "random",
            "seed": o.draw_seed,
            "score_distribution": "exponential(1)",
        }
        plan = o.allocation_config(score_power=o.score_power)  # normalize="none": see the module docstring
        rank_map = plan_rank_map(scores, shapes, plan, r=int(lora_config.r), metadata=meta)
        apply_rank_map(model, rank_map, adjust_scaling_factors=o.adjust_scaling_factors, seed=o.seed)
        return model, rank_map
