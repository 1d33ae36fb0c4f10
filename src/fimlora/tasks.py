"""Tasks: reading examples, tokenisation and collation, and evaluation.

Three tasks share one shape (examples -> token ids -> padded batches -> a metric):

* ``classification``: ``{"text"[, "text_pair"], "label"}`` -> ``AutoModelForSequenceClassification``
  batches; metric: accuracy.
* ``sft`` (causal-LM supervised fine-tuning): ``{"prompt", "completion"}``. Prompt and completion are
  tokenised separately and concatenated (``prompt ids + completion ids + EOS``); labels are -100 on the
  prompt and the padding, so the loss is on completion tokens only. Metric: completion loss/perplexity.
* ``multiple_choice`` (evaluation only): ``{"input", "choices", "answer"}``; each choice is scored by the
  summed log-likelihood of its tokens after the input (lm-evaluation-harness's ``acc``) and by that sum
  divided by the choice's length in bytes (``acc_norm``). Tokenised exactly like ``sft``, so a model
  fine-tuned with ``sft`` is scored on the same token boundaries it was trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.data import (
    DataError,
    load_builtin_dataset,
    load_classification_file,
    load_sft_file,
    read_records,
)
from fimlora.data.multiple_choice import read_bigbench_multiple_choice
from fimlora.errors import UsageError

__all__ = [
    "TASKS",
    "Collator",
    "DataSpec",
    "TaskData",
    "classification_collator",
    "encode_examples",
    "evaluate_classification",
    "evaluate_lm_loss",
    "load_multiple_choice",
    "load_task_data",
    "score_multiple_choice",
    "sft_collator",
]

TASKS: tuple[str, ...] = ("classification", "sft")
"""Trainable tasks; ``multiple_choice`` is evaluation-only."""

IGNORE_INDEX = -100
"""Label value that ``CrossEntropyLoss`` ignores (prompt and padding positions)."""

Batch = dict[str, torch.Tensor]
Collator = Callable[[Sequence[dict[str, Any]]], Batch]


@dataclass
class DataSpec:
    """Where the examples come from and how to read them."""

    train: str | None = None
    """Training data: a .csv/.tsv/.jsonl/.json file, a datasets.save_to_disk folder, or builtin:NAME."""

    eval: str | None = None
    """Evaluation data (same formats). Default for builtin:NAME: its test split; otherwise none."""

    text_column: str = "text"
    """Column with the text (classification)."""

    text_pair_column: str | None = None
    """Column with the second text of pair tasks (classification), if any."""

    label_column: str = "label"
    """Column with the label (classification): a name or an integer id."""

    label_names: list[str] | None = None
    """Label names in id order (classification). Default: inferred from the training labels."""

    prompt_column: str = "prompt"
    """Column with the prompt (sft)."""

    completion_column: str = "completion"
    """Column with the completion (sft); the loss is computed on these tokens only."""

    max_train: int | None = None
    """Keep at most this many training examples (a deterministic, label-stratified subsample for builtins)."""

    max_eval: int | None = None
    """Evaluate on at most this many examples (the first ones, in file order)."""

    max_length: int = 128
    """Truncate each tokenised example to this many tokens."""


@dataclass
class TaskData:
    """Examples for one run: training examples, evaluation examples, and label names (classification)."""

    task: str
    """``"classification"`` or ``"sft"``."""
    train: list[dict[str, Any]]
    """Training examples."""
    eval: list[dict[str, Any]]
    """Evaluation examples (may be empty)."""
    label_names: tuple[str, ...] | None = None
    """Label names in id order (classification only)."""
    name: str = ""
    """Where the data came from, for reports."""


def _builtin_name(spec: str) -> str | None:
    return spec.split(":", 1)[1] if spec.startswith("builtin:") else None


def load_task_data(task: str, spec: DataSpec, *, seed: int = 0, need_train: bool = True) -> TaskData:
    """Read the training and evaluation examples a :class:`DataSpec` names.

    ``builtin:NAME`` gives a builtin dataset's train split and (as eval) its test split, unless
    ``spec.eval`` names another file or ``builtin:NAME:dev``.

    Raises:
        UsageError: unknown task or builtin, no training data.
        DataError: missing file, missing column, empty file, unknown label (one line each).
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if spec.train is None and need_train:
        raise UsageError(
            "no training data: pass --data FILE (csv, jsonl, json, save_to_disk folder) or builtin:NAME"
        )
    label_names: tuple[str, ...] | None = tuple(spec.label_names) if spec.label_names else None
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    builtin = _builtin_name(spec.train) if spec.train else None
    if builtin is not None:
        if task != "classification":
            raise UsageError(
                f"builtin datasets are classification data; use --task classification for {spec.train}"
            )
        try:
            data = load_builtin_dataset(builtin, max_train=spec.max_train, seed=seed)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except ModuleNotFoundError as e:
            raise UsageError(str(e)) from None
        train, label_names = data.train, data.label_names
        eval_split = "test"
        if spec.eval and spec.eval.startswith("builtin:"):
            eval_split = spec.eval.rsplit(":", 1)[1] if spec.eval.count(":") == 2 else "test"
        if not spec.eval or spec.eval.startswith("builtin:"):
            evals = data.split(eval_split)
    elif spec.train is not None:
        train, label_names = _read_file(task, spec.train, spec, label_names)
        if spec.max_train is not None:
            train = train[: spec.max_train]
    if spec.eval and not spec.eval.startswith("builtin:"):
        evals, label_names = _read_file(task, spec.eval, spec, label_names)
    if spec.max_eval is not None:
        evals = evals[: spec.max_eval]
    return TaskData(
        task=task, train=train, eval=evals, label_names=label_names, name=spec.train or spec.eval or ""
    )


