"""A control for FIM-LoRA: FIM-LoRA's ranks, permuted among modules of the same shape.

Calibration and allocation are exactly ``fim``'s (the same :class:`~fimlora.methods.fim.FimMethod` with
the same :class:`~fimlora.config.FimConfig` does them); then, within each group of modules with the same
``(in_features, out_features)``, the ranks are shuffled by a permutation drawn uniformly at random from a
:class:`random.Random` seeded with ``seed``. A module's rank cost (``in + out``) and its largest rank
(``min(in, out)``) depend only on its shape, so the rank sum, the parameter count and the bounds are
exactly ``fim``'s: only which module gets which rank is destroyed. If ``fim`` beats this control, the
assignment of ranks to modules carries information, beyond the shape of the rank distribution.

The permutation is uniform over all permutations of each group (not a derangement): it is the null
hypothesis "rank independent of which module of that shape it is". Groups are visited in their order of
first appearance in the model, so a seed gives the same map on every platform.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.methods.base import StaticRanksMethod, register_method
from fimlora.methods.budget import check_int
from fimlora.methods.fim import FimMethod, fim_config_with
from fimlora.peft_glue import apply_rank_map, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = ["FimShuffledMethod", "shuffle_within_shapes"]


def shuffle_within_shapes(
    ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], seed: int
) -> dict[str, int]:
    """Permute ``ranks`` among modules of equal shape with a uniformly random permutation per shape.

    Args:
        ranks: module name -> rank, shape (n,).
        shapes: module name -> (in_features, out_features), for every module in ``ranks``.
        seed: seeds a private :class:`random.Random` (the global RNGs are not touched).

    Returns:
        module name -> rank, in the order of ``ranks``; per shape, the same multiset of ranks.
    """
    groups: dict[tuple[int, int], list[str]] = {}
    for n in ranks:
        fan_in, fan_out = shapes[n]
        groups.setdefault((int(fan_in), int(fan_out)), []).append(n)
    rng = random.Random(seed)
    shuffled: dict[str, int] = {}
    for names in groups.values():
        values = [int(ranks[n]) for n in names]
        rng.shuffle(values)
        shuffled.update(zip(names, values, strict=True))
    return {n: shuffled[n] for n in ranks}


@register_method("fim-shuffled")
class FimShuffledMethod(StaticRanksMethod):
    """Control: FIM-LoRA's ranks permuted among same-shape modules (same budget, assignment destroyed)."""

    name = "fim-shuffled"

    def __init__(self, fim_config: FimConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        """
        Args:
            fim_config: calibration, budget and bounds, as for ``fim`` (``fimlora train`` passes the run's).
            seed: seeds the permutation (``fimlora train`` passes the run's seed); LoRA-A's init after
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
        """Calibrate and allocate as ``fim``, then rebuild every module at its shuffled rank.

        Raises:
            ValueError: no calibration batches, or bounds or budget infeasible for this model (as for ``fim``).
        """
        if calibration_batches is None:
            raise ValueError(
                f"the {self.name!r} method needs calibration batches (the first T training batches)"
            )
        fim = FimMethod(self.fim_config)
        model = fim.prepare(
            base_model,
            lora_config,
            calibration_batches=calibration_batches,
            total_steps=total_steps,
            loss_fn=loss_fn,
        )
        assert fim.rank_map is not None  # set by FimMethod.prepare
        fim_ranks = dict(fim.rank_map)
        shapes = module_shapes(lora_modules(model))
        ranks = shuffle_within_shapes(fim_ranks, shapes, self.seed)
        meta = {
            **fim.rank_map.metadata,
            "method": self.name,
            "control": "fim-shuffled",
            "seed": self.seed,
            "fim_ranks": fim_ranks,
            "moved_modules": sum(ranks[n] != fim_ranks[n] for n in ranks),
        }
        self.rank_map = RankMap(ranks, metadata=meta)
        apply_rank_map(
            model,
            self.rank_map,
            adjust_scaling_factors=self.fim_config.adjust_scaling_factors,
            seed=self.fim_config.seed,
        )
        return model
