"""Where the teacher's low-rank updates are planted, and at what rank: the planted-rank patterns.

A pattern maps every adapted module to a planted rank (0: untouched). The planted map is the ground truth
a rank-allocation method should find; scaled to a budget it is the oracle map (:mod:`bench.planted.oracle`).

=================  ========================================================================================
``sparse``         a few modules (about one in six, drawn anew per seed) at a high rank, the rest untouched
``graded``         every module, its rank a tent over depth: growing to a peak in the middle layers, then
                   shrinking again
``mlp``            every MLP matrix at a middle rank, attention untouched
``attention``      every attention matrix (query, key, value, output) at a middle rank, MLP untouched
``homogeneous``    every module at the same rank: the control where no allocation should beat uniform
=================  ========================================================================================

Module kinds and layer indices are read from the names (:func:`fimlora.rankmap.split_module_name`), so the
same patterns apply to BERT encoders (``attention.self.query``, ``intermediate.dense``) and LLaMA-style
decoders (``self_attn.q_proj``, ``mlp.down_proj``). Pure standard library.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fimlora.rankmap import split_module_name

__all__ = ["PATTERNS", "PlantedRanks", "module_kind", "planted_ranks"]

PATTERNS: tuple[str, ...] = ("sparse", "graded", "mlp", "attention", "homogeneous")
"""Every planting pattern, in the order reports list them; ``homogeneous`` is the control."""

_ATTENTION_MARKS = ("attention", "attn", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj")
_MLP_MARKS = ("intermediate", "mlp", "ffn", "output.dense", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


def module_kind(name: str) -> str:
    """``"attention"`` or ``"mlp"`` for a linear module of a transformer block.

    Attention is tested first: BERT's ``attention.output.dense`` is attention, its ``output.dense`` (the
    second FFN matrix) is MLP.

    Raises:
        ValueError: a name that is neither (e.g. ``lm_head``, ``pooler.dense``).
    """
    _, kind = split_module_name(name)
    if any(mark in kind for mark in _ATTENTION_MARKS):
        return "attention"
    if any(mark in kind for mark in _MLP_MARKS):
        return "mlp"
    raise ValueError(f"module {name!r} is neither an attention nor an MLP matrix of a transformer block")


@dataclass(frozen=True)
class PlantedRanks:
    """Planted ranks of one pattern (the ranks; the strength of the update is the teacher's dial).

    Attributes:
        high: rank of the modules ``sparse`` plants in, and the peak of ``graded``'s tent.
        middle: rank of every planted module of ``mlp``, ``attention`` and ``homogeneous``.
        sparse_fraction: share of the modules ``sparse`` plants in (at least one module).
    """

    high: int = 16
    middle: int = 8
    sparse_fraction: float = 1 / 6

    def __post_init__(self) -> None:
        for name in ("high", "middle"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not 0.0 < self.sparse_fraction <= 1.0:
            raise ValueError(f"`sparse_fraction` must be in (0, 1], got {self.sparse_fraction!r}")


def planted_ranks(
    pattern: str,
    modules: Sequence[str],
    seed: int,
    *,
    ranks: PlantedRanks | None = None,
    max_rank: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """The planted rank of every module for ``pattern``.

    Args:
        pattern: One of :data:`PATTERNS`.
        modules: Adapted module names (their order is kept in the result).
        seed: Draws ``sparse``'s modules; the other patterns place ranks by name alone (the teacher draws new
            directions per seed for every pattern).
        ranks: The ranks to plant (default :class:`PlantedRanks`).
        max_rank: Per-module cap, ``min(in, out)``; a planted rank never exceeds it.

    Returns:
        module -> planted rank (0 where nothing is planted).

    Raises:
        ValueError: unknown pattern, no modules, or a pattern that plants nothing in these modules.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {PATTERNS}")
    names = list(modules)
    if not names:
        raise ValueError("no modules to plant in")
    r = ranks or PlantedRanks()
    if pattern == "sparse":
        count = max(1, round(r.sparse_fraction * len(names)))
        chosen = set(random.Random(seed).sample(sorted(names), count))
        out = {n: r.high if n in chosen else 0 for n in names}
    elif pattern == "graded":
        layers = {n: split_module_name(n)[0] for n in names}
        known = sorted({layer for layer in layers.values() if layer is not None})
        if not known:
            raise ValueError("`graded` needs modules with layer indices")
        position = {layer: i for i, layer in enumerate(known)}
        out = {}
        for n in names:
            layer = layers[n]
            # Tent over depth: 1 at the middle, falling linearly to 1/L at either end (never 0).
            t = 1.0 - abs(2.0 * (position[layer] + 0.5) / len(known) - 1.0) if layer is not None else 0.0
            out[n] = max(1, round(r.high * t)) if layer is not None else 0
    elif pattern in ("mlp", "attention"):
        out = {n: r.middle if module_kind(n) == pattern else 0 for n in names}
    else:
        out = dict.fromkeys(names, r.middle)
    if max_rank is not None:
        out = {n: min(k, int(max_rank[n])) for n, k in out.items()}
    if not any(out.values()):
        raise ValueError(f"pattern {pattern!r} plants nothing in these modules")
    return out