def _read_file(
    task: str, path: str, spec: DataSpec, label_names: tuple[str, ...] | None
) -> tuple[list[dict[str, Any]], tuple[str, ...] | None]:
    if task == "classification":
        examples, names = load_classification_file(
            path,
            text_column=spec.text_column,
            text_pair_column=spec.text_pair_column,
            label_column=spec.label_column,
            label_names=label_names,
        )
        return examples, names
    return load_sft_file(
        path, prompt_column=spec.prompt_column, completion_column=spec.completion_column
    ), None


def load_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """Read multiple-choice examples: a BIG-bench ``task.json``, or rows with ``input``, ``choices``, ``answer``.

    ``answer`` is the index of the right choice or the right choice's text.

    Raises:
        DataError: missing columns, fewer than two choices, an answer not among the choices.
    """
    p = Path(path)
    if p.name == "task.json":
        return read_bigbench_multiple_choice(p)
    rows = read_records(p)
    out = []
    for i, row in enumerate(rows, start=1):
        for column in ("input", "choices", "answer"):
            if column not in row:
                raise DataError(
                    f"{p}: row {i} has no column {column!r} (columns: {', '.join(row)}); multiple-choice rows need input, choices, answer"
                )
        choices = row["choices"]
        if isinstance(choices, str):
            try:
                choices = json.loads(choices) if choices.strip().startswith("[") else choices.split("|")
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{p}: row {i} choices {choices!r} are not a JSON list ({e.msg}); write them as "
                    '["a", "b"] or a|b|c'
                ) from None
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{p}: row {i} needs at least two choices (a JSON list, or a|b|c in CSV)")
        answer = row["answer"]
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        try:
            answer = int(answer)
        except (TypeError, ValueError):
            raise DataError(
                f"{p}: row {i} answer {row['answer']!r} is neither a choice nor an index"
            ) from None
        if not 0 <= answer < len(choices):
            raise DataError(f"{p}: row {i} answer {answer} is not an index into its {len(choices)} choices")
        out.append({"input": str(row["input"]), "choices": [str(c) for c in choices], "answer": answer})
    return out


# ---- tokenisation -------------------------------------------------------------------------------------


