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
from fimlora.methods.base import RankMethod, available_methods, get_method, method_option_fields
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
    """Instantiate the run's method by name from the registry, with its options (:func:`method_fields`).

    Raises:
        UsageError: unknown method, options it does not take, or a run-level option it does not use.
    """
    names = available_methods()
    if run.method not in names:
        raise UsageError(f"unknown method {run.method!r}; choose one of {', '.join(names)}")
    fields = method_fields(run)
    try:
        return get_method(run.method, **fields)
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid options for method {run.method!r}: {' '.join(str(e).split())}") from None


_FLAGS = {"seed": "--fim-seed"}  # the CLI's name where it differs from the field's


def method_fields(run: RunConfig) -> dict[str, Any]:
    """The options of the run's method, one way for every method: ``method_options``, plus each field of
    the run's ``fim`` section (budget, bounds, calibration, FIM's own settings) that the user set and the
    method's options class has. Also, where the options class has the field: ``budget_unit`` always (that of
    an explicit budget, else ``fim.budget_unit``), so that ``--budget-ranks``/``--budget-params`` mean the same
    for every method; ``show_progress`` from the run's; ``draw_seed`` the run's seed (the controls' random
    draw, so that every run seed draws another map) unless ``method_options`` sets it.

    Raises:
        UsageError: the user set a ``fim`` option that the method does not have, or set an option both in
            ``fim`` and in ``method_options`` to different values.
    """
    fields = method_option_fields(run.method)
    fim, defaults = fim_config_of(run), FimConfig()
    given = {
        f.name: getattr(fim, f.name)
        for f in dataclasses.fields(FimConfig)
        if f.name != "show_progress" and getattr(fim, f.name) != getattr(defaults, f.name)
    }
    if unused := sorted(given.keys() - fields):
        name = unused[0]
        users = ", ".join(m for m in available_methods() if name in method_option_fields(m))
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        raise UsageError(
            f"method {run.method!r} does not use {flag} (fim.{name}); remove it, or choose a method that does: "
            f"{users or 'none'}"
        )
    routed = dict(given)
    if "budget_unit" in fields:
        explicit = (
            "ranks" if fim.budget_ranks is not None else "params" if fim.budget_params is not None else None
        )
        routed["budget_unit"] = explicit or fim.budget_unit
        user_unit = "budget_unit" in given or explicit is not None
        if not user_unit and "budget_unit" in run.method_options:
            del routed["budget_unit"]  # the method's own option stands where the run does not set one
    for name, value in routed.items():
        own = run.method_options.get(name, value)
        if own != value:
            raise UsageError(
                f"{name} is set twice for method {run.method!r}: {value!r} by the run (fim.{name}) and {own!r} "
                "in method_options; keep one"
            )
    defaults_of_run = {"show_progress": fim.show_progress, "draw_seed": run.seed}
    run_values = {k: v for k, v in defaults_of_run.items() if k in fields}
    return {**run_values, **routed, **run.method_options}


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


def prepare_run(run: RunConfig, *, need_train: bool = True, fim_allocation: bool = False) -> PreparedRun:
    """Validate and load a run's data, model and tokenizer; encode the examples. Writes nothing.

    Option checks come first: pure ones before anything is read, the ones that need module names and
    shapes on a weightless copy of the model, before its weights load.

    Args:
        run: the run.
        need_train: the run needs training data (False for evaluation only).
        fim_allocation: check ``run.fim``'s rank bounds and budget against the model (:func:`allocate_run`);
            otherwise the run's method checks its own budget (``check_budget``), both before the weights
            load.

    Raises:
        UsageError / DataError: anything the user must fix, before any output is written.
    """
    method = make_method(run)  # an unknown method or bad options fail here, before anything is loaded
    lora_config = build_lora_config(run)
    if fim_allocation:
        try:
            run.fim.resolved_bounds(run.lora.r)
        except ValueError as e:
            raise UsageError(allocation_error(e)) from None
    check_data_options(run)
    device = resolve_device(run.device)
    data = load_task_data(run.task, run.data, seed=run.seed, need_train=need_train)
    num_labels = len(data.label_names) if data.label_names else None
    check_adapter_plan(run, lora_config, num_labels, method=None if fim_allocation else method)
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
