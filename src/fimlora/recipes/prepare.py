"""A run's options validated, its data, model and tokenizer loaded and its examples encoded: nothing
written. :func:`prepare_run` is the first step of every recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fimlora.config import FimConfig
from fimlora.errors import UsageError
from fimlora.methods.base import (
    RUN_OPTIONS,
    RankMethod,
    available_methods,
    get_method,
    method_parameters,
    method_run_options,
)
from fimlora.models import load_model_and_tokenizer, resolve_device
from fimlora.recipes.checks import (
    allocation_error,
    check_adapter_plan,
    check_data_options,
    check_lora_spec,
)
from fimlora.run_config import RunConfig
from fimlora.tasks import (
    TaskData,
    collator_for,
    encode_examples,
    evaluate_classification,
    evaluate_lm_loss,
    load_task_data,
)
from fimlora.training import TrainConfig


def build_lora_config(run: RunConfig) -> Any:
    """The ``peft.LoraConfig`` of a run (task type SEQ_CLS/CAUSAL_LM, so PEFT handles the head).

    Raises:
        UsageError: a LoRA option PEFT would reject only when it wraps the model (the message names the flag).
    """
    from peft import LoraConfig

    check_lora_spec(run)
    task_type = "SEQ_CLS" if run.task == "classification" else "CAUSAL_LM"
    targets = run.lora.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t for t in targets.replace(",", " ").split() if t]
    return LoraConfig(
        r=run.lora.r,
        lora_alpha=run.lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int, accepts float
        lora_dropout=run.lora.dropout,
        target_modules=targets,
        use_rslora=run.lora.use_rslora,
        task_type=task_type,
    )


def fim_config_of(run: RunConfig) -> FimConfig:
    """The run's :class:`fimlora.FimConfig`; its progress bar is shown only when the run's is."""
    return dataclasses.replace(run.fim, show_progress=run.fim.show_progress and run.train.progress)


def make_method(run: RunConfig) -> RankMethod:
    """Instantiate the run's method by name from the registry, with the run's one budget specification.

    A method gets a run-level value for each constructor parameter it names, unless ``method_options``
    sets it: ``fim_config`` the run's FimConfig (``fim`` and its controls ``random``, ``fim-shuffled``),
    ``seed`` the run's seed (the controls' random draw, so that every run seed draws another map). Every
    other method gets the run-level budget, bounds and calibration options it honours
    (:func:`run_budget_options`).

    Raises:
        UsageError: unknown method, options its constructor does not take, or a run-level option it
            does not use.
    """
    names = available_methods()
    if run.method not in names:
        raise UsageError(f"unknown method {run.method!r}; choose one of {', '.join(names)}")
    options = dict(run.method_options)
    named = method_parameters(run.method)
    run_values = {"fim_config": fim_config_of(run), "seed": run.seed}
    for key in named & run_values.keys():
        options.setdefault(key, run_values[key])
    routed = run_budget_options(run)  # checks the run's options against the method, for every method
    if "fim_config" not in named:  # the fim family reads them from its FimConfig
        options.update(routed)
    try:
        return get_method(run.method, **options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid options for method {run.method!r}: {' '.join(str(e).split())}") from None


def run_budget_options(run: RunConfig) -> dict[str, Any]:
    """The run-level budget, bounds and calibration options (``run.fim``'s :data:`RUN_OPTIONS`) as options of
    the run's method: every one it honours that the user set, and the budget unit always (that of an
    explicit budget, else ``budget_unit``), so that ``--budget-ranks``/``--budget-params`` mean the same
    for every method. ``method_options`` may set the same option only to the same value.

    Raises:
        UsageError: the user set an option that the method does not use, or set one twice differently.
    """
    honoured = method_run_options(run.method)
    defaults = FimConfig()
    given = {f: getattr(run.fim, f) for f in RUN_OPTIONS if getattr(run.fim, f) != getattr(defaults, f)}
    unused = sorted(f for f in given if f not in honoured)
    if unused:
        users = ", ".join(m for m in available_methods() if unused[0] in method_run_options(m))
        flag = "--" + unused[0].replace("_", "-")
        raise UsageError(
            f"method {run.method!r} does not use {flag} ({unused[0]}); remove it, or choose a method that "
            f"does: {users}"
        )
    routed = {f: v for f, v in given.items() if f != "budget_unit"}
    explicit_unit = "budget_unit" in given or bool(given.keys() & {"budget_ranks", "budget_params"})
    if "budget_unit" in honoured:
        fim = run.fim
        explicit = (
            "ranks" if fim.budget_ranks is not None else "params" if fim.budget_params is not None else None
        )
        routed["budget_unit"] = explicit or fim.budget_unit
    for field_name, value in routed.items():
        user_set = field_name in given or (field_name == "budget_unit" and explicit_unit)
        own = run.method_options.get(field_name, value)
        if user_set and own != value:
            raise UsageError(
                f"{field_name} is set twice for method {run.method!r}: {value!r} by the run and {own!r} in "
                "method_options; keep one"
            )
    return {f: v for f, v in routed.items() if f not in run.method_options}


@dataclass
class PreparedRun:
    """Everything a run needs, validated and loaded; nothing written yet."""

    run: RunConfig
    model: nn.Module
    tokenizer: Any
    data: TaskData
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    lora_config: Any
    train_config: TrainConfig
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)

    def make_method(self) -> RankMethod:
        """A fresh instance of the run's method (``fim`` gets the run's FimConfig)."""
        return make_method(self.run)

    def collate(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The run's collator (rows -> a padded batch with labels)."""
        return collator_for(self.run.task, self.tokenizer)

    def eval_fn(self, *, predictions: bool = False) -> Callable[[nn.Module], dict[str, Any]] | None:
        """Evaluation on the run's eval split: accuracy (classification) or completion loss (sft).

        ``predictions``: classification also returns each example's predicted and true label.
        """
        if not self.eval_rows:
            return None
        collate = self.collate()
        rows, bs, progress = self.eval_rows, self.train_config.eval_batch_size, self.train_config.progress
        if self.run.task == "classification":
            return lambda model: evaluate_classification(
                model, rows, collate, batch_size=bs, progress=progress, predictions=predictions
            )
        return lambda model: evaluate_lm_loss(model, rows, collate, batch_size=bs, progress=progress)