def encode_examples(
    task: str, examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Tokenise examples once, before training (collation then only pads).

    Returns:
        classification: ``{"input_ids", "attention_mask"[, "token_type_ids"], "labels": int}``;
        sft: ``{"input_ids", "labels"}`` with ``labels`` = -100 on prompt tokens.
    """
    if max_length < 2:
        raise UsageError(f"max_length must be >= 2, got {max_length}")
    if not examples:
        return []
    if task == "classification":
        return _encode_classification(examples, tokenizer, max_length)
    if task == "sft":
        return [
            _encode_prompt_completion(e["prompt"], e["completion"], tokenizer, max_length, add_eos=True)
            for e in examples
        ]
    raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _encode_classification(
    examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    texts = [e["text"] for e in examples]
    pairs = [e["text_pair"] for e in examples] if examples and "text_pair" in examples[0] else None
    enc = (
        tokenizer(texts, pairs, truncation=True, max_length=max_length)
        if pairs
        else tokenizer(texts, truncation=True, max_length=max_length)
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": int(e["label"])} for i, e in enumerate(examples)]


def _prompt_completion_ids(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (with the tokenizer's special prefix, e.g. BOS) and of its completion."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if (
        prompt_ids
        and tokenizer.eos_token_id is not None
        and prompt_ids[-1] == tokenizer.eos_token_id
        and len(prompt_ids) > 1
    ):
        prompt_ids = prompt_ids[
            :-1
        ]  # some tokenizers append EOS to every text; the prompt must not end there
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return prompt_ids, completion_ids


def _encode_prompt_completion(
    prompt: str, completion: str, tokenizer: Any, max_length: int, *, add_eos: bool
) -> dict[str, Any]:
    prompt_ids, completion_ids = _prompt_completion_ids(prompt, completion, tokenizer)
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    if not completion_ids:
        raise DataError(f"completion {completion!r} has no tokens; fill or remove the row")
    # Truncate the completion's end first only if it alone is too long; otherwise drop the prompt's start.
    completion_ids = completion_ids[: max_length - 1]
    keep_prompt = max(1, max_length - len(completion_ids))
    prompt_ids = prompt_ids[-keep_prompt:] if prompt_ids else []
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(completion_ids)),
    }


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def classification_collator(tokenizer: Any) -> Collator:
    """Pad encoded classification examples (right padding) into ``(batch, seq)`` tensors + ``labels (batch,)``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: Sequence[dict[str, Any]]) -> Batch:
        batch = {"input_ids": _pad([r["input_ids"] for r in rows], pad_id)}
        batch["attention_mask"] = _pad([r["attention_mask"] for r in rows], 0)
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = _pad([r["token_type_ids"] for r in rows], 0)
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return batch

    return collate


def sft_collator(tokenizer: Any) -> Collator:
    """Pad encoded SFT examples: ``input_ids``/``attention_mask``/``labels`` of shape ``(batch, seq)``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: Sequence[dict[str, Any]]) -> Batch:
        return {
            "input_ids": _pad([r["input_ids"] for r in rows], pad_id),
            "attention_mask": _pad([r["attention_mask"] for r in rows], 0),
            "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX),
        }

    return collate


def collator_for(task: str, tokenizer: Any) -> Collator:
    """The collator of a task."""
    return classification_collator(tokenizer) if task == "classification" else sft_collator(tokenizer)


# ---- evaluation --------------------------------------------------------------------------------------


def _batches(rows: Sequence[Any], batch_size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    encoded: Sequence[dict[str, Any]],
    collate: Collator,
    *,
    batch_size: int = 64,
    progress: bool = False,
    predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of a sequence classifier on encoded examples.

    Args:
        predictions: also return each example's predicted and true label (in ``encoded`` order), so two
            models evaluated on the same examples can be compared pair by pair (McNemar).

    Returns:
        ``{"accuracy", "loss", "n"}`` (+ ``"predictions"``, ``"labels"``: lists of n ints).
    """
    if not encoded:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct, loss_sum, n = 0, 0.0, 0
    predicted: list[int] = []
    for rows in _maybe_tqdm(
        _batches(encoded, batch_size), progress, math.ceil(len(encoded) / batch_size), "eval"
    ):
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        out = model(**batch)
        labels = batch["labels"]
        argmax = out.logits.argmax(-1)
        correct += int((argmax == labels).sum())
        loss_sum += float(nn.functional.cross_entropy(out.logits.float(), labels, reduction="sum"))
        n += len(rows)
        if predictions:
            predicted += argmax.tolist()
    model.train(was_training)
    result: dict[str, Any] = {"accuracy": correct / n, "loss": loss_sum / n, "n": n}
    if predictions:
        result |= {"predictions": predicted, "labels": [int(r["labels"]) for r in encoded]}
    return result


