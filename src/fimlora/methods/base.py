"""The small protocol every rank-allocation method implements, and a registry to pick one by name.

A method owns the adapter's life cycle around an ordinary training loop::

    method = get_method("fim", fim_config=FimConfig())
    model = method.prepare(base_model, lora_config, calibration_batches=batches, total_steps=n)
    optimizer = torch.optim.AdamW(method.param_groups(model, lr=2e-4))
    for step, batch in enumerate(train_batches):
        loss = model(**batch).loss
        penalty = method.penalty(model)
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step(); optimizer.zero_grad()
        method.on_step_end(model, step, optimizer)   # may resize modules and fix optimizer state
    model, rank_map = method.finalize(model)          # a plain PEFT LoRA model and its ranks
    model.save_pretrained(out_dir)

Methods that resize modules during training must reuse :func:`fimlora.peft_glue.resize_lora_modules`
and must leave the optimizer consistent (state carried over for surviving columns, fresh for new ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fimlora.peft_glue import current_ranks, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = [
    "BUDGET_OPTIONS",
    "METHODS",
    "RUN_OPTIONS",
    "RankMethod",
    "StaticRanksMethod",
    "available_methods",
    "get_method",
    "method_parameters",
    "method_run_options",
    "register_method",
    "trainable_param_groups",
]


@runtime_checkable
class RankMethod(Protocol):
    """What the training loop needs from a rank-allocation method."""

    name: str

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        """Wrap ``base_model`` with adapters (and calibrate, if the method does) before training."""
        ...

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups (a method may give its own parameters their own learning rate)."""
        ...

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss at every step, or None."""
        ...

    def on_step_end(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        """Called after each optimizer step; returns the new map when ranks changed."""
        ...

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        """End training: return a plain PEFT LoRA model (loadable by vanilla PEFT) and its rank map."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Method state for checkpoints (e.g. a reallocation history); empty when stateless."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


METHODS: dict[str, Callable[..., RankMethod]] = {}

BUDGET_OPTIONS = ("budget_unit", "budget_ranks", "budget_params", "r_min", "r_max")
"""The one budget specification: its unit, a rank sum or a parameter count, and the rank bounds."""

RUN_OPTIONS = (*BUDGET_OPTIONS, "calibration_batches")
"""Run-level options (``FimConfig`` fields, ``fimlora train --budget-ranks`` ...) that mean the same for every
method that uses them. A method class lists the ones it honours in ``run_options``; giving a method one it
does not list is an error, never silently dropped."""


def register_method(name: str) -> Callable[[Callable[..., RankMethod]], Callable[..., RankMethod]]:
    """Class decorator: make a method available to :func:`get_method` and the CLI under ``name``."""

    def deco(factory: Callable[..., RankMethod]) -> Callable[..., RankMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = factory
        return factory

    return deco


def get_method(name: str, **options: Any) -> RankMethod:
    """Instantiate a method by name; unknown names list the available ones."""
    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**options)


def available_methods() -> list[str]:
    """Names of every registered method, after loading the built-in ones."""
    _load_builtin_methods()
    return sorted(METHODS)


def method_parameters(name: str) -> frozenset[str]:
    """The keyword parameters of a registered method's constructor (e.g. ``fim_config``, ``seed``).

    Callers give a method the run-level values it names (the run's FimConfig, its seed) and check the
    FIM bounds and budget up front for the methods that take a ``fim_config``.

    Raises:
        ValueError: unknown method.
    """
    import inspect

    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return frozenset(
        p.name
        for p in inspect.signature(METHODS[name]).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def method_run_options(name: str) -> frozenset[str]:
    """The :data:`RUN_OPTIONS` that method ``name`` honours (its class's ``run_options``).

    Raises:
        ValueError: unknown method.
    """
    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return frozenset(getattr(METHODS[name], "run_options", frozenset()))


def trainable_param_groups(model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """One group with every parameter that requires grad (the default for most methods)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters: is the adapter active and not in inference mode?"
        )
    return [{"params": params, "lr": lr, "weight_decay": weight_decay}]


class StaticRanksMethod:
    """Base for methods whose ranks are fixed before training (uniform, fim, eva): no penalty, no
    reallocation; the rank map set in ``prepare`` is checkpointed and returned by ``finalize``."""

    name = "static"
    rank_map: RankMap | None = None

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        return trainable_param_groups(model, lr=lr, weight_decay=weight_decay)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def on_step_end(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        return None

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        ranks = current_ranks(model)
        meta: dict[str, Any] = (
            dict(self.rank_map.metadata) if self.rank_map is not None else {"method": self.name}
        )
        shapes: dict[str, Any] = {n: list(s) for n, s in module_shapes(lora_modules(model)).items()}
        if self.rank_map is not None and self.rank_map.dropped:  # dropped modules stay in the map, at 0
            known = meta.get("shapes") or {}
            ranks = {n: ranks.get(n, 0) for n in self.rank_map}
            shapes = {n: shapes[n] if n in shapes else known.get(n) for n in self.rank_map}
            shapes = {n: s for n, s in shapes.items() if s is not None}
        meta["shapes"] = shapes
        return model, RankMap(ranks, metadata=meta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "rank_map": self.rank_map.to_dict() if self.rank_map is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state.get("rank_map")
        self.rank_map = RankMap.from_dict(data) if data else None


def _load_builtin_methods() -> None:
    # Imported lazily so that `fimlora.methods.base` stays import-light and free of cycles.
    import importlib

    for module in (
        "uniform",
        "fim",
        "l1ra",
        "lrlora",
        "adalora",
        "eva",
        "random_ranks",
        "fim_shuffled",
        "gora",
        "fim_spectrum",
    ):
        try:
            importlib.import_module(f"fimlora.methods.{module}")
        except ModuleNotFoundError as e:  # a method module not written yet must not break the others
            if e.name != f"fimlora.methods.{module}":
                raise
