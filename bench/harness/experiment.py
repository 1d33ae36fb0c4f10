"""Declarative experiment specs: one :class:`RunSpec` per training run, a :class:`ExperimentGrid` per sweep.

A grid is the cartesian product of its axes (models x tasks x budgets x seeds x methods). Every run gets a
stable ``run_id`` derived from the sha1 of its canonical JSON, so the same spec always maps to the same
result file and a sweep can be resumed after a crash (see ``store.py`` and ``runner.py``).

Method names are checked against fimlora's method registry (:func:`known_methods`); that check is the one
place the harness loads fimlora's methods (and so torch), when a spec or grid is built, never on import.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "METHOD_VARIANTS",
    "ExperimentGrid",
    "FrozenMapping",
    "RunSpec",
    "check_methods",
    "known_methods",
]

METHOD_VARIANTS: Mapping[str, str] = MappingProxyType({"fim-variance": "fim"})
"""Bench methods that are a registered fimlora method with fixed options -> that method
(``fim-variance`` is ``fim`` with ``score="variance"``; see ``bench.suites.budget.method_settings``)."""


def known_methods() -> frozenset[str]:
    """Every method a spec may name: fimlora's registry (:func:`fimlora.methods.available_methods`) plus
    :data:`METHOD_VARIANTS`.

    Read on each call, so a method registered later counts. Imports ``fimlora.methods`` (torch, PEFT).
    """
    from fimlora.methods import available_methods

    return frozenset(available_methods()) | frozenset(METHOD_VARIANTS)


def check_methods(names: Iterable[str], field_name: str) -> None:
    """Raise ``ValueError`` naming ``field_name`` if any of ``names`` is not in :func:`known_methods`.

    A grid naming an unknown method is almost always a typo ("fim_variance"), and catching it before
    hours of training is the point of validating.
    """
    known = known_methods()
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"`{field_name}` has unknown method(s) {unknown}; known (fimlora's method registry and bench's "
            f"variants {sorted(METHOD_VARIANTS)}): {sorted(known)}"
        )


# Characters allowed in the readable run-id prefix; anything else (e.g. "/" in "glue/sst2") would make
# the id unusable as a file name.
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class FrozenMapping(Mapping[str, Any]):
    """An immutable, hashable mapping with JSON-like values (nested dicts/lists are frozen too).

    Args:
        data: Mapping to freeze. Keys must be strings; values JSON-like (dicts, lists, scalars).
    """

    __slots__ = ("_items",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        items = {} if data is None else data
        for key in items:
            if not isinstance(key, str):
                raise TypeError(f"override keys must be strings, got {key!r}")
        # Sorted so that equality, hashing and JSON do not depend on insertion order.
        self._items: tuple[tuple[str, Any], ...] = tuple((key, _freeze(items[key])) for key in sorted(items))

    def __getitem__(self, key: str) -> Any:
        for item_key, value in self._items:
            if item_key == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMapping):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self.to_json() == _thaw(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMapping({self.to_json()!r})"

    def to_json(self) -> dict[str, Any]:
        """Return a plain, JSON-serialisable ``dict`` copy (tuples become lists)."""
        return {key: _thaw(value) for key, value in self._items}


def _freeze(value: Any) -> Any:
    """Recursively turn dicts into :class:`FrozenMapping` and lists into tuples, so values hash."""
    if isinstance(value, FrozenMapping):
        return value
    if isinstance(value, Mapping):
        return FrozenMapping(value)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"override values must be JSON-like, got {type(value).__name__}: {value!r}")


def _thaw(value: Any) -> Any:
    """Inverse of :func:`_freeze`: back to plain dicts and lists."""
    if isinstance(value, FrozenMapping):
        return value.to_json()
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value


def _canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: the same data always gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the benchmark.

    Attributes:
        suite: Benchmark suite name, e.g. ``"glue-small"``.
        task: Task within the suite, e.g. ``"sst2"``.
        model: Model identifier or path.
        method: Rank-allocation method, one of :func:`known_methods`.
        budget: Budget label, e.g. ``"r2"``/``"r8"`` (average rank) or ``"p1.3M"`` (parameters).
        seed: Random seed; paired comparisons pair runs by this value.
        overrides: Extra settings (learning rate, ``r_min``...). Accepts any mapping; stored frozen so the
            spec is hashable. Part of ``run_id``, so an ablation is a distinct run.
    """

    suite: str
    task: str
    model: str
    method: str
    budget: str
    seed: int
    overrides: Mapping[str, Any] = field(default_factory=FrozenMapping)

    def __post_init__(self) -> None:
        for name in ("suite", "task", "model", "method", "budget"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
        check_methods([self.method], "method")
        # bool is an int subclass; seed=True is a bug, not seed 1.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"`overrides` must be a mapping, got {type(self.overrides).__name__}")
        # frozen=True forbids normal assignment; this is the documented way to normalise in __post_init__.
        object.__setattr__(self, "overrides", FrozenMapping(self.overrides))

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain JSON-serialisable dict (the form stored in records)."""
        overrides = self.overrides
        return {
            "suite": self.suite,
            "task": self.task,
            "model": self.model,
            "method": self.method,
            "budget": self.budget,
            "seed": self.seed,
            "overrides": overrides.to_json() if isinstance(overrides, FrozenMapping) else dict(overrides),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """Rebuild a spec from :meth:`to_dict` output (e.g. the ``spec`` field of a record)."""
        return cls(
            suite=data["suite"],
            task=data["task"],
            model=data["model"],
            method=data["method"],
            budget=data["budget"],
            seed=data["seed"],
            overrides=data.get("overrides") or {},
        )

    @property
    def run_id(self) -> str:
        """Stable, file-name-safe id: ``task-method-budget-s{seed}-<sha1[:8]>``.

        The hash covers every field (suite, model and overrides included), so two specs share an id only
        if they are equal; the prefix is there for humans listing the results directory.
        """
        digest = hashlib.sha1(_canonical_json(self.to_dict()).encode("ascii")).hexdigest()[:8]
        prefix = f"{self.task}-{self.method}-{self.budget}-s{self.seed}"
        return f"{_UNSAFE_ID_CHARS.sub('_', prefix)}-{digest}"


_GRID_FIELDS = ("suite", "models", "tasks", "methods", "budgets", "seeds", "overrides", "method_overrides")


@dataclass
class ExperimentGrid:
    """A sweep: the cartesian product of its axes.

    Attributes:
        suite: Suite name shared by every run.
        models: Models to run.
        tasks: Tasks to run.
        methods: Methods to compare (include ``"uniform"``: it is the baseline of every comparison).
        budgets: Budget labels.
        seeds: Seeds; use the same seeds for every method so runs can be paired.
        overrides: Settings applied to every run.
        method_overrides: Per-method settings, merged over ``overrides`` (method wins on conflicts).
    """

    suite: str
    models: list[str]
    tasks: list[str]
    methods: list[str]
    budgets: list[str]
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.suite, str) or not self.suite:
            raise ValueError(f"`suite` must be a non-empty string, got {self.suite!r}")
        for name in ("models", "tasks", "methods", "budgets"):
            _check_axis(name, getattr(self, name), str)
        _check_axis("seeds", self.seeds, int)
        check_methods(self.methods, "methods")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"`overrides` must be a mapping, got {type(self.overrides).__name__}")
        if not isinstance(self.method_overrides, dict):
            raise ValueError("`method_overrides` must be a mapping of method -> mapping")
        for method, extra in self.method_overrides.items():
            if method not in self.methods:
                raise ValueError(f"`method_overrides` names {method!r}, which is not in `methods`")
            if not isinstance(extra, dict):
                raise ValueError(f"`method_overrides.{method}` must be a mapping")

    def expand(self) -> list[RunSpec]:
        """Return every run of the grid in a deterministic order.

        Order is model, task, budget, seed, then method (innermost), so that a sweep interrupted halfway
        has already finished all methods for its first seeds: partial results are pairable.
        """
        specs = []
        for model, task, budget, seed, method in itertools.product(
            self.models, self.tasks, self.budgets, self.seeds, self.methods
        ):
            overrides = {**self.overrides, **self.method_overrides.get(method, {})}
            specs.append(RunSpec(self.suite, task, model, method, budget, seed, overrides))
        return specs

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentGrid:
        """Build a grid from a mapping, rejecting unknown or missing keys by name."""
        if not isinstance(data, Mapping):
            raise ValueError(f"grid must be a mapping at top level, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_GRID_FIELDS))
        if unknown:
            raise ValueError(f"unknown grid field(s) {unknown}; allowed: {list(_GRID_FIELDS)}")
        missing = [name for name in _GRID_FIELDS[:6] if name not in data]
        if missing:
            raise ValueError(f"missing grid field(s) {missing}")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentGrid:
        """Load a grid from ``.yaml``/``.yml`` (needs pyyaml) or ``.json``.

        Args:
            path: File whose top level is a mapping with the dataclass field names.

        Raises:
            ValueError: On an unsupported extension or an invalid grid (the message names the field).
        """
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            import yaml  # lazy: pyyaml is a bench/cli extra, not a core dependency

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"grid file must be .yaml, .yml or .json, got {path.name!r}")
        return cls.from_dict(data)


def _check_axis(name: str, values: Any, kind: type) -> None:
    """Validate one grid axis: a non-empty list of unique values of ``kind``."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"`{name}` must be a non-empty list, got {values!r}")
    for value in values:
        # bool is an int subclass but never a valid seed.
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
            raise ValueError(f"`{name}` entries must be {kind.__name__}, got {value!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` has duplicate entries: {values!r}")
