"""RankMap: the result of rank allocation, a mapping from LoRA module name to rank.

The allocator (:mod:`fimlora.allocate`) turns per-module scores into integer ranks; everything
downstream (applying ranks to PEFT, reports, figures, comparing two methods) consumes a
:class:`RankMap`. This module keeps that object small and pure: numpy and the standard library
only, so it can be imported, saved and compared without torch, PEFT or matplotlib.

What lives here:

* :class:`RankMap` -- an immutable, insertion-ordered ``Mapping[str, int]`` with JSON-serialisable
  metadata (scores, budget, config, versions) and atomic JSON I/O in the ``fimlora.rankmap/1`` format.
* :func:`split_module_name` and :class:`RankTable` -- a layers x module-kinds view of a map, for
  markdown tables and heatmaps.
* :class:`RankMapComparison` -- how two allocations differ: Spearman's rho, Kendall's tau-b
  (Kendall, 1945, "The treatment of ties in ranking problems"), and the L1 distance of the ranks.
* :func:`spearman` and :func:`kendall_tau_b` -- those two rank correlations on any paired samples
  (ties get average ranks), e.g. two score vectors.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import numpy.typing as npt

from fimlora.io import atomic_write_text
from fimlora.module_names import split_module_name, split_with_prefix, strip_common

__all__ = [
    "FORMAT",
    "RankMap",
    "RankMapComparison",
    "RankTable",
    "kendall_tau_b",
    "spearman",
    "split_module_name",
]

FORMAT = "fimlora.rankmap/1"
"""Value of the ``"format"`` field in a saved RankMap; bump the suffix on incompatible changes."""

# Rows of the pairwise-sign matrix processed at once in Kendall's tau: bounds the temporaries to
# about _KENDALL_BLOCK * n * 8 bytes instead of n**2 * 8 (200 MB at n = 5000).
_KENDALL_BLOCK = 512


def _validate_rank(name: object, rank: object) -> int:
    """Return ``rank`` as a Python int, or raise ValueError naming the module.

    numpy integers are accepted (the allocator works in numpy); bools are rejected because
    ``True`` is an int in Python and would silently become rank 1.
    """
    if not isinstance(name, str):
        raise ValueError(f"module names must be str, got {type(name).__name__} {name!r}")
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, Integral):
        raise ValueError(f"rank of module {name!r} must be an int, got {type(rank).__name__} {rank!r}")
    value = int(rank)
    if value < 0:
        raise ValueError(f"rank of module {name!r} must be >= 0 (0: dropped), got {value}")
    return value


def _json_default(obj: object) -> Any:
    """Convert numpy scalars and arrays (common in scores) to plain Python for JSON."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


@dataclass(frozen=True)
class RankTable:
    """A layers x module-kinds view of a RankMap.

    Attributes:
        layers: Row labels: layer indices sorted ascending, ``None`` (modules outside any
            numbered layer, e.g. ``lm_head``) last.
        kinds: Column labels in first-seen order, e.g. ``["attention.self.query", ...]``. When the
            same kind occurs under different stacks (encoder and decoder of BART or T5), the
            distinguishing part of the stack is prepended: ``"encoder.self_attn.q_proj"``.
        values: ``len(layers) x len(kinds)`` ranks, ``None`` where the layer has no such module.
        modules: Same shape as ``values``: the full module name in each cell, or ``None``.
    """

    layers: list[int | None]
    kinds: list[str]
    values: list[list[int | None]]
    modules: list[list[str | None]]

    def row_totals(self) -> list[int]:
        """Sum of ranks in each layer (row), absent cells counted as 0."""
        return [sum(v for v in row if v is not None) for row in self.values]

    def column_totals(self) -> list[int]:
        """Sum of ranks of each kind (column), absent cells counted as 0."""
        return [sum(row[j] or 0 for row in self.values) for j in range(len(self.kinds))]

    def to_markdown(self) -> str:
        """Render as a GitHub-flavoured markdown table with per-layer and per-kind totals.

        Header ``| layer | kind1 | ... | total |``, one row per layer (``-`` labels the ``None``
        layer, absent cells are blank) and a final ``total`` row.
        """
        header = ["layer", *self.kinds, "total"]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        for layer, row, total in zip(self.layers, self.values, self.row_totals(), strict=True):
            cells = ["-" if layer is None else str(layer)]
            cells += ["" if v is None else str(v) for v in row]
            cells.append(str(total))
            lines.append("| " + " | ".join(cells) + " |")
        columns = self.column_totals()
        lines.append("| " + " | ".join(["total", *map(str, columns), str(sum(columns))]) + " |")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RankMapComparison:
    """How two rank maps differ, over the modules they share.

    Correlations are ``float("nan")`` when fewer than two modules are shared or when either
    side is constant over them (a uniform map has no ordering to correlate with).

    Attributes:
        spearman: Spearman's rho: Pearson correlation of average ranks (ties share their mean rank).
        kendall: Kendall's tau-b, which corrects the denominator for ties on either side.
        l1: Sum over common modules of ``|r_self - r_other|``.
        l1_normalised: ``l1 / self.total_rank`` (``nan`` for an empty map): the fraction of the
            rank budget that moved. Identical maps give 0; it can exceed 1.
        n_common: Number of modules in both maps.
        only_in_self: Modules in ``self`` only, in ``self``'s order.
        only_in_other: Modules in ``other`` only, in ``other``'s order.
    """

    spearman: float
    kendall: float
    l1: int
    l1_normalised: float
    n_common: int
    only_in_self: list[str]
    only_in_other: list[str]


