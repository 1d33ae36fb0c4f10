"""What every suite reports about a finished fimlora training run: the harness's ``RunOutcome``.

Shared by the classification suites (``run.py``) and the decoder suite (``decoder.py``); it depends on
neither, so the two suites import it without importing each other.

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
from typing import Any

from bench.harness import RunSpec

__all__ = ["device_label", "outcome_of", "peak_memory", "uniform_lora_params"]


def peak_memory(device: Any) -> int:
    """Peak bytes of this run (CUDA) or of the process so far (CPU); see the module docstring."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def device_label(device: Any) -> str:
    """``"cuda:<GPU name>"`` or ``"cpu (<n> threads)"``."""
    import torch

    if getattr(device, "type", "") == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


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
    """The harness ``RunOutcome`` of a finished run.

    Args:
        spec: The run.
        prepared: Its ``fimlora.recipes.PreparedRun``; ``prepared.extra["uniform_lora_params"]`` must hold
            :func:`uniform_lora_params` of the base model.
        result: The ``fimlora.training.TrainResult``.
        metrics: Evaluation metrics; non-finite or non-numeric values are left out.
    """
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
        "peak_memory_bytes": peak_memory(prepared.device),
        "device": device_label(prepared.device),
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
            # (step, metrics) of every evaluation: the periodic ones (eval_every) and the final one.
            "evals": [[int(step), dict(m)] for step, m in result.evals],
            "run_config": prepared.run.to_dict(),
        },
    }
