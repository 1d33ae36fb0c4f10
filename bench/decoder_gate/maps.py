"""The gate's rank maps at one parameter budget: uniform, random, MLP-only and attention-only.

The gate asks whether *where* the rank goes matters on the decoder task: at uniform r2's parameter count
``P = 2 * sum_m (in_m + out_m)`` over every linear layer it trains

* ``uniform``: rank r on every module (defines P);
* ``random``: fimlora's ``random`` control (i.i.d. Exp(1) scores through the library's allocator, bounds
  ``[max(1, r // 2), 4r]``), one map per ``map_seed``;
* ``mlp`` / ``attention``: every rank on the MLP (gate, up, down) or the attention (q, k, v, o)
  projections, the other modules dropped (rank 0). Ranks are spread evenly over the kept modules by the
  library's exact allocator (:func:`fimlora.allocate_ranks`, equal scores, parameter budget P, least
  slack), and the map is applied by :func:`fimlora.apply_rank_map`.

Every map must spend P: :func:`check_equal_params` refuses a map whose LoRA parameters differ from P by a
rank of the cheapest module or more (the allocator's own slack bound), per run, before training. MLP-only
cannot hit P exactly on SmolLM2 (all MLP modules cost 2,112 per rank, and 2,112 does not divide P).

Methods are built only through :func:`fimlora.methods.get_method` with flat fields (:class:`GateMapMethod`
wraps the one it builds); the subset maps start from the library's ``uniform`` method and rebuild its
adapter at the map's ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fimlora import RankMap, allocate_ranks, apply_rank_map
from fimlora.methods import get_method
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes

__all__ = [
    "MAP_KINDS",
    "MODULE_KINDS",
    "GateMapMethod",
    "check_equal_params",
    "module_kind",
    "subset_rank_map",
]

MODULE_KINDS: Mapping[str, frozenset[str]] = {
    "attention": frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
    "mlp": frozenset({"gate_proj", "up_proj", "down_proj"}),
}
"""LLaMA-family projection names of each module kind."""

MAP_KINDS = ("uniform", "random", "mlp", "attention")
"""The maps the gate trains at one budget."""


def module_kind(name: str) -> str:
    """``"attention"`` or ``"mlp"`` for a LoRA module name (its last component).

    Raises:
        ValueError: a module of neither kind (the gate is defined for LLaMA-family layers).
    """
    leaf = name.rsplit(".", 1)[-1]
    for kind, leaves in MODULE_KINDS.items():
        if leaf in leaves:
            return kind
    raise ValueError(f"module {name!r} is neither attention nor MLP: the gate expects LLaMA-family names")


def subset_rank_map(shapes: Mapping[str, tuple[int, int]], r: int, kind: str) -> RankMap:
    """Uniform r's parameter budget spent on the modules of one kind only, the others at rank 0.

    Args:
        shapes: module -> (in_features, out_features), every adapted module.
        r: The uniform rank whose parameter count is the budget.
        kind: ``"mlp"`` or ``"attention"``.

    Returns:
        A map over every module of ``shapes``; kept modules at ranks within one of each other, the
        budget met with the least slack the allocator can reach.
    """
    if kind not in MODULE_KINDS:
        raise ValueError(f"`kind` must be one of {sorted(MODULE_KINDS)}, got {kind!r}")
    costs = {n: i + o for n, (i, o) in shapes.items()}
    budget = r * sum(costs.values())
    kept = {n: c for n, c in costs.items() if module_kind(n) == kind}
    if not kept:
        raise ValueError(f"no {kind} modules among the adapted ones")
    allocated = allocate_ranks(
        dict.fromkeys(kept, 1.0), budget_params=budget, costs=kept, r_min=1, r_max=max(1, budget)
    )
    ranks = {n: (allocated[n] if n in kept else 0) for n in shapes}
    return RankMap(ranks, metadata={"method": f"{kind}-only", "budget_params": budget, "r": r})


def check_equal_params(
    rank_map: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], r: int
) -> dict[str, int]:
    """Refuse a map that does not spend uniform r's LoRA parameters (within one rank of the cheapest module).

    Args:
        rank_map: module -> rank (0: dropped), every module of ``shapes``.
        shapes: module -> (in_features, out_features) of every adapted module.
        r: The uniform rank of the budget.

    Returns:
        ``{"lora_params", "uniform_lora_params", "slack"}``.

    Raises:
        ValueError: a module missing from the map, or a parameter count off by a cheapest rank or more.
    """
    missing = sorted(set(shapes) - set(rank_map))
    if missing:
        raise ValueError(f"the map leaves out {len(missing)} module(s), e.g. {missing[0]!r}")
    costs = {n: i + o for n, (i, o) in shapes.items()}
    uniform = r * sum(costs.values())
    spent = sum(int(rank_map[n]) * c for n, c in costs.items())
    slack = uniform - spent
    if not 0 <= slack < min(costs.values()):
        raise ValueError(
            f"unequal parameter budget: the map spends {spent:,} LoRA parameters, uniform r{r} {uniform:,} "
            f"(allowed: at most {min(costs.values()) - 1:,} fewer, never more)"
        )
    return {"lora_params": spent, "uniform_lora_params": uniform, "slack": slack}


class GateMapMethod:
    """One map of the gate, as a ``fimlora`` rank method checked to spend uniform r's LoRA parameters.

    ``uniform`` and ``random`` are the library's methods (``get_method``); ``mlp`` and ``attention`` are
    the library's ``uniform`` rebuilt at :func:`subset_rank_map` by :func:`fimlora.apply_rank_map`. Right
    after ``prepare`` (before any training step) the map is checked by :func:`check_equal_params`.

    Args:
        kind: One of :data:`MAP_KINDS`.
        map_seed: The random map's seed (``random`` only).
        seed: Seeds LoRA-A of the rebuilt modules (``mlp``, ``attention``).
    """

    def __init__(self, kind: str, *, map_seed: int = 0, seed: int = 0) -> None:
        if kind not in MAP_KINDS:
            raise ValueError(f"`kind` must be one of {MAP_KINDS}, got {kind!r}")
        self.kind = kind
        self.seed = seed
        self.inner: Any = _random_method(map_seed) if kind == "random" else get_method("uniform")
        self.name = f"{kind}-only" if kind in MODULE_KINDS else kind
        self.budget: dict[str, int] = {}
        self.planned: dict[str, int] = {}

    def prepare(self, base_model: Any, lora_config: Any, **kwargs: Any) -> Any:
        """Wrap (and calibrate, if the inner method does), rebuild at the subset map, check the budget.

        Raises:
            ValueError: the map does not spend uniform r's parameters (see :func:`check_equal_params`).
        """
        r = int(lora_config.r)
        model = self.inner.prepare(base_model, lora_config, **kwargs)
        # uniform and random (r_min >= 1) keep every targeted module: these are all of them
        shapes = module_shapes(lora_modules(model))
        if self.kind in MODULE_KINDS:
            apply_rank_map(model, subset_rank_map(shapes, r, self.kind), seed=self.seed)
        now = current_ranks(model)
        self.planned = {n: now.get(n, 0) for n in shapes}
        self.budget = check_equal_params(self.planned, shapes, r)
        return model

    def param_groups(self, model: Any, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """The inner method's groups."""
        groups: list[dict[str, Any]] = self.inner.param_groups(model, lr=lr, weight_decay=weight_decay)
        return groups

    def penalty(self, model: Any) -> Any:
        """The inner method's penalty (none: static maps)."""
        return self.inner.penalty(model)

    def on_step_end(self, model: Any, step: int, optimizer: Any) -> Any:
        """The inner method's hook (no reallocation: static maps)."""
        return self.inner.on_step_end(model, step, optimizer)

    def finalize(self, model: Any) -> tuple[Any, Any]:
        """The inner method's plain LoRA model and its map."""
        return self.inner.finalize(model)

    def state_dict(self) -> dict[str, Any]:
        """The inner method's state."""
        state: dict[str, Any] = self.inner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the inner method's state."""
        self.inner.load_state_dict(state)


def _random_method(map_seed: int) -> Any:
    """fimlora's ``random`` control at a parameter budget, its scores drawn from ``map_seed`` (``draw_seed``;
    the method's ``seed`` is LoRA-A's)."""
    return get_method("random", draw_seed=map_seed, budget_unit="params")