class RankMap(Mapping[str, int]):
    """Immutable, insertion-ordered mapping from LoRA module name to rank (an int >= 0).

    Rank 0 means the module is dropped: it keeps no LoRA layer (an allocation with ``r_min=0``), and a
    saved adapter leaves it out of ``target_modules``.

    Example:
        >>> rm = RankMap({"model.layers.0.self_attn.q_proj": 12, "model.layers.0.mlp.up_proj": 4},
        ...              metadata={"budget": 16})
        >>> rm.total_rank
        16
        >>> rm == {"model.layers.0.mlp.up_proj": 4, "model.layers.0.self_attn.q_proj": 12}
        True

    Args:
        ranks: Module name -> rank. Ranks must be ints (numpy integers accepted, bools rejected)
            and >= 0 (0: the module is dropped).
        metadata: JSON-serialisable details of how the map was made (scores, budget, config,
            versions, git hash). numpy scalars/arrays are converted to lists and numbers; the map
            stores a deep copy, so later changes to the caller's dict do not leak in.

    Raises:
        ValueError: A rank is not an int or is < 0 (the message names the module), or metadata
            is not JSON-serialisable.
    """

    __slots__ = ("_metadata", "_ranks")

    def __init__(self, ranks: Mapping[str, int], metadata: Mapping[str, Any] | None = None) -> None:
        self._ranks: dict[str, int] = {name: _validate_rank(name, r) for name, r in ranks.items()}
        try:
            # A JSON round trip both validates and deep-copies, and makes the in-memory metadata
            # identical to what load_json will return (tuples become lists, keys become str).
            text = json.dumps(dict(metadata or {}), default=_json_default)
        except (TypeError, ValueError) as err:
            raise ValueError(f"RankMap metadata must be JSON-serialisable: {err}") from err
        self._metadata: dict[str, Any] = json.loads(text)

    # -- Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        return self._ranks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    def __eq__(self, other: object) -> bool:
        """Equal to any mapping with the same name -> rank pairs; order and metadata ignored."""
        if isinstance(other, RankMap):
            return self._ranks == other._ranks
        if isinstance(other, Mapping):
            return self._ranks == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._ranks.items()))

    def __repr__(self) -> str:
        if not self._ranks:
            return "RankMap(n_modules=0, total_rank=0)"
        values = self._ranks.values()
        return (
            f"RankMap(n_modules={len(self._ranks)}, total_rank={self.total_rank}, "
            f"min={min(values)}, max={max(values)})"
        )

    # -- summaries --------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """A deep copy of the metadata; mutating it does not change the map."""
        result: dict[str, Any] = json.loads(json.dumps(self._metadata))
        return result

    @property
    def dropped(self) -> list[str]:
        """Modules at rank 0 (no LoRA layer), in map order."""
        return [name for name, r in self._ranks.items() if r == 0]

    @property
    def total_rank(self) -> int:
        """Sum of all ranks (the budget when allocating by rank)."""
        return sum(self._ranks.values())

    def parameter_count(self, shapes: Mapping[str, tuple[int, int]]) -> int:
        """Number of LoRA parameters: ``sum_m r_m * (in_m + out_m)`` (A is r x in, B is out x r).

        Args:
            shapes: Module name -> ``(in_features, out_features)``; extra entries are ignored.

        Raises:
            ValueError: Some modules of the map are missing from ``shapes`` (all are listed).
        """
        missing = [name for name in self._ranks if name not in shapes]
        if missing:
            raise ValueError(f"shapes is missing {len(missing)} module(s) of the RankMap: {missing}")
        return sum(r * (int(shapes[name][0]) + int(shapes[name][1])) for name, r in self._ranks.items())

    def table(self) -> RankTable:
        """Arrange the ranks as layers x module kinds (see :class:`RankTable`).

        Raises:
            ValueError: Two modules land in the same cell even after qualifying kinds by their
                stack (not expected for Hugging Face models).
        """
        split = {name: split_with_prefix(name) for name in self._ranks}
        prefixes_of_kind: dict[str, list[str]] = {}
        for _, prefix, kind in split.values():
            seen = prefixes_of_kind.setdefault(kind, [])
            if prefix not in seen:
                seen.append(prefix)
        # A kind under several stacks (encoder/decoder) gets one column per stack, labelled by the
        # part of the stack name that differs, rather than colliding in one cell.
        qualify = {
            kind: strip_common(prefixes) for kind, prefixes in prefixes_of_kind.items() if len(prefixes) > 1
        }
        cell_of: dict[str, tuple[int | None, str]] = {}
        for name, (layer, prefix, kind) in split.items():
            if kind in qualify and qualify[kind][prefix]:
                kind = f"{qualify[kind][prefix]}.{kind}"
            cell_of[name] = (layer, kind)

        kinds = list(dict.fromkeys(kind for _, kind in cell_of.values()))
        numbered = sorted({layer for layer, _ in cell_of.values() if layer is not None})
        layers: list[int | None] = [*numbered]
        if any(layer is None for layer, _ in cell_of.values()):
            layers.append(None)
        row = {layer: i for i, layer in enumerate(layers)}
        col = {kind: j for j, kind in enumerate(kinds)}
        values: list[list[int | None]] = [[None] * len(kinds) for _ in layers]
        modules: list[list[str | None]] = [[None] * len(kinds) for _ in layers]
        for name, (layer, kind) in cell_of.items():
            i, j = row[layer], col[kind]
            if modules[i][j] is not None:
                raise ValueError(
                    f"modules {modules[i][j]!r} and {name!r} both map to layer {layer}, kind {kind!r}"
                )
            values[i][j] = self._ranks[name]
            modules[i][j] = name
        return RankTable(layers=layers, kinds=kinds, values=values, modules=modules)

    def format_table(self) -> str:
        """The :meth:`table` as markdown, with per-layer and per-kind totals."""
        return self.table().to_markdown()

    def compare(self, other: Mapping[str, int]) -> RankMapComparison:
        """Compare this allocation with another over their common modules.

        Args:
            other: Another RankMap or plain ``{name: rank}`` mapping (ranks must be ints; 0 is
                allowed, e.g. a module pruned by a training-time method).

        Returns:
            A :class:`RankMapComparison`; correlations are ``nan`` when undefined (see there).
        """
        other_ranks = {name: _validate_rank(name, r) for name, r in other.items()}
        common = [name for name in self._ranks if name in other_ranks]
        a = np.array([self._ranks[n] for n in common], dtype=np.int64)
        b = np.array([other_ranks[n] for n in common], dtype=np.int64)
        l1 = int(np.abs(a - b).sum())
        total = self.total_rank
        return RankMapComparison(
            spearman=spearman(a, b),
            kendall=kendall_tau_b(a, b),
            l1=l1,
            l1_normalised=l1 / total if total else math.nan,
            n_common=len(common),
            only_in_self=[n for n in self._ranks if n not in other_ranks],
            only_in_other=[n for n in other_ranks if n not in self._ranks],
        )

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"format": "fimlora.rankmap/1", "ranks": {...}, "metadata": {...}}`` (fresh copies)."""
        return {"format": FORMAT, "ranks": dict(self._ranks), "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankMap:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: The ``format`` field is missing or not ``"fimlora.rankmap/1"``, or
                ``ranks``/``metadata`` are malformed.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping with a 'format' field, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != FORMAT:
            found = "no 'format' field" if "format" not in data else f"format {fmt!r}"
            raise ValueError(f"not a RankMap: expected format {FORMAT!r}, found {found}")
        ranks = data.get("ranks")
        if not isinstance(ranks, Mapping):
            raise ValueError(f"RankMap 'ranks' must be a mapping, got {type(ranks).__name__}")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise ValueError(f"RankMap 'metadata' must be a mapping, got {type(metadata).__name__}")
        return cls(ranks, metadata)

    def save_json(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Write the map as JSON, atomically; creates the parent directory.

        Written with :func:`fimlora.io.atomic_write_text`, so a reader (or a crash) never sees a
        half-written file.

        Returns:
            The path written.
        """
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> RankMap:
        """Read a map written by :meth:`save_json`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: The file is not UTF-8 JSON or not a ``fimlora.rankmap/1`` document
                (the message names the path).
        """
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a rank map (not UTF-8 text: {err.reason})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    # -- figures ----------------------------------------------------------------------------
    def plot_heatmap(
        self,
        path: str | os.PathLike[str],
        *,
        title: str | None = None,
        scores: Mapping[str, float] | None = None,
    ) -> pathlib.Path:
        """Save a layers x kinds heatmap PNG; see :func:`fimlora.plot.plot_rank_heatmap`.

        Needs matplotlib (``pip install 'fimlora[plot]'``), imported only when called.
        """
        from fimlora.plot import plot_rank_heatmap

        return plot_rank_heatmap(self, path, title=title, scores=scores)