@torch.no_grad()
def evaluate_lm_loss(
    model: nn.Module,
    encoded: Sequence[dict[str, Any]],
    collate: Collator,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:
    """Mean per-token loss on completion tokens (labels != -100) and its perplexity.

    Returns:
        ``{"loss", "perplexity", "tokens", "n"}``.
    """
    if not encoded:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0, "n": 0}
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total, tokens = 0.0, 0
    for rows in _maybe_tqdm(
        _batches(encoded, batch_size), progress, math.ceil(len(encoded) / batch_size), "eval"
    ):
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, count = _token_nll(logits, batch["labels"])
        total += float(nll.sum())
        tokens += int(count.sum())
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "n": len(encoded)}


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL of the labelled next tokens and their counts.

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` with -100 where no loss is taken (label at t is predicted from t-1).

    Returns:
        ``(nll (batch,), counts (batch,))``.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    logp = torch.log_softmax(shift_logits, dim=-1)
    picked = logp.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(-1), mask.sum(-1)


@torch.no_grad()
def score_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    max_length: int = 512,
    batch_size: int = 16,
    delimiter: str = " ",
    progress: bool = False,
) -> dict[str, Any]:
    """Score every choice by its log-likelihood after the input; pick the most likely.

    ``choice`` is appended to ``input`` after ``delimiter`` (unless the input already ends in whitespace),
    and tokenised as an ``sft`` completion (no EOS).

    Returns:
        ``{"accuracy", "accuracy_norm", "n", "predictions": [int], "predictions_norm": [int]}``;
        ``accuracy_norm`` divides each log-likelihood by the choice's UTF-8 length (lm-eval's acc_norm).
    """
    if not examples:
        raise DataError("no multiple-choice examples to score")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = []
    for ex_index, ex in enumerate(examples):
        for choice in ex["choices"]:
            sep = "" if ex["input"].endswith((" ", "\n")) or choice.startswith((" ", "\n")) else delimiter
            enc = _encode_prompt_completion(ex["input"], sep + choice, tokenizer, max_length, add_eos=False)
            items.append((ex_index, len((sep + choice).encode("utf-8")), enc))
    loglik: list[float] = []
    for rows in _maybe_tqdm(
        _batches(items, batch_size), progress, math.ceil(len(items) / batch_size), "score"
    ):
        input_ids = _pad([r[2]["input_ids"] for r in rows], pad_id).to(device)
        mask = _pad([r[2]["attention_mask"] for r in rows], 0).to(device)
        labels = _pad([r[2]["labels"] for r in rows], IGNORE_INDEX).to(device)
        nll, _ = _token_nll(model(input_ids=input_ids, attention_mask=mask).logits, labels)
        loglik.extend((-nll).tolist())
    model.train(was_training)
    preds, preds_norm, start = [], [], 0
    for ex in examples:
        k = len(ex["choices"])
        ll = loglik[start : start + k]
        lengths = [items[start + j][1] for j in range(k)]
        preds.append(max(range(k), key=lambda j: ll[j]))
        preds_norm.append(max(range(k), key=lambda j: ll[j] / max(lengths[j], 1)))
        start += k
    answers = [ex["answer"] for ex in examples]
    n = len(examples)
    return {
        "accuracy": sum(p == a for p, a in zip(preds, answers, strict=True)) / n,
        "accuracy_norm": sum(p == a for p, a in zip(preds_norm, answers, strict=True)) / n,
        "n": n,
        "predictions": preds,
        "predictions_norm": preds_norm,
    }


def _maybe_tqdm(it: Iterable[Any], enabled: bool, total: int, desc: str) -> Iterable[Any]:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)
