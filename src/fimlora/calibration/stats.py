"""Calibration statistics of LoRA-B gradients, and the reduction of raw sums into them.

With LoRA's usual init (B = 0), dL/dA = 0 and only B carries signal:
``dL/dB_m = s_m * sum_tokens delta_m (A_m x)^T``. Over T calibration batches with gradients ``g_t`` of
shape ``(out_m, r_m)`` the accumulators keep fp32 sums, and this module turns them into

    F_m = (1/T) sum_t g_t**2          (empirical Fisher diagonal)
    V_m = F_m - ((1/T) sum_t g_t)**2  (gradient variance)

summed over B's elements (:func:`batch_module_stats`), or, for the per-example estimator, into the traces
``(1/M) sum_n ||g_n||^2`` and ``(1/M) sum_n ||g_n||^2 - ||(1/M) sum_n g_n||^2`` over M examples
(:func:`example_module_stats`). :meth:`ModuleStat.score` reduces either to one score per module by a mean
(divide by B's element count; favours small matrices) or a sum (favours large ones) over its elements.
:class:`ModuleStats` is the JSON-serialisable hand-off between calibration and allocation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fimlora.config import AGGREGATIONS, SCORE_KINDS
from fimlora.io import atomic_write_text

__all__ = ["ModuleStat", "ModuleStats", "batch_module_stats", "example_module_stats"]

_FORMAT = "fimlora.module_stats/1"


@dataclass(frozen=True)
class ModuleStat:
    """Reduced statistics of one LoRA module's B gradient.

    Attributes:
        in_features: input size of the adapted layer.
        out_features: output size of the adapted layer.
        numel: number of elements of B at calibration time (out_features * r).
        fisher_sum: sum over B's elements of E[g^2].
        variance_sum: sum over B's elements of E[g^2] - E[g]^2.
    """

    in_features: int
    out_features: int
    numel: int
    fisher_sum: float
    variance_sum: float

    def score(self, kind: str, aggregation: str) -> float:
        """The module's score: ``kind`` in {"fisher", "variance"}, ``aggregation`` in {"mean", "sum"}."""
        if kind not in SCORE_KINDS:
            raise ValueError(f"`score` must be one of {SCORE_KINDS}, got {kind!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}")
        total = self.fisher_sum if kind == "fisher" else self.variance_sum
        return total / self.numel if aggregation == "mean" else total