def _average_ranks(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # start[k] is True where a new run of equal values begins in sorted order.
    start = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    run_of_sorted = np.cumsum(start) - 1
    bounds = np.concatenate((np.flatnonzero(start), [len(x)]))
    # A run covering sorted positions [lo, hi) holds ranks lo+1 .. hi, whose mean is (lo+1+hi)/2.
    mean_rank = (bounds[:-1] + 1 + bounds[1:]) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[run_of_sorted]
    return ranks


def _paired_arrays(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``a`` and ``b`` as 1-D arrays of one length (ValueError otherwise)."""
    x, y = np.asarray(a), np.asarray(b)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
    return x, y


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman's rho of two paired samples: Pearson's r of their average ranks (ties share the mean rank).

    Args:
        a, b: paired values, shape ``(n,)`` each (ints or floats; the ranks of a map, or any scores).

    Returns:
        rho in [-1, 1]; ``nan`` if n < 2 or either side is constant (no ranking to correlate).
    """
    x, y = _paired_arrays(a, b)
    if len(x) < 2:
        return math.nan
    ra = _average_ranks(x) - (len(x) + 1) / 2.0  # the mean of average ranks is always (n+1)/2
    rb = _average_ranks(y) - (len(y) + 1) / 2.0
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    if denom == 0.0:
        return math.nan
    # Clip: rounding can push a perfect correlation a hair past 1.
    return float(np.clip(float(ra @ rb) / denom, -1.0, 1.0))


def kendall_tau_b(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Kendall's tau-b of two paired samples: (concordant - discordant) / sqrt((n0 - ties_a) * (n0 - ties_b)).

    O(n^2) time over all pairs, in row blocks so memory stays O(n * block). Pairs tied on both
    sides count in both tie totals, as tau-b prescribes.

    Args:
        a, b: paired values, shape ``(n,)`` each (ints or floats).

    Returns:
        tau-b in [-1, 1]; ``nan`` if either side has no untied pair.
    """
    x, y = _paired_arrays(a, b)
    n = len(x)
    n0 = n * (n - 1) // 2
    s = ties_a = ties_b = 0
    for lo in range(0, n, _KENDALL_BLOCK):
        hi = min(lo + _KENDALL_BLOCK, n)
        sa = np.sign(x[lo:hi, None] - x[None, :])
        sb = np.sign(y[lo:hi, None] - y[None, :])
        # Summing over all ordered pairs counts each unordered pair twice; the diagonal
        # (i == j) contributes 0 to s but n "ties", removed below.
        s += int((sa * sb).sum())
        ties_a += int((sa == 0).sum())
        ties_b += int((sb == 0).sum())
    s //= 2
    ties_a = (ties_a - n) // 2
    ties_b = (ties_b - n) // 2
    denom = math.sqrt(float(n0 - ties_a) * float(n0 - ties_b))
    if denom == 0.0:
        return math.nan
    return float(np.clip(s / denom, -1.0, 1.0))
