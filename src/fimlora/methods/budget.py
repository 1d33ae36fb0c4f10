"""Budget pieces shared by the training-time methods: the budget itself, its defaults, option checks.

A budget is held in ranks (sum_m r_m == R, exactly) or in LoRA parameters (sum_m r_m (in_m + out_m) <= P,
with as little slack as possible); :class:`RankBudget` holds either and re-allocates inside it with the
exact allocator of :mod:`fimlora.allocate`. Pure: plain mappings in, plain dicts out (no PEFT, no torch).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fimlora.allocate import allocate_ranks
from fimlora.config import BudgetUnit, FimConfig, resolve_rank_bounds

__all__ = [
    "BudgetBoundsOptions",
    "RankBudget",
    "budget_metadata",
    "check_budget",
    "check_float",
    "check_int",
    "initial_ranks",
]


@dataclass(frozen=True)
class RankBudget:
    """A budget in ranks (sum r_m == total) or parameters (sum r_m (in_m + out_m) <= total, least slack).

    Attributes:
        unit: "ranks" or "params".
        total: the budget.
        costs: module -> budget units per rank (1 for ranks, in + out for parameters).
    """

    unit: BudgetUnit
    total: int
    costs: dict[str, int]

    @classmethod
    def resolve(
        cls,
        shapes: Mapping[str, tuple[int, int]],
        r: int,
        unit: BudgetUnit,
        budget_ranks: int | None,
        budget_params: int | None,
    ) -> RankBudget:
        """The configured budget, defaulting to uniform LoRA at rank ``r`` in ``unit``."""
        costs = {n: 1 if unit == "ranks" else int(i + o) for n, (i, o) in shapes.items()}
        explicit = budget_ranks if unit == "ranks" else budget_params
        total = explicit if explicit is not None else r * sum(costs.values())
        return cls(unit, int(total), costs)

    def used(self, ranks: Mapping[str, int]) -> int:
        """Budget units used by ``ranks``."""
        return sum(int(ranks[n]) * c for n, c in self.costs.items())

    def holds(self, ranks: Mapping[str, int]) -> bool:
        """The invariant: exact for ranks, at most the total for parameters."""
        used = self.used(ranks)
        return used == self.total if self.unit == "ranks" else used <= self.total

    def allocate(
        self, scores: Mapping[str, float], lo: Mapping[str, int], hi: Mapping[str, int]
    ) -> dict[str, int]:
        """Ranks proportional to ``scores`` within ``[lo, hi]`` that meet the budget (see ``allocate_ranks``).

        Raises:
            ValueError: the budget is outside the feasible range of the bounds (the message gives it).
        """
        with warnings.catch_warnings():
            # All-zero scores fall back to uniform: a defined answer, not worth a warning mid-training.
            warnings.simplefilter("ignore", UserWarning)
            rank_map = allocate_ranks(
                {n: float(scores[n]) for n in self.costs},
                budget_ranks=self.total if self.unit == "ranks" else None,
                budget_params=self.total if self.unit == "params" else None,
                costs=self.costs,
                r_min={n: int(lo[n]) for n in self.costs},
                r_max={n: int(hi[n]) for n in self.costs},
            )
        return dict(rank_map)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "total": self.total, "costs": dict(self.costs)}


def initial_ranks(
    budget: RankBudget, r_min: int, r_max: Mapping[str, int], r: int, method: str
) -> dict[str, int]:
    """Uniform rank ``r`` when it meets the budget exactly, else the budget split evenly (exact).

    Raises:
        ValueError: the budget can't be met within ``[r_min, r_max]`` (the message names ``method``).
    """
    uniform = dict.fromkeys(budget.costs, r)
    if budget.used(uniform) == budget.total and all(r_max[n] >= r >= r_min for n in uniform):
        return uniform
    try:
        return budget.allocate(dict.fromkeys(budget.costs, 1.0), dict.fromkeys(budget.costs, r_min), r_max)
    except ValueError as err:
        raise ValueError(f"{method}: the {budget.unit} budget {budget.total} is infeasible: {err}") from err


def budget_metadata(
    method: str, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], r: int
) -> dict[str, Any]:
    """Rank-map metadata comparing ``ranks`` with uniform LoRA at ``r`` in both units (rank sum and
    parameter count), so a comparison can say which budget matched."""
    uniform_params = r * sum(i + o for i, o in shapes.values())
    total_params = sum(k * (shapes[n][0] + shapes[n][1]) for n, k in ranks.items())
    return {
        "method": method,
        "lora_r": r,
        "total_rank": sum(ranks.values()),
        "uniform_rank": r * len(ranks),
        "total_params": total_params,
        "uniform_params": uniform_params,
        "params_vs_uniform": total_params / uniform_params,
        "shapes": {n: list(s) for n, s in shapes.items()},
    }


# ---- budget and bounds as options -----------------------------------------------------------------------


@dataclass
class BudgetBoundsOptions:
    """Budget, rank bounds, scale and seed: the option fields that the calibration-time methods with their own
    options (``gora``, ``fim-spectrum``) share. Each field's docstring is its help text."""

    budget_unit: BudgetUnit = "params"
    """When no budget is given, match uniform LoRA at the config's r in this unit ("params" or "ranks")."""

    budget_ranks: int | None = None
    """Total rank over all adapted modules. Mutually exclusive with budget_params."""

    budget_params: int | None = None
    """Total LoRA parameters, sum of r_i * (in_i + out_i). Mutually exclusive with budget_ranks."""

    r_min: int | None = None
    """Smallest rank of a module. Default: half the LoRA config's r (at least 1); 0 lets the allocation drop
    modules (as in FimConfig)."""

    r_max: int | None = None
    """Largest rank of a module. Default: four times the LoRA config's r, capped at min(in, out)."""

    adjust_scaling_factors: bool = True
    """Keep every module's scale at the config's alpha/r (alpha/sqrt(r) with rsLoRA, via alpha_pattern);
    False: alpha/r_i (alpha/sqrt(r_i) with rsLoRA)."""

    seed: int = 0
    """Seed of LoRA-A at the chosen ranks (the caller's global RNG state is left untouched)."""

    def check_budget_bounds(self) -> None:
        """Validate the shared fields; each error names its field.

        Raises:
            ValueError: a field out of range, both budgets set, or ``r_min > r_max``.
        """
        for name in ("budget_ranks", "budget_params", "r_min", "r_max"):
            if getattr(self, name) is not None:  # r_min 0 lets the allocation drop modules, as in FimConfig
                check_int(name, getattr(self, name), minimum=0 if name == "r_min" else 1)
        if self.budget_unit not in ("ranks", "params"):
            raise ValueError(f"`budget_unit` must be 'ranks' or 'params', got {self.budget_unit!r}")
        if self.budget_ranks is not None and self.budget_params is not None:
            raise ValueError("set only one of `budget_ranks` and `budget_params`, not both")
        if self.r_min is not None and self.r_max is not None and self.r_min > self.r_max:
            raise ValueError(f"`r_min` ({self.r_min}) must be <= `r_max` ({self.r_max})")
        if not isinstance(self.adjust_scaling_factors, bool):
            raise ValueError(
                f"`adjust_scaling_factors` must be true or false, got {self.adjust_scaling_factors!r}"
            )
        check_int("seed", self.seed, minimum=0)

    def bounds(self, r: int) -> tuple[int, int]:
        """``(r_min, r_max)`` for a LoRA config of rank ``r`` (see :func:`fimlora.config.resolve_rank_bounds`)."""
        return resolve_rank_bounds(r, self.r_min, self.r_max)

    def allocation_config(self, **fields: Any) -> FimConfig:
        """Budget and bounds as a :class:`FimConfig`, the form :func:`fimlora.initialize.plan_rank_map` reads.

        Scores are allocated as they are (``normalize="none"``, ``score_power=1``) unless ``fields`` (other
        FimConfig fields) say otherwise, whatever FIM-LoRA's defaults.
        """
        base: dict[str, Any] = {
            "normalize": "none",
            "score_power": 1.0,
            "budget_unit": self.budget_unit,
            "budget_ranks": self.budget_ranks,
            "budget_params": self.budget_params,
            "r_min": self.r_min,
            "r_max": self.r_max,
            "adjust_scaling_factors": self.adjust_scaling_factors,
            "seed": self.seed,
            "show_progress": False,
        }
        return FimConfig(**{**base, **fields})


# ---- option checks (each error names the field) -------------------------------------------------------


def check_budget(unit: str, budget_ranks: int | None, budget_params: int | None) -> None:
    """``budget_unit`` is "ranks" or "params", and only the matching explicit budget is set (>= 1)."""
    if unit not in ("ranks", "params"):
        raise ValueError(f"`budget_unit` must be 'ranks' or 'params', got {unit!r}")
    if unit == "ranks" and budget_params is not None:
        raise ValueError("`budget_params` needs budget_unit='params'")
    if unit == "params" and budget_ranks is not None:
        raise ValueError("`budget_ranks` needs budget_unit='ranks'")
    for field_name, value in (("budget_ranks", budget_ranks), ("budget_params", budget_params)):
        if value is not None:
            check_int(field_name, value, minimum=1)


def check_int(name: str, value: object, *, minimum: int) -> None:
    """``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_float(name: str, value: object, *, low: float, strict: bool = False) -> None:
    """``value`` is a finite number >= ``low`` (> ``low`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {low}, got {value}")