def prepare_run(
    run: RunConfig, *, need_train: bool = True, fim_allocation: bool | None = None
) -> PreparedRun:
    """Validate and load a run's data, model and tokenizer; encode the examples. Writes nothing.

    Option checks come first: pure ones before anything is read, the ones that need module names and
    shapes on a weightless copy of the model, before its weights load.

    Args:
        run: the run.
        need_train: the run needs training data (False for evaluation only).
        fim_allocation: also check ``run.fim``'s rank bounds and budget against the model (default: when
            the run's method takes a ``fim_config``; :func:`allocate_run` always does).

    Raises:
        UsageError / DataError: anything the user must fix, before any output is written.
    """
    make_method(run)  # an unknown method or bad options fail here, before anything is loaded
    lora_config = build_lora_config(run)
    if fim_allocation is None:
        fim_allocation = "fim_config" in method_parameters(run.method)
    if fim_allocation:
        try:
            run.fim.resolved_bounds(run.lora.r)
        except ValueError as e:
            raise UsageError(allocation_error(e)) from None
    check_data_options(run)
    device = resolve_device(run.device)
    data = load_task_data(run.task, run.data, seed=run.seed, need_train=need_train)
    num_labels = len(data.label_names) if data.label_names else None
    check_adapter_plan(run, lora_config, num_labels, fim_allocation=fim_allocation)
    model, tokenizer = load_model_and_tokenizer(
        run.model,
        task=run.task,
        num_labels=num_labels,
        label_names=data.label_names,
        gguf_file=run.gguf_file,
        seed=run.seed,
        progress=run.train.progress,
    )
    train_rows = encode_examples(run.task, data.train, tokenizer, run.data.max_length)
    eval_rows = encode_examples(run.task, data.eval, tokenizer, run.data.max_length)
    return PreparedRun(
        run=run,
        model=model,
        tokenizer=tokenizer,
        data=data,
        train_rows=train_rows,
        eval_rows=eval_rows,
        lora_config=lora_config,
        train_config=run.train,
        device=device,
    )
