"""The small protocol every rank-allocation method implements, and a registry to pick one by name.

A method owns the adapter's life cycle around an ordinary training loop::

    method = get_method("fim", budget_ranks=96)      # or get_method("fim", FimOptions(budget_ranks=96))
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

Every method is configured one way: one options dataclass per method (its ``options_class``), given to the
constructor as an object or as its fields (``Method(options)`` or ``Method(**fields)``). The run-level options
(the run's ``fim`` section: budget, bounds, calibration ...) reach a method as fields of the same names, so a
method honours exactly the run-level options its options class has (:func:`method_run_options`).

Methods that fix ranks before training derive from :class:`StaticRanksMethod` and write only
``set_ranks`` (how they choose and apply ranks). Methods that resize modules during training must reuse
:func:`fimlora.peft_glue.resize_lora_modules` and must leave the optimizer consistent (state carried over for
surviving columns, fresh for new ones).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from fimlora.calibration import LossFn  # loss_fn(model, batch) -> scalar loss, for every method
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = [
    "BUDGET_OPTIONS",
    "LossFn",
    "METHODS",
    "RUN_OPTIONS",
    "MethodBase",
    "Preparation",
    "RankMethod",
    "StaticRanksMethod",
    "available_methods",
    "get_method",
    "method_option_fields",
    "method_options_class",
    "method_run_options",
    "options_of",
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
        loss_fn: LossFn | None = None,
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


METHODS: dict[str, type[Any]] = {}
"""name -> method class; each class has an ``options_class`` (a dataclass) and takes ``(options, **fields)``."""

BUDGET_OPTIONS = ("budget_unit", "budget_ranks", "budget_params", "r_min", "r_max")
"""The one budget specification: its unit, a rank sum or a parameter count, and the rank bounds."""

RUN_OPTIONS = (*BUDGET_OPTIONS, "calibration_batches")
"""Run-level options (``FimConfig`` fields, ``fimlora train --budget-ranks`` ...) that mean the same for every
method that uses them. A method honours the ones its options class has as fields; giving a method one it does
not have is an error, never silently dropped."""

_Options = TypeVar("_Options")


def register_method(name: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: make a method available to :func:`get_method` and the CLI under ``name``.

    Raises:
        ValueError: the name is taken, or the class has no dataclass ``options_class``.
    """

    def deco(cls: type[Any]) -> type[Any]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if not dataclasses.is_dataclass(getattr(cls, "options_class", None)):
            raise ValueError(f"method {name!r} needs an `options_class` (a dataclass of its options)")
        METHODS[name] = cls
        return cls

    return deco


def options_of(options_class: type[_Options], options: _Options | None, fields: dict[str, Any]) -> _Options:
    """A method's options: ``options`` itself, or ``options_class(**fields)``; the one way every method is
    configured.

    Raises:
        ValueError: both given, an object of another class, or a field the class does not have (the message
            lists the valid ones).
    """
    if options is not None:
        if fields:
            raise ValueError(f"give an options object or its fields ({', '.join(sorted(fields))}), not both")
        if not isinstance(options, options_class):
            raise ValueError(f"options must be a {options_class.__name__}, got {type(options).__name__}")
        return options
    valid = {f.name for f in dataclasses.fields(options_class)}  # type: ignore[arg-type]
    if unknown := sorted(set(fields) - valid):
        raise ValueError(
            f"{options_class.__name__} has no option {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(sorted(valid))}"
        )
    return options_class(**fields)


def get_method(name: str, options: Any = None, **fields: Any) -> RankMethod:
    """Instantiate a method by name with its options object or their fields; unknown names list the
    available ones."""
    cls = _method_class(name)
    return cls(options, **fields)  # type: ignore[no-any-return]


def available_methods() -> list[str]:
    """Names of every registered method, after loading the built-in ones."""
    _load_builtin_methods()
    return sorted(METHODS)


def method_options_class(name: str) -> type[Any]:
    """The options dataclass of a registered method.

    Raises:
        ValueError: unknown method.
    """
    return _method_class(name).options_class  # type: ignore[no-any-return]


def method_option_fields(name: str) -> frozenset[str]:
    """The field names of a registered method's options class (what ``get_method(name, **fields)`` takes).

    Raises:
        ValueError: unknown method.
    """
    return frozenset(f.name for f in dataclasses.fields(method_options_class(name)))