@dataclass
class ModuleStats:
    """Calibration statistics for every LoRA module of one adapter, JSON-serialisable.

    This is the hand-off of the two-step API: compute under DDP, save on rank 0, apply later.
    """

    modules: dict[str, ModuleStat]
    num_batches: int
    seconds: float = 0.0
    world_size: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)

    def scores(self, kind: str = "fisher", aggregation: str = "mean") -> dict[str, float]:
        """Module name -> score, in module order."""
        return {n: m.score(kind, aggregation) for n, m in self.modules.items()}

    def costs(self) -> dict[str, int]:
        """Parameters per unit of rank for each module (in + out)."""
        return {n: m.in_features + m.out_features for n, m in self.modules.items()}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features)."""
        return {n: (m.in_features, m.out_features) for n, m in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (format ``fimlora.module_stats/1``)."""
        return {
            "format": _FORMAT,
            "num_batches": self.num_batches,
            "seconds": self.seconds,
            "world_size": self.world_size,
            "metadata": self.metadata,
            "modules": {n: vars(m) for n, m in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModuleStats:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: ``data`` is not in the ``fimlora.module_stats/1`` format.
        """
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a fimlora statistics file: expected format {_FORMAT!r}")
        return cls(
            modules={n: ModuleStat(**m) for n, m in data["modules"].items()},
            num_batches=int(data["num_batches"]),
            seconds=float(data.get("seconds", 0.0)),
            world_size=int(data.get("world_size", 1)),
            metadata=dict(data.get("metadata", {})),
        )

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a crash never leaves a half-written file); returns the path written."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> ModuleStats:
        """Read a file written by :meth:`save_json`.

        Raises:
            ValueError: the file cannot be read, is not JSON, or is not a statistics file.
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read statistics file {path}: {e}") from e
        return cls.from_dict(data)


def batch_module_stats(
    sum_g: Mapping[str, torch.Tensor],
    sum_g2: Mapping[str, torch.Tensor],
    num_batches: int,
    shapes: Mapping[str, tuple[int, int]],
) -> dict[str, ModuleStat]:
    """Per-module Fisher and variance sums from the batch estimator's running sums.

    A batch where a module got no gradient counts as a zero gradient for it. With one batch the variance
    is exactly 0 (fp32 ``g^2`` against ``(fp32 g)^2`` in fp64 would leave rounding noise, ~1e-8 of the
    Fisher, that would otherwise become a random rank map).

    Args:
        sum_g: module -> ``sum_t g_t``, shape ``(out, r)`` (any float dtype; reduced in fp64).
        sum_g2: module -> ``sum_t g_t**2``, same shapes and keys as ``sum_g``.
        num_batches: T (0 is treated as 1).
        shapes: module -> ``(in_features, out_features)``.

    Returns:
        Module -> :class:`ModuleStat`, in the order of ``sum_g``.
    """
    t = max(num_batches, 1)
    # Modules with one shape (on one device) are reduced together: a few kernels per shape rather than
    # ten per module, which on a thousand-module model is most of the time spent here.
    groups: dict[tuple[tuple[int, ...], torch.device], list[str]] = {}
    for n, s in sum_g.items():
        groups.setdefault((tuple(s.shape), s.device), []).append(n)
    order: list[str] = []
    parts = []
    for names in groups.values():
        fisher = torch.stack([sum_g2[n] for n in names]).double() / t
        mean = torch.stack([sum_g[n] for n in names]).double() / t
        variance = (fisher - mean * mean).clamp_min(0.0) if t > 1 else torch.zeros_like(fisher)
        parts.append(torch.stack([fisher.flatten(1).sum(1), variance.flatten(1).sum(1)], dim=1))
        order += names
    # One synchronisation for all modules (which may sit on several devices).
    rows = torch.cat([x.to(parts[0].device) for x in parts]).tolist() if parts else []
    by_name = dict(zip(order, rows, strict=True))
    return {n: _stat(shapes[n], sum_g[n].numel(), *by_name[n]) for n in sum_g}


def example_module_stats(
    sum_g: Mapping[str, torch.Tensor],
    sum_sq: Mapping[str, torch.Tensor],
    num_examples: int,
    shapes: Mapping[str, tuple[int, int]],
) -> dict[str, ModuleStat]:
    """Per-module traces of the per-example Fisher and gradient covariance from the per-example sums.

    An example where a module got no gradient counts as a zero gradient for it.

    Args:
        sum_g: module -> ``sum_n g_n``, shape ``(out, r)``.
        sum_sq: module -> ``sum_n ||g_n||^2``, shape ``()``.
        num_examples: M (0 is treated as 1).
        shapes: module -> ``(in_features, out_features)``.

    Returns:
        Module -> :class:`ModuleStat` (``fisher_sum`` = ``(1/M) sum_n ||g_n||^2``, ``variance_sum`` that
        minus ``||(1/M) sum_n g_n||^2``, clamped at 0), in the order of ``sum_g``.
    """
    m = max(num_examples, 1)
    out = {}
    for n, s in sum_g.items():
        fisher = float(sum_sq[n].double()) / m
        mean = s.double() / m
        out[n] = _stat(shapes[n], s.numel(), fisher, max(fisher - float((mean * mean).sum()), 0.0))
    return out


def _stat(shape: tuple[int, int], numel: int, fisher_sum: float, variance_sum: float) -> ModuleStat:
    fan_in, fan_out = shape
    return ModuleStat(
        in_features=fan_in,
        out_features=fan_out,
        numel=numel,
        fisher_sum=fisher_sum,
        variance_sum=variance_sum,
    )
