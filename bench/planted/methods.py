"""The maps a planted cell compares: every method in fimlora's registry, and the oracle.

* Registered methods are built by name with the run's one budget specification as flat fields,
  ``get_method(name, budget_unit="params", budget_params=P, r_min=..., r_max=..., calibration_batches=...,
  seed=...)``, each method given only the fields its options have (:func:`fimlora.methods.base.method_run_options`
  and its options' fields), so a method registered later (the warm-up method of issue 39) is run without
  being named here.
* The **oracle** is the planted map scaled to the same parameter budget by the library's own allocator
  (:func:`fimlora.allocate_ranks`, same bounds), trained as fixed ranks by :class:`FixedRanksMethod`. It is
  not a registered method: runs store it as ``uniform`` with the override ``map: oracle``
  (:data:`ORACLE`), because the harness's specs accept registered methods only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fimlora import RankMap, allocate_ranks, apply_rank_map
from fimlora.methods.base import StaticRanksMethod
from fimlora.peft_glue import current_ranks, lora_modules

__all__ = [
    "ORACLE",
    "FixedRanksMethod",
    "FixedRanksOptions",
    "build_method",
    "oracle_ranks",
    "planted_methods",
]

ORACLE = "oracle"
"""The oracle's name in reports and on the command line."""


def planted_methods() -> list[str]:
    """Every registered method (read now, so later registrations count) and the oracle."""
    from fimlora.methods import available_methods

    return [*available_methods(), ORACLE]


def oracle_ranks(
    planted: Mapping[str, int],
    costs: Mapping[str, int],
    *,
    budget_params: int,
    r_min: int,
    r_max: int,
) -> dict[str, int]:
    """The planted ranks scaled to the parameter budget: ``r_m`` proportional to the planted rank within
    ``[r_min, r_max]``, sum of ``r_m * costs[m]`` at most ``budget_params`` with the least slack (the
    allocator spreads what the planted modules cannot hold over the others, evenly).

    Args:
        planted: module -> planted rank (a homogeneous planting gives uniform's map).
        costs: module -> ``in + out``.
        budget_params: LoRA parameters of uniform LoRA at the budget's rank.
        r_min, r_max: the bounds every method is given.
    """
    scores = {n: float(k) for n, k in planted.items()}
    return dict(
        allocate_ranks(scores, budget_params=budget_params, costs=dict(costs), r_min=r_min, r_max=r_max)
    )


def build_method(
    name: str,
    *,
    budget_params: int,
    r_min: int,
    r_max: int,
    calibration_batches: int,
    seed: int,
) -> Any:
    """A registered method at the cell's budget: the run-level fields it honours, and ``seed`` and ``draw_seed``
    (the controls' draw) where it has them.

    Raises:
        ValueError: an unknown method, or one that refuses the fields (the library's message).
    """
    from fimlora.methods import get_method
    from fimlora.methods.base import method_option_fields, method_run_options

    wanted: dict[str, Any] = {
        "budget_unit": "params",
        "budget_params": budget_params,
        "r_min": r_min,
        "r_max": r_max,
        "calibration_batches": calibration_batches,
    }
    fields = {k: v for k, v in wanted.items() if k in method_run_options(name)}
    for option in ("seed", "draw_seed"):  # LoRA-A's seed; the controls' random draw (a new map per planting)
        if option in method_option_fields(name):
            fields[option] = seed
    return get_method(name, **fields)


@dataclass
class FixedRanksOptions:
    """The given map and LoRA-A's seed."""

    ranks: dict[str, int] = field(default_factory=dict)
    """module name (as in the base model) -> rank; PEFT's prefix is added when applied."""

    seed: int = 0
    """Seeds LoRA-A at the new ranks."""


class FixedRanksMethod(StaticRanksMethod):
    """A rank method whose map is given (the oracle): wrap with LoRA, set every module to its rank, train.

    fimlora's :class:`~fimlora.methods.base.StaticRanksMethod` (no penalty, no reallocation, the map
    checkpointed); not registered: the bench builds it with ``FixedRanksMethod(ranks=..., seed=...)``.
    """

    name = ORACLE
    options_class = FixedRanksOptions
    needs_calibration = False
    options: FixedRanksOptions

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: Any
    ) -> tuple[nn.Module, RankMap]:
        """Wrap ``base_model`` with ``lora_config`` and resize every LoRA module to its rank."""
        from peft import get_peft_model

        model = get_peft_model(base_model, lora_config)
        by_suffix = {n: self._rank_of(n) for n in lora_modules(model)}
        apply_rank_map(model, by_suffix, seed=self.options.seed)
        return model, RankMap(current_ranks(model), metadata={"method": ORACLE})

    def _rank_of(self, wrapped_name: str) -> int:
        ranks = self.options.ranks
        matches = [int(k) for n, k in ranks.items() if wrapped_name == n or wrapped_name.endswith("." + n)]
        if len(matches) != 1:
            raise ValueError(f"the fixed map has {len(matches)} entries for LoRA module {wrapped_name!r}")
        return matches[0]
