"""Turn a :class:`~bench.harness.RunSpec` into a real training run through fimlora's Python API.

``run_spec(spec)`` builds the run's :class:`fimlora.run_config.RunConfig`, then calls
``prepare_run`` -> ``train_adapter`` (the same code path as ``fimlora train``) and returns the
harness's ``RunOutcome``: metrics, LoRA parameters, calibration/training seconds, peak memory, device,
and details (rank map, uniform LoRA's parameter count at the same budget, the ratio to it, losses).

``trainable_params`` in the outcome is the *LoRA* parameter count ``sum_m r_m (in_m + out_m)`` of the
final adapter, the quantity the budget constrains; the classifier head, identical for every method, is in
``extra.trainable_params_total``. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (reset per
run) and the process's peak resident set size on CPU (``ru_maxrss``: a high-water mark of the whole grid
process so far, not of this run alone).
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable
from typing import Any

from bench.harness import RunSpec

from .decoder import run_decoder_spec
from .encoder import run_config_for

__all__ = ["SUITES", "prepare_spec", "run_spec", "train_spec"]

SUITES: tuple[str, ...] = ("encoder", "decoder", "hf")


def _peak_memory(device: Any) -> int:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _device_label(device: Any) -> str:
    import torch

    if getattr(device, "type", "") == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def prepare_spec(spec: RunSpec) -> Any:
    """``fimlora.training.prepare_run`` of a classification spec (suites ``encoder``/``hf``)."""
    from fimlora.training import prepare_run

    run = run_config_for(
        spec.suite, spec.task, spec.model, spec.method, spec.budget, spec.seed, spec.overrides
    )
    return prepare_run(run)


def train_spec(spec: RunSpec, prepared: Any | None = None) -> tuple[Any, Any, Callable[..., Any] | None]:
    """Train a classification spec; returns ``(prepared, TrainResult, eval_fn)``."""
    import torch

    from fimlora.tasks import collator_for
    from fimlora.training import train_adapter

    prepared = prepared if prepared is not None else prepare_spec(spec)
    if prepared.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prepared.device)
    eval_fn = prepared.eval_fn()
    prepared.extra["uniform_lora_params"] = uniform_lora_params(prepared.model, prepared.lora_config)
    result = train_adapter(
        prepared.model,
        prepared.lora_config,
        prepared.make_method(),
        prepared.train_rows,
        collator_for(prepared.run.task, prepared.tokenizer),
        prepared.train_config,
        seed=spec.seed,
        device=prepared.device,
        eval_fn=eval_fn,
        desc=spec.run_id,
    )
    return prepared, result, eval_fn


def uniform_lora_params(base_model: Any, lora_config: Any) -> int:
    """LoRA parameters of uniform LoRA at ``lora_config.r`` on every targeted module: r * sum(in + out).

    Computed on a throw-away copy of the *base* model before training, because a method may drop
    modules altogether (AdaLoRA prunes some to rank 0), so the final adapter under-counts the targets.
    """
    import copy

    from peft import get_peft_model

    from fimlora.peft_glue import lora_modules, module_shapes

    wrapped = get_peft_model(copy.deepcopy(base_model), copy.deepcopy(lora_config))
    return int(lora_config.r) * sum(i + o for i, o in module_shapes(lora_modules(wrapped)).values())


def outcome_of(spec: RunSpec, prepared: Any, result: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """The harness ``RunOutcome`` of a finished run."""
    uniform = prepared.extra["uniform_lora_params"]
    calib = result.rank_map.metadata.get("calibration_seconds")
    losses = [loss for _, loss in result.losses]
    tail = losses[-10:]
    return {
        "metrics": {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)
        },
        "trainable_params": int(result.lora_params),
        # Wall time of method.prepare: adapter creation plus calibration (fim) or EVA's SVDs.
        "calibration_seconds": float(result.prepare_seconds),
        "train_seconds": float(result.train_seconds),
        "peak_memory_bytes": _peak_memory(prepared.device),
        "device": _device_label(prepared.device),
        "extra": {
            "lora_params": int(result.lora_params),
            "uniform_lora_params": int(uniform),
            "lora_param_ratio": result.lora_params / uniform if uniform else None,
            "trainable_params_total": int(result.trainable_params),
            "fim_calibration_seconds": float(calib) if calib is not None else None,
            "rank_map": {k: int(v) for k, v in result.rank_map.items()},
            "steps": int(result.steps),
            "train_examples": len(prepared.train_rows),
            "eval_examples": len(prepared.eval_rows),
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "run_config": prepared.run.to_dict(),
        },
    }


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """Run one spec end to end and return its ``RunOutcome`` (the ``run_fn`` of ``run_grid``)."""
    if spec.suite not in SUITES:
        raise ValueError(f"unknown suite {spec.suite!r}; choose one of {SUITES}")
    from fimlora.training import TrainingInterrupted

    try:
        if spec.suite == "decoder":
            return run_decoder_spec(spec)
        prepared, result, _ = train_spec(spec)
    except TrainingInterrupted as stop:
        # SIGINT/SIGTERM stop the sweep (the runner lets KeyboardInterrupt through without writing a
        # record); otherwise the signal would be stored as a failed run and the sweep would go on.
        raise KeyboardInterrupt(str(stop)) from stop
    metrics = result.evals[-1][1] if result.evals else {}
    return outcome_of(spec, prepared, result, dict(metrics))
