"""``fimlora eval``: a base model plus a saved adapter, evaluated on a data file."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fimlora.errors import UsageError
from fimlora.models import load_model_and_tokenizer, resolve_device
from fimlora.tasks import (
    TASKS,
    DataSpec,
    collator_for,
    encode_examples,
    evaluate_classification,
    evaluate_lm_loss,
    load_multiple_choice,
    load_task_data,
    score_multiple_choice,
)


@dataclass
class EvalConfig:
    """What ``fimlora eval`` evaluates and how. Each field's docstring is its --help text."""

    data: str = ""
    """Evaluation data (csv, tsv, jsonl, json, a save_to_disk folder, builtin:NAME[:dev])."""

    task: Literal["classification", "sft", "multiple_choice"] | None = None
    """Task: classification (accuracy), sft (completion loss) or multiple_choice; default: as trained."""

    model: str | None = None
    """Base model (default: the one the adapter was trained on)."""

    gguf_file: str | None = None
    """GGUF file name inside --model."""

    batch_size: int = 32
    """Examples per forward pass."""

    max_length: int | None = None
    """Tokens per example (default: as trained, else 512)."""

    max_eval: int | None = None
    """Evaluate the first N examples only."""

    device: str = "auto"
    """Device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""

    columns: DataSpec = field(default_factory=DataSpec)
    """Data columns (text/text_pair/label for classification, prompt/completion for sft)."""

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"`batch_size` must be a positive integer, got {self.batch_size!r}")
        for name in ("max_length", "max_eval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"`{name}` must be a positive integer or none, got {value!r}")


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file written next to an adapter (``task.json``, ``adapter_config.json``)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise UsageError(
            f"{path} is damaged ({reason}); it is written by `fimlora train`/save_pretrained: restore it or "
            "train again"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: holds a JSON {type(data).__name__}, not an object; restore it or train again"
        )
    return data


def _adapter_dir(path: Path) -> tuple[Path, dict[str, Any]]:
    """The adapter directory under ``path`` and the ``task.json`` written next to it by ``fimlora train``."""
    adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(
            f"{path} is not an adapter directory (no adapter_config.json); pass a `fimlora train` output or a "
            "directory written by save_pretrained"
        )
    info: dict[str, Any] = {}
    for candidate in (adapter / "task.json", adapter.parent / "task.json"):
        if candidate.is_file():
            info = _read_json_object(candidate)
            break
    return adapter, info


def evaluate_adapter(adapter: str | os.PathLike[str], config: EvalConfig) -> dict[str, Any]:
    """``fimlora eval``: load base model + adapter and evaluate it on a data file.

    Args:
        adapter: a ``fimlora train`` output directory or an adapter directory.
        config: the data, task, base model and batch settings.

    Returns:
        The metrics (see :func:`fimlora.tasks.evaluate_classification`, :func:`~fimlora.tasks.evaluate_lm_loss`,
        :func:`~fimlora.tasks.score_multiple_choice`) plus ``task``, ``adapter`` and ``data``.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    adapter_path, info = _adapter_dir(Path(adapter))
    data = config.data
    task = config.task or info.get("task") or "classification"
    if task not in (*TASKS, "multiple_choice"):
        raise UsageError(f"unknown task {task!r}; choose classification, sft or multiple_choice")
    base = (
        config.model
        or info.get("model")
        or _read_json_object(adapter_path / "adapter_config.json").get("base_model_name_or_path")
    )
    gguf_file = (
        config.gguf_file
        if config.gguf_file is not None
        else (info.get("gguf_file") if config.model is None else None)
    )
    length = config.max_length or info.get("max_length") or 512
    label_names = info.get("label_names")
    dev = resolve_device(config.device)
    if task == "multiple_choice":
        examples = load_multiple_choice(data)[: config.max_eval]
    else:
        spec = dataclasses.replace(
            config.columns,
            train=None,
            eval=data,
            label_names=list(label_names) if label_names else None,
            max_eval=config.max_eval,
            max_length=length,
        )
        if data.startswith("builtin:"):
            spec.train, spec.eval = ":".join(data.split(":")[:2]), data
        task_data = load_task_data(task, spec, need_train=False)
        examples, label_names = task_data.eval, task_data.label_names
        if not examples:
            raise UsageError(f"{data}: no evaluation examples")
    num_labels = len(label_names) if label_names else None
    net, tokenizer = load_model_and_tokenizer(
        base, task=task, num_labels=num_labels, label_names=label_names, gguf_file=gguf_file
    )
    try:
        peft_model = PeftModel.from_pretrained(net, str(adapter_path))
    except (ValueError, RuntimeError, OSError, SafetensorError) as e:  # SafetensorError: damaged weights
        raise UsageError(
            f"cannot load adapter {adapter_path} onto {base}: {(str(e).splitlines() or [''])[0]}; pass the base "
            "model it was trained on (--model) and an undamaged adapter directory"
        ) from None
    peft_model.to(dev)
    batch_size = config.batch_size
    if task == "multiple_choice":
        metrics = score_multiple_choice(
            peft_model, tokenizer, examples, max_length=length, batch_size=batch_size
        )
    else:
        rows = encode_examples(task, examples, tokenizer, length)
        collate = collator_for(task, tokenizer)
        if task == "classification":
            metrics = evaluate_classification(peft_model, rows, collate, batch_size=batch_size)
        else:
            metrics = evaluate_lm_loss(peft_model, rows, collate, batch_size=batch_size)
    return {"task": task, "adapter": str(adapter_path), "data": data, **metrics}
