"""The user's options, checked before the model loads (or wrapped into one-line errors when a method
applies them): each message names the option, its flag and its config path.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any

from torch import nn

from fimlora.errors import DataError, UsageError
from fimlora.initialize import plan_rank_map
from fimlora.methods.base import RankMethod, method_run_options
from fimlora.models import model_skeleton
from fimlora.peft_glue import lora_modules, module_shapes
from fimlora.run_config import RunConfig

_FIM_BOUND_FIELDS = ("r_min", "r_max", "budget_ranks", "budget_params")


def _flag(field: str) -> str:
    """The command-line flag of a run option, for messages (the library sits below the CLI's option code)."""
    return "--" + field.replace("_", "-")


_LORA_FLAGS = {
    "r": "--r",
    "alpha": "--lora-alpha",
    "dropout": "--lora-dropout",
    "target_modules": "--target-modules",
    "use_rslora": "--use-rslora",
}


def check_lora_spec(run: RunConfig) -> None:
    """The LoRA options PEFT checks only when it builds the layers (or not at all), checked up front."""
    spec = run.lora

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    targets = spec.target_modules
    problems = {
        "r": (isinstance(spec.r, int) and not isinstance(spec.r, bool) and spec.r >= 1, "a positive integer"),
        "alpha": (number(spec.alpha) and math.isfinite(spec.alpha), "a finite number"),
        "dropout": (number(spec.dropout) and 0 <= spec.dropout <= 1, "a number in [0, 1]"),
        "target_modules": (
            (isinstance(targets, str) and bool(targets.strip()))
            or (isinstance(targets, list) and bool(targets) and all(isinstance(t, str) for t in targets)),
            '"all-linear" or a list of module names',
        ),
        "use_rslora": (isinstance(spec.use_rslora, bool), "true or false"),
    }
    for name, (ok, expected) in problems.items():
        if not ok:
            raise UsageError(
                f"invalid LoRA option: `{name}` must be {expected}, got {getattr(spec, name)!r}; "
                f"fix {_LORA_FLAGS[name]} (lora.{name})"
            )


def check_data_options(run: RunConfig) -> None:
    """Sizes that would fail only after the model loads (max_length) or silently cut rows (negative)."""
    spec = run.data
    minimum = {"max_length": 2, "max_train": 0, "max_eval": 0}
    for name, low in minimum.items():
        value = getattr(spec, name)
        if value is None and name != "max_length":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(
                f"invalid data option: `{name}` must be an integer >= {low}, got {value!r}; "
                f"fix {_flag(name)} (data.{name})"
            )


def allocation_error(error: ValueError) -> str:
    """The allocator's one-line reason, plus the flags that change the bounds or the budget it names."""
    reason = " ".join(str(error).split())
    named = [f for f in _FIM_BOUND_FIELDS if re.search(rf"\b{f}\b", reason)]
    if "bounds" in reason:
        named += [f for f in ("r_min", "r_max") if f not in named]
    flags = ", ".join(f"{_flag(f)} (fim.{f})" for f in named or _FIM_BOUND_FIELDS)
    return f"{reason}; fix with {flags}"


def target_modules_error(run: RunConfig, model: nn.Module, error: ValueError) -> str:
    """PEFT's reason the target modules select nothing it can adapt, plus names that would work."""
    message = str(error)
    unsupported = re.match(r"Target module (\w+)", message) if "is not supported" in message else None
    if unsupported:
        reason = f"{unsupported.group(1)} layers cannot carry LoRA"
    else:
        reason = message.splitlines()[0].split(". ")[0] if message else type(error).__name__
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    names = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear))
    targets = run.lora.target_modules
    shown = targets if isinstance(targets, str) else " ".join(map(str, targets))
    return (
        f"--target-modules {shown} (lora.target_modules): {reason}; pass names of {run.model}'s linear "
        f"layers, e.g. {' '.join(names[:8]) or 'query value'}, or all-linear"
    )


def check_adapter_plan(
    run: RunConfig, lora_config: Any, num_labels: int | None, *, method: RankMethod | None
) -> None:
    """Wrap a weightless (meta-device) copy of the model with the run's LoRA config, before the weights load.

    Target modules that select nothing LoRA can adapt, and rank bounds or a budget that the modules' shapes
    make infeasible fail here, in well under a second, instead of after loading the model and calibrating:
    the budget as ``method`` holds it (its ``check_budget``), or with ``method=None`` as ``run.fim`` plans it
    (``fimlora allocate``).
    """
    from peft import get_peft_model

    try:
        skeleton = model_skeleton(run.model, task=run.task, num_labels=num_labels, gguf_file=run.gguf_file)
    except UsageError:
        raise
    except Exception:  # an architecture that cannot be built on the meta device: the same problems are
        return  # still reported, when the method applies the options to the loaded model (UserOptionErrors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notices come once, from wrapping the real model
        try:
            wrapped = get_peft_model(skeleton, copy.deepcopy(lora_config))
        except ValueError as e:
            raise UsageError(target_modules_error(run, skeleton, e)) from None
        shapes = module_shapes(lora_modules(wrapped))
        check = getattr(method, "check_budget", None)
        try:
            if method is None:
                plan_rank_map(dict.fromkeys(shapes, 1.0), shapes, run.fim, r=lora_config.r)
            elif check is not None:
                check(shapes, int(lora_config.r))
        except ValueError as e:
            raise UsageError(allocation_error(e)) from None


class UserOptionErrors:
    """A rank method whose ``prepare`` reports a ValueError as the :class:`UsageError` it is.

    ``prepare`` is where a method applies the run's options to the model (PEFT target matching, rank
    bounds and budgets, schedules measured against the number of steps), so a ValueError there names an
    option to change. Everything else is delegated unchanged; errors raised while training are not touched.
    """

    def __init__(self, method: RankMethod, run: RunConfig) -> None:
        self._method = method
        self._run = run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def prepare(self, base_model: nn.Module, lora_config: Any, **kwargs: Any) -> nn.Module:
        try:
            return self._method.prepare(base_model, lora_config, **kwargs)
        except (UsageError, DataError):
            raise
        except ValueError as e:
            run, message = self._run, str(e)
            if "Target module" in message or "No modules were targeted" in message:
                raise UsageError(target_modules_error(run, base_model, e)) from None
            if method_run_options(run.method) & set(_FIM_BOUND_FIELDS) and any(
                re.search(rf"\b{f}\b", message) for f in _FIM_BOUND_FIELDS
            ):
                raise UsageError(allocation_error(e)) from None
            raise UsageError(
                f"cannot prepare method {run.method!r} with these options: {' '.join(message.split())} "
                "(method options are set with --set method_options.NAME=VALUE)"
            ) from None