def method_run_options(name: str) -> frozenset[str]:
    """The :data:`RUN_OPTIONS` that method ``name`` honours: those its options class has.

    Raises:
        ValueError: unknown method.
    """
    return method_option_fields(name) & frozenset(RUN_OPTIONS)


def _method_class(name: str) -> type[Any]:
    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def trainable_param_groups(model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """One group with every parameter that requires grad (the default for most methods)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters: is the adapter active and not in inference mode?"
        )
    return [{"params": params, "lr": lr, "weight_decay": weight_decay}]


@dataclass(frozen=True)
class Preparation:
    """What the training loop tells a method before training (the keyword arguments of ``prepare``)."""

    calibration_batches: Iterable[Any] | None = None
    """The first training batches, for a method that calibrates on them (None: none given)."""
    total_steps: int | None = None
    """Optimizer steps the run will take, for a method with a schedule (None: unknown)."""
    loss_fn: LossFn | None = None
    """``loss_fn(model, batch)``; None: the model's own ``.loss``."""


class MethodBase:
    """Base of the built-in methods: one options object (:attr:`options_class`, built by :func:`options_of`),
    and ``prepare`` handing :meth:`setup` a private copy of the LoRA config and the loop's :class:`Preparation`.
    """

    name = "base"
    options_class: ClassVar[type[Any]]

    def __init__(self, options: Any = None, **fields: Any) -> None:
        self.options = options_of(self.options_class, options, fields)

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: LossFn | None = None,
    ) -> nn.Module:
        """Wrap ``base_model`` with adapters (and calibrate, if the method does) before training."""
        prep = Preparation(calibration_batches, total_steps, loss_fn)
        return self.setup(base_model, copy.deepcopy(lora_config), prep)

    def setup(self, base_model: nn.Module, lora_config: Any, prep: Preparation) -> nn.Module:
        """What ``prepare`` does, with the method's own copy of ``lora_config``."""
        raise NotImplementedError

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """Raise ValueError when this method cannot meet its budget and bounds on modules of these shapes
        (``name -> (in, out)``) at LoRA rank ``r``. Pure: callers run it on a weightless copy of the model,
        before any weights load. The default has nothing to check (a method without a budget)."""

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """One group with every trainable parameter (a method with its own parameters overrides this)."""
        return trainable_param_groups(model, lr=lr, weight_decay=weight_decay)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """No term added to the loss (a regularised method overrides this)."""
        return None


class StaticRanksMethod(MethodBase):
    """Base for methods whose ranks are fixed before training (uniform, fim, gora, eva, ...): no penalty, no
    reallocation; the rank map set in ``prepare`` is checkpointed and returned by ``finalize``.

    A subclass sets ``options_class`` and writes :meth:`set_ranks` (and :meth:`check_budget` if it takes a
    budget); ``setup`` checks what every such method needs (calibration batches when it calibrates, no DoRA
    where it cannot keep it).
    """

    name = "static"
    needs_calibration: ClassVar[bool] = True
    """False: the method does not read calibration batches (``prepare`` accepts None)."""
    supports_dora: ClassVar[bool] = True
    """False: a LoRA config with ``use_dora`` is refused before the model is wrapped."""
    rank_map: RankMap | None = None

    def setup(self, base_model: nn.Module, lora_config: Any, prep: Preparation) -> nn.Module:
        """Wrap ``base_model`` with LoRA at the ranks this method chooses (see :meth:`set_ranks`).

        Raises:
            ValueError: no calibration batches for a method that calibrates, DoRA where it is not supported,
                or what ``set_ranks`` refuses (infeasible bounds or budget, ...).
        """
        if self.needs_calibration and prep.calibration_batches is None:
            raise ValueError(
                f"the {self.name!r} method needs calibration batches (the first T training batches)"
            )
        if not self.supports_dora and getattr(lora_config, "use_dora", False):
            raise ValueError(
                f"the {self.name!r} method sets plain LoRA ranks; DoRA adapters are not supported"
            )
        model, self.rank_map = self.set_ranks(base_model, lora_config, prep.calibration_batches, prep.loss_fn)
        return model

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        """Wrap ``base_model`` with PEFT (``lora_config`` is this method's own copy), choose and apply the ranks.

        Returns:
            the PEFT model at its ranks, and its rank map (metadata: how the ranks were chosen).
        """
        raise NotImplementedError

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
        "warmstart",
    ):
        try:
            importlib.import_module(f"fimlora.methods.{module}")
        except ModuleNotFoundError as e:  # a method module not written yet must not break the others
            if e.name != f"fimlora.methods.{module}":
                raise
