"""The planted suite as harness specs: one :class:`~bench.harness.RunSpec` per cell, and back.

A spec's ``suite`` is ``"planted"``, its ``task`` the pattern, ``budget`` ``"rN"``, ``seed`` the planting;
``overrides`` hold the strength and every setting that differs from :class:`bench.planted.cell.CellConfig`'s
defaults. The oracle is stored as method ``uniform`` with ``overrides.map = "oracle"`` (the harness's specs
accept registered methods only; :func:`cell_method` reads it back).

The grid is pattern x budget x seed x method, methods innermost, so that a sweep stopped halfway has every
map of its first plantings (pairable). Methods default to every registered method plus the oracle
(:func:`bench.planted.methods.planted_methods`): a method registered later joins without an edit here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.harness import RunSpec
from bench.suites import budget_rank

from .cell import CellConfig, CellData, run_cell
from .methods import ORACLE, planted_methods
from .patterns import PATTERNS

__all__ = [
    "DEFAULT_STRENGTHS",
    "SUITE",
    "cell_config",
    "cell_method",
    "planted_specs",
    "run_planted_spec",
]

SUITE = "planted"

DEFAULT_STRENGTHS: dict[str, float] = dict.fromkeys(PATTERNS, 0.3)
"""Strength per pattern (the planted singular values as a fraction of each module's largest), picked on
the dev pilot (docs/results/planted/README.md)."""

_CELL_KEYS = (
    "steps",
    "batch_size",
    "lr",
    "r_min",
    "r_max",
    "calibration_batches",
    "alpha_ratio",
    "dropout",
    "eval_split",
)


def cell_method(spec: RunSpec) -> str:
    """The map a spec trains: its method, or ``"oracle"`` (``overrides.map``)."""
    return ORACLE if spec.overrides.get("map") == ORACLE else spec.method


def cell_config(spec: RunSpec) -> CellConfig:
    """The :class:`CellConfig` of a planted spec.

    Raises:
        ValueError: another suite, a missing strength, or an unknown override.
    """
    if spec.suite != SUITE:
        raise ValueError(f"not a planted spec: suite {spec.suite!r}")
    unknown = sorted(set(spec.overrides) - {*_CELL_KEYS, "strength", "map"})
    if unknown:
        raise ValueError(
            f"unknown planted override(s) {unknown}; allowed: {sorted({*_CELL_KEYS, 'strength', 'map'})}"
        )
    if "strength" not in spec.overrides:
        raise ValueError("a planted spec needs overrides.strength")
    settings = {k: spec.overrides[k] for k in _CELL_KEYS if k in spec.overrides}
    return CellConfig(
        pattern=spec.task,
        strength=float(spec.overrides["strength"]),
        budget_rank=budget_rank(spec.budget),
        method=cell_method(spec),
        seed=spec.seed,
        **settings,
    )


def planted_specs(
    *,
    patterns: Sequence[str] = PATTERNS,
    budgets: Sequence[str] = ("r1", "r2", "r4"),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    methods: Iterable[str] | None = None,
    strengths: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
    model: str = "minilm",
) -> list[RunSpec]:
    """Every cell of a planted grid, in sweep order (pattern, budget, seed, then method).

    Args:
        patterns, budgets, seeds: the grid's axes.
        methods: maps to train (default: every registered method and the oracle).
        strengths: pattern -> strength (default :data:`DEFAULT_STRENGTHS`).
        settings: :class:`CellConfig` fields that differ from its defaults (e.g. ``eval_split="dev"``).
        model: the base model.
    """
    chosen = list(methods) if methods is not None else planted_methods()
    strength_of = {**DEFAULT_STRENGTHS, **dict(strengths or {})}
    extra = dict(settings or {})
    unknown = sorted(set(extra) - set(_CELL_KEYS))
    if unknown:
        raise ValueError(f"unknown cell setting(s) {unknown}; allowed: {list(_CELL_KEYS)}")
    specs = []
    for pattern, budget, seed, method in itertools.product(patterns, budgets, seeds, chosen):
        overrides = {**extra, "strength": float(strength_of[pattern])}
        if method == ORACLE:
            overrides["map"] = ORACLE
        specs.append(
            RunSpec(SUITE, pattern, model, "uniform" if method == ORACLE else method, budget, seed, overrides)
        )
    return specs


def run_planted_spec(spec: RunSpec, data: CellData) -> dict[str, Any]:
    """Run one planted spec on ``data`` (loaded once per sweep); the ``RunOutcome`` of :func:`run_cell`."""
    if spec.model != data.description.get("model"):
        raise ValueError(
            f"spec model {spec.model!r} but the data was loaded for {data.description.get('model')!r}"
        )
    return run_cell(cell_config(spec), data)
