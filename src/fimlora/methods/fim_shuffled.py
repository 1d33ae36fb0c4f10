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

``source`` names the map to shuffle: ``fim`` (default, with the run's :class:`~fimlora.config.FimConfig`, so
that tempered or kind-normalised scores are shuffled as they are allocated) or ``fim-spectrum`` (its map from
a wide calibration adapter, with ``source_options`` as that method's options). This makes a variant's own
control: the same map, assignment destroyed. A source's own initialisation of B (``gradient_init``) is
refused: the resized modules would start from zero and the rest from the gradient, a mix of two methods.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.methods.base import RUN_OPTIONS, StaticRanksMethod, register_method
from fimlora.methods.budget import check_int
from fimlora.methods.fim import FimMethod, fim_config_with
from fimlora.methods.fim_spectrum import FimSpectrumMethod, SpectrumOptions
from fimlora.peft_glue import apply_rank_map, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = ["SHUFFLE_SOURCES", "FimShuffledMethod", "shuffle_within_shapes"]

SHUFFLE_SOURCES: tuple[str, ...] = ("fim", "fim-spectrum")
"""Methods whose maps this control can shuffle (static ranks, B = 0 at the start of training)."""


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

    run_options = frozenset(RUN_OPTIONS)
    """The run-level budget and calibration options this method honours (see ``RUN_OPTIONS``)."""

    name = "fim-shuffled"

    def __init__(
        self,
        fim_config: FimConfig | None = None,
        *,
        seed: int = 0,
        source: str = "fim",
        source_options: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        """
        Args:
            fim_config: calibration, budget and bounds, as for ``fim`` (``fimlora train`` passes the run's).
            seed: seeds the permutation (``fimlora train`` passes the run's seed); LoRA-A's init after
                resizing is seeded by the source's seed (``fim_config.seed`` for ``fim``), as in the source.
            source: the method whose map is shuffled, one of :data:`SHUFFLE_SOURCES`.
            source_options: options of the source method (``fim-spectrum``: its :class:`SpectrumOptions`
                fields; ``fim``: none, its settings are ``fim_config``'s).
            **overrides: :class:`FimConfig` fields, applied on top of ``fim_config``.

        Raises:
            ValueError: an unknown source, options it does not take, or ``gradient_init``.
        """
        check_int("seed", seed, minimum=0)
        if source not in SHUFFLE_SOURCES:
            raise ValueError(f"`source` must be one of {', '.join(SHUFFLE_SOURCES)}, got {source!r}")
        options = dict(source_options or {})
        if "gradient_init" in options:
            raise ValueError(
                "`gradient_init` cannot be shuffled: resized modules would start from B = 0, the rest from "
                "the gradient; shuffle the plain map instead"
            )
        if source == "fim" and options:
            raise ValueError(
                f"`source_options` {sorted(options)} are not taken by source 'fim': set FimConfig fields"
            )
        if source == "fim-spectrum":
            valid = {f.name for f in dataclasses.fields(SpectrumOptions)}
            if unknown := sorted(set(options) - valid):
                raise ValueError(
                    f"unknown `source_options` {unknown} for source 'fim-spectrum'; "
                    f"valid: {', '.join(sorted(valid))}"
                )
        self.fim_config = fim_config_with(fim_config, overrides)
        self.seed = seed
        self.source = source
        self.source_options = options
        self._source_method()  # checks the options now, before any model is touched

    def _source_method(self) -> FimMethod | FimSpectrumMethod:
        if self.source == "fim":
            return FimMethod(self.fim_config)
        return FimSpectrumMethod(**self.source_options)

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        """Calibrate and allocate as the source (``fim`` by default), then rebuild every module at its
        shuffled rank.

        Raises:
            ValueError: no calibration batches, or bounds or budget infeasible for this model (as for the
                source).
        """
        if calibration_batches is None:
            raise ValueError(
                f"the {self.name!r} method needs calibration batches (the first T training batches)"
            )
        src = self._source_method()
        if isinstance(src, FimMethod):
            # the source's map is only planned: a module it drops (rank 0) could not get a rank back
            src.apply_ranks = False
        model = src.prepare(
            base_model,
            lora_config,
            calibration_batches=calibration_batches,
            total_steps=total_steps,
            loss_fn=loss_fn,
        )
        assert src.rank_map is not None  # set by every source's prepare
        source_ranks = dict(src.rank_map)
        shapes = module_shapes(lora_modules(model))
        ranks = shuffle_within_shapes(source_ranks, shapes, self.seed)
        meta = {
            **src.rank_map.metadata,
            "method": self.name,
            "control": "fim-shuffled",
            "source": self.source,
            "seed": self.seed,
            "fim_ranks": source_ranks,
            "moved_modules": sum(ranks[n] != source_ranks[n] for n in ranks),
        }
        self.rank_map = RankMap(ranks, metadata=meta)
        settings = src.fim_config if isinstance(src, FimMethod) else src.options
        apply_rank_map(
            model,
            self.rank_map,
            adjust_scaling_factors=settings.adjust_scaling_factors,
            seed=settings.seed,
        )
        return model
