"""A control for FIM-LoRA: FIM-LoRA's ranks, permuted among modules of the same shape.

Calibration and allocation are exactly ``fim``'s (the same :class:`~fimlora.methods.fim.FimMethod` with
the same :class:`~fimlora.config.FimConfig` does them); then, within each group of modules with the same
``(in_features, out_features)``, the ranks are shuffled by a permutation drawn uniformly at random from a
:class:`random.Random` seeded with ``draw_seed``. A module's rank cost (``in + out``) and its largest rank
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fimlora.config import FimConfig
from fimlora.methods.base import RUN_OPTIONS, LossFn, StaticRanksMethod, register_method
from fimlora.methods.budget import check_int
from fimlora.methods.fim import FimMethod, fim_config_part
from fimlora.methods.fim_spectrum import FimSpectrumMethod, SpectrumOptions
from fimlora.peft_glue import apply_rank_map, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = ["SHUFFLE_SOURCES", "FimShuffledMethod", "FimShuffledOptions", "shuffle_within_shapes"]

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


_SHARED_WITH_SPECTRUM = (*RUN_OPTIONS, "adjust_scaling_factors", "seed")
"""The fields the ``fim-spectrum`` source takes from this control's own options (its budget, bounds,
calibration and seed), so that the one budget holds whatever the source."""


@dataclass
class FimShuffledOptions(FimConfig):
    """The shuffled control's options: the source's calibration, budget and bounds (every :class:`FimConfig`
    field), and the permutation. Each field's docstring is its help text."""

    draw_seed: int = 0
    """Seeds the permutation (``fimlora train`` passes the run's seed); LoRA-A's init after resizing is seeded
    by ``seed``, as in the source."""

    source: str = "fim"
    """The method whose map is shuffled, one of ``fim``, ``fim-spectrum``."""

    source_options: dict[str, Any] = field(default_factory=dict)
    """Options of the ``fim-spectrum`` source other than budget, bounds, calibration batches and seed (those
    are this control's own fields); ``fim`` takes none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("draw_seed", self.draw_seed, minimum=0)
        if self.source not in SHUFFLE_SOURCES:
            raise ValueError(f"`source` must be one of {', '.join(SHUFFLE_SOURCES)}, got {self.source!r}")
        options = dict(self.source_options or {})
        if "gradient_init" in options:
            raise ValueError(
                "`gradient_init` cannot be shuffled: resized modules would start from B = 0, the rest from "
                "the gradient; shuffle the plain map instead"
            )
        if self.source == "fim" and options:
            raise ValueError(
                f"`source_options` {sorted(options)} are not taken by source 'fim': set FimConfig fields"
            )
        if shared := sorted(set(options) & set(_SHARED_WITH_SPECTRUM)):
            raise ValueError(f"set {', '.join(shared)} on fim-shuffled itself, not in `source_options`")
        if self.source == "fim-spectrum":
            valid = {f.name for f in dataclasses.fields(SpectrumOptions)} - set(_SHARED_WITH_SPECTRUM)
            if unknown := sorted(set(options) - valid):
                raise ValueError(
                    f"unknown `source_options` {unknown} for source 'fim-spectrum'; "
                    f"valid: {', '.join(sorted(valid))}"
                )
        self.source_options = options
        self.source_method()  # checks the options now, before any model is touched

    def source_method(self) -> FimMethod | FimSpectrumMethod:
        """A fresh instance of the source method, configured by these options."""
        if self.source == "fim":
            return FimMethod(**vars(fim_config_part(self)))
        shared = {f: getattr(self, f) for f in _SHARED_WITH_SPECTRUM}
        return FimSpectrumMethod(**shared, **self.source_options)


@register_method("fim-shuffled")
class FimShuffledMethod(StaticRanksMethod):
    """Control: FIM-LoRA's ranks permuted among same-shape modules (same budget, assignment destroyed)."""

    name = "fim-shuffled"
    options_class = FimShuffledOptions
    options: FimShuffledOptions

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """See :meth:`fimlora.methods.base.MethodBase.check_budget`."""
        self.options.source_method().check_budget(shapes, r)

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        """Calibrate and allocate as the source (``fim`` by default), then rebuild every module at its
        shuffled rank.

        Raises:
            ValueError: bounds or budget infeasible for this model (as for the source).
        """
        o = self.options
        src = o.source_method()
        if isinstance(src, FimMethod):
            # the source's map is only planned: a module it drops (rank 0) could not get a rank back
            src.apply_ranks = False
        model = src.prepare(base_model, lora_config, calibration_batches=batches, loss_fn=loss_fn)
        assert src.rank_map is not None  # set by every source's prepare
        source_ranks = dict(src.rank_map)
        shapes = module_shapes(lora_modules(model))
        ranks = shuffle_within_shapes(source_ranks, shapes, o.draw_seed)
        meta = {
            **src.rank_map.metadata,
            "method": self.name,
            "control": "fim-shuffled",
            "source": o.source,
            "seed": o.draw_seed,
            "fim_ranks": source_ranks,
            "moved_modules": sum(ranks[n] != source_ranks[n] for n in ranks),
        }
        rank_map = RankMap(ranks, metadata=meta)
        apply_rank_map(model, rank_map, adjust_scaling_factors=o.adjust_scaling_factors, seed=o.seed)
        return model, rank_map
