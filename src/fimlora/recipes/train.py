"""``fimlora train`` and ``fimlora allocate``: train a prepared run and save its adapter, metrics and
provenance; or calibrate and write the FIM rank map only.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, cast

import torch

from fimlora.calibration import estimate_module_scores
from fimlora.errors import UsageError
from fimlora.initialize import plan_rank_map
from fimlora.io import OutputDir, atomic_write_json, atomic_write_text, write_provenance
from fimlora.methods.base import RankMethod
from fimlora.peft_glue import (
    axolotl_lora_config,
    lora_config_dict,
    lora_config_with_ranks,
    lora_modules,
    module_shapes,
)
from fimlora.rankmap import RankMap
from fimlora.recipes.checks import UserOptionErrors, allocation_error, target_modules_error
from fimlora.recipes.prepare import PreparedRun, fim_config_of, prepare_run
from fimlora.run_config import RunConfig
from fimlora.training import BatchPlan, TrainResult, train_adapter


def train_prepared(
    prepared: PreparedRun,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    desc: str | None = None,
    eval_predictions: bool = False,
) -> TrainResult:
    """Train a prepared run with a fresh instance of its method (the loop of ``fimlora train``/``demo``).

    ``eval_predictions``: classification evaluations also return each test example's predicted and true
    label (:func:`save_training_outputs` moves the final ones to ``predictions.json``).
    """
    run = prepared.run
    return train_adapter(
        prepared.model,
        prepared.lora_config,
        cast(RankMethod, UserOptionErrors(prepared.make_method(), run)),
        prepared.train_rows,
        prepared.collate(),
        prepared.train_config,
        seed=run.seed,
        device=prepared.device,
        eval_fn=prepared.eval_fn(predictions=eval_predictions),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        desc=desc or f"train {run.method}",
    )


_PER_EXAMPLE = ("predictions", "labels")


def save_training_outputs(out: Path, prepared: PreparedRun, result: TrainResult) -> dict[str, Any]:
    """Write adapter/, rank_map.json (+ heatmap), history.json, metrics.json, task.json and curves.

    Per-example predictions of the final evaluation (``train_prepared(eval_predictions=True)``) go to
    ``predictions.json`` (``{"predictions": [...], "labels": [...]}``, test-split order), not into the
    metrics; classification runs record their label counts (``label_counts``: train and eval).
    """
    result.model.save_pretrained(out / "adapter")  # type: ignore[operator]
    prepared.tokenizer.save_pretrained(out / "adapter")
    result.rank_map.save_json(out / "rank_map.json")
    run = prepared.run
    task_info = {
        "task": run.task,
        "label_names": list(prepared.data.label_names) if prepared.data.label_names else None,
        "max_length": run.data.max_length,
        "model": run.model,
        "gguf_file": run.gguf_file,
    }
    atomic_write_json(out / "task.json", task_info)
    evals = [(step, {k: v for k, v in m.items() if k not in _PER_EXAMPLE}) for step, m in result.evals]
    final = result.evals[-1][1] if result.evals else {}
    if all(k in final for k in _PER_EXAMPLE):
        atomic_write_json(out / "predictions.json", {k: final[k] for k in _PER_EXAMPLE}, indent=None)
    metrics = {
        "method": run.method,
        "seed": run.seed,
        "eval": evals[-1][1] if evals else {},
        "steps": result.steps,
        "trainable_params": result.trainable_params,
        "lora_params": result.lora_params,
        "prepare_seconds": result.prepare_seconds,
        "calibration_seconds": result.rank_map.metadata.get("calibration_seconds"),
        "train_seconds": result.train_seconds,
        "resumed_from": result.resumed_from,
        "train_examples": len(prepared.train_rows),
        "eval_examples": len(prepared.eval_rows),
    }
    if run.task == "classification":
        metrics["label_counts"] = {
            "train": _label_counts(prepared.train_rows),
            "eval": _label_counts(prepared.eval_rows),
        }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "history.json", {"losses": result.losses, "evals": evals}, indent=None)
    with contextlib.suppress(ImportError):  # matplotlib is an extra
        from fimlora.plot import plot_training_curves, smooth

        result.rank_map.plot_heatmap(out / "rank_map.png", title=f"{run.method} ranks")
        plot_training_curves({run.method: smooth(result.losses)}, out / "curves.png", title="training loss")
    return metrics


def _label_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """``{"0": count, "1": count, ...}`` of classification rows (label ids as JSON keys, in id order)."""
    counts: dict[int, int] = {}
    for row in rows:
        counts[int(row["labels"])] = counts.get(int(row["labels"]), 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def finetune(
    run: RunConfig, out_dir: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """``fimlora train``: prepare, train with the run's method, save the adapter, metrics and provenance.

    Checkpoints live in ``<parent>/.<name>.partial/checkpoints`` while training, so a killed run is
    resumed with ``resume=True``; the directory becomes ``out_dir`` only when the run succeeds.

    Returns:
        The metrics written to ``metrics.json``.
    """
    output = OutputDir(out_dir, overwrite=overwrite, resume=resume)
    prepared = prepare_run(run)
    with output as staging:
        if not (staging / "checkpoints").is_dir() and resume:
            print(f"fimlora: no checkpoint in {staging}; starting from step 0", flush=True)
        result = train_prepared(
            prepared, checkpoint_dir=staging / "checkpoints", resume=resume, eval_predictions=True
        )
        metrics = save_training_outputs(staging, prepared, result)
        write_provenance(staging, run.to_dict(), seed=run.seed, extra={"kind": "train"})
    return metrics


def allocate_run(
    run: RunConfig, out_dir: str | os.PathLike[str] | None = None, *, overwrite: bool = False
) -> RankMap:
    """``fimlora allocate``: calibrate on the first T training batches and compute the FIM rank map.

    Writes ``rank_map.json``, ``rank_map.png`` (ranks and scores side by side), ``scores.json``, the rank
    map as trainer configs (:func:`write_trainer_configs`) and the provenance files to ``out_dir`` when
    given. Nothing is trained.
    """
    from peft import get_peft_model

    output = OutputDir(out_dir, overwrite=overwrite) if out_dir is not None else None
    prepared = prepare_run(run, fim_allocation=True)
    fim_config = fim_config_of(run)
    torch.manual_seed(run.seed)
    try:  # checked on a weightless copy already; kept for architectures that copy could not be built for
        model = get_peft_model(prepared.model.to(prepared.device), prepared.lora_config)
    except ValueError as e:
        raise UsageError(target_modules_error(run, prepared.model, e)) from None
    plan = BatchPlan(len(prepared.train_rows), prepared.train_config.batch_size, run.seed)
    batches = plan.batches(
        prepared.train_rows, prepared.collate(), fim_config.calibration_batches, prepared.device
    )
    stats = estimate_module_scores(model, batches, fim_config)
    scores = stats.scores(fim_config.score, fim_config.aggregation)
    shapes = module_shapes(lora_modules(model))
    extra = dict(fim_config.extra, calibration_batches=stats.num_batches, calibration_seconds=stats.seconds)
    try:
        rank_map = plan_rank_map(scores, shapes, fim_config, r=prepared.lora_config.r, metadata=extra)
    except ValueError as e:  # bounds or budget the module shapes make infeasible
        raise UsageError(allocation_error(e)) from None
    if output is not None:
        with output as staging:
            rank_map.save_json(staging / "rank_map.json")
            stats.save_json(staging / "scores.json")
            ranked = lora_config_with_ranks(
                prepared.lora_config,
                rank_map,
                model=model,
                adjust_scaling_factors=fim_config.adjust_scaling_factors,
            )
            write_trainer_configs(staging, ranked)
            with contextlib.suppress(ImportError):  # matplotlib is an extra
                rank_map.plot_heatmap(staging / "rank_map.png", title="FIM-LoRA ranks", scores=scores)
            write_provenance(staging, run.to_dict(), seed=run.seed, extra={"kind": "allocate"})
    return rank_map


def write_trainer_configs(out: Path, config: Any) -> list[Path]:
    """Write a ``LoraConfig`` with per-module patterns as the configs trainers read.

    * ``lora_config.json``: PEFT's ``LoraConfig`` as JSON; ``LoraConfig(**LoraConfig.from_json_file(p))``
      loads it, and ``get_peft_model`` with it builds the adapter at the allocated ranks (HF ``Trainer``,
      TRL, ``accelerate``, torchrun scripts).
    * ``axolotl_lora.yaml``: the LoRA keys of an axolotl config (``lora_rank_pattern``/``lora_alpha_pattern``
      and the rest, see :func:`fimlora.peft_glue.axolotl_lora_config`), to merge into one. Not written,
      with a warning, when an alpha is not a whole number (axolotl's schema takes integers only).

    Returns:
        The files written.
    """
    written = [atomic_write_json(out / "lora_config.json", lora_config_dict(config))]
    try:
        axolotl = axolotl_lora_config(config)
    except ValueError as e:
        warnings.warn(f"axolotl_lora.yaml not written: {e}", stacklevel=2)
        return written
    try:
        import yaml
    except ImportError:  # JSON is YAML too; PyYAML only makes it look like the rest of an axolotl config
        body = json.dumps(axolotl, indent=2) + "\n"
    else:
        body = yaml.safe_dump(axolotl, sort_keys=False, width=1000)
    header = (
        "# LoRA keys for an axolotl config, written by `fimlora allocate`: merge them into your config\n"
        "# (base_model, datasets, ...). axolotl forwards lora_rank_pattern / lora_alpha_pattern to PEFT's\n"
        "# rank_pattern / alpha_pattern; each key matches exactly one module.\n"
    )
    written.append(atomic_write_text(out / "axolotl_lora.yaml", header + body))
    return written
