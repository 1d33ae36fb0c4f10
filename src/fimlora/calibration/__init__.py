"""Calibration: empirical Fisher and gradient variance of every LoRA-B factor.

With LoRA's usual init (B = 0), dL/dA = 0 and only B carries signal:
``dL/dB_m = s_m * sum_tokens delta_m (A_m x)^T``. Over T calibration batches with gradients ``g_t`` of
shape ``(out_m, r_m)`` calibration accumulates, in fp32, the sums behind

    F_m = (1/T) sum_t g_t**2          (empirical Fisher diagonal)
    V_m = F_m - ((1/T) sum_t g_t)**2  (gradient variance)

and reduces each to one score per module by a mean or a sum over its elements. The statistics cost two
fp32 tensors per B (O(sum numel(B_m))), a few hundred times less than a full-model Fisher diagonal.
``FimConfig(estimator="per_example")`` squares each example's gradient instead (exact, from one pass).

* :mod:`~fimlora.calibration.stats`: :class:`ModuleStat`, :class:`ModuleStats` (JSON), the reductions.
* :mod:`~fimlora.calibration.batch` / :mod:`~fimlora.calibration.per_example`: the two accumulators,
  siblings behind :class:`GradientAccumulator` (:mod:`~fimlora.calibration.base`);
  :mod:`~fimlora.calibration.layer_grad`: the batch estimator's statistics formed from each ``lora_B``
  layer's input and output gradient, for sharded (FSDP2) models, whose ``.grad`` is a shard.
* :mod:`~fimlora.calibration.session`: :func:`fim_calibration`, :func:`estimate_module_scores`,
  :func:`calibration_mode` (the model's state saved and restored).
"""

from __future__ import annotations

from fimlora.calibration.base import GradientAccumulator, Reduction
from fimlora.calibration.batch import BatchAccumulator
from fimlora.calibration.layer_grad import LayerGradientAccumulator
from fimlora.calibration.per_example import NormMethod, PerExampleAccumulator, per_example_sq_norms
from fimlora.calibration.session import (
    FimCalibration,
    LossFn,
    batch_loss,
    batch_to_device,
    calibration_mode,
    estimate_module_scores,
    fim_calibration,
    gradient_passes,
    make_accumulator,
)
from fimlora.calibration.stats import ModuleStat, ModuleStats, batch_module_stats, example_module_stats

__all__ = [
    "BatchAccumulator",
    "FimCalibration",
    "GradientAccumulator",
    "LayerGradientAccumulator",
    "LossFn",
    "ModuleStat",
    "ModuleStats",
    "NormMethod",
    "PerExampleAccumulator",
    "Reduction",
    "batch_loss",
    "batch_module_stats",
    "batch_to_device",
    "calibration_mode",
    "estimate_module_scores",
    "example_module_stats",
    "fim_calibration",
    "gradient_passes",
    "make_accumulator",
    "per_example_sq_norms",
]
