"""GoRA as a method: ranks and LoRA-B from the full weight gradients of a few batches, then plain LoRA.

He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation", NeurIPS 2025 (arXiv:2502.12171); official
code ``hhnqqq/MyTransformers``, ``common/lora_modules/gora.py`` (the ``compress`` init, ``union_mean``
importance and the options of its ``scripts/gora/*.sh``). Before training, over T calibration batches, with
LoRA-B = 0 (the adapted model is the base model):

    G_m = (1/T) sum_t dL_t/dW_m                     mean full weight gradient, (out_m, in_m), fp32
    I_m = mean_ij |W_m * G_m|                       importance (the code's "union_mean", all its scripts)

GoRA gives module m the share I_m / sum_k I_k of the parameter budget, so its rank is proportional to
I_m / (in_m + out_m); here :func:`fimlora.initialize.plan_rank_map` hands it out exactly (budget in
parameters, the paper's, or in ranks; default: uniform LoRA at the config's r) within ``[r_min, r_max]``
(FimConfig's semantics). Then A is initialised as LoRA's (PEFT's init at the new rank) and

    B_m = -(xi / s_m) * sqrt(in_m / r_m) * G_m A_m^T (A_m A_m^T)^-1          (out_m, r_m)

so that the initial adapter ``s B A`` is one gradient-descent step of size ``xi`` on W_m, compressed into A's
row space: ``s B A = -xi sqrt(in/r) G P_A`` with ``P_A = A^T (A A^T)^-1 A`` (``sqrt(in/r)`` restores the
norm a random r-dimensional projection removes on average). W is *not* changed (GoRA's init does not
rewrite the pretrained weights), so at step 0 the adapted model already differs from the base model by that
step. The saved adapter is plain LoRA: the trained A and B (which started from A_0 and B_0 above) with
``rank_pattern``/``alpha_pattern``; over the unchanged base weights vanilla PEFT reloads it exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fimlora.calibration import gradient_passes
from fimlora.errors import CalibrationError
from fimlora.initialize import plan_rank_map
from fimlora.methods.base import LossFn, StaticRanksMethod, register_method
from fimlora.methods.budget import BudgetBoundsOptions, budget_metadata, check_float
from fimlora.peft_glue import apply_rank_map, lora_factors, lora_modules, module_shapes
from fimlora.peft_glue.weights import base_weight, lora_scale, set_lora_factors, weight_out_in
from fimlora.rankmap import RankMap

__all__ = [
    "GoraMethod",
    "GoraOptions",
    "gora_allocation_scores",
    "gora_importance",
    "gora_lora_b",
    "gradient_init_lora_b",
    "mean_weight_gradients",
    "plan_gora_ranks",
]


@dataclass
class GoraOptions(BudgetBoundsOptions):
    """GoRA's calibration, budget and initialisation. Each field's docstring is its help text.

    GoRA's own scripts (``scripts/gora/*.sh``) use T = 32, ``r_min`` 4 and ``r_max`` 32 at r = 8, and scale by
    alpha/sqrt(r_i) (``use_rslora`` with ``adjust_scaling_factors`` False); the budget is in parameters.
    """

    calibration_batches: int = 8
    """Batches whose full weight gradients are averaged (T; GoRA's scripts use 32; fimlora's methods 8)."""

    init_step_size: float = 0.05
    """xi: the initial adapter is one gradient-descent step of this size on W, compressed into A (GoRA: 5e-2)."""

    gradient_init: bool = True
    """Initialise B from the gradient (GoRA); False keeps LoRA's B = 0 and uses GoRA's ranks only."""

    def __post_init__(self) -> None:
        check_float("init_step_size", self.init_step_size, low=0.0)
        self.check_budget_bounds()
        self.allocation_config(calibration_batches=self.calibration_batches)  # FimConfig's own checks


# ---- the math ----------------------------------------------------------------------------------------


def gora_importance(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """GoRA's importance of one weight: the mean over elements of ``|W * G|`` (in fp32).

    Args:
        weight: the base weight, any shape.
        grad: its mean gradient over the calibration batches, same shape.
    """
    return float((weight.detach().float() * grad.float().to(weight.device)).abs().mean())


def gora_allocation_scores(
    importance: Mapping[str, float], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, float]:
    """Scores for the allocator, ``I_m / (in_m + out_m)``: ranks proportional to them give every module a
    parameter count proportional to its importance (GoRA's rule). Pure: no torch."""
    return {n: float(v) / (shapes[n][0] + shapes[n][1]) for n, v in importance.items()}


def plan_gora_ranks(
    importance: Mapping[str, float],
    shapes: Mapping[str, tuple[int, int]],
    options: GoraOptions,
    *,
    r: int,
    metadata: Mapping[str, Any] | None = None,
) -> RankMap:
    """GoRA's ranks under the options' budget and bounds (exact; see :func:`fimlora.allocate.allocate_ranks`).

    Args:
        importance: module -> importance ``I_m`` (>= 0).
        shapes: module -> (in_features, out_features).
        options: budget and bounds.
        r: the LoRA config's rank (the default budget is uniform LoRA at ``r``).
        metadata: extra data for the map.

    Raises:
        ValueError: bounds or budget infeasible for these modules (the message says which).
    """
    meta: dict[str, Any] = {
        "method": "gora",
        "config": asdict(options),
        "importance": {n: float(v) for n, v in importance.items()},
    }
    meta.update(metadata or {})
    scores = gora_allocation_scores(importance, shapes)
    return plan_rank_map(
        scores,
        shapes,
        options.allocation_config(calibration_batches=options.calibration_batches),
        r=r,
        metadata=meta,
    )


def gora_lora_b(grad: torch.Tensor, a: torch.Tensor, scale: float, step_size: float) -> torch.Tensor:
    """GoRA's B: ``-(xi / s) sqrt(in / r) G A^T (A A^T)^-1``, so that ``s B A = -xi sqrt(in/r) G P_A``.

    Args:
        grad: G, the mean weight gradient, ``(out, in)``.
        a: LoRA-A, ``(r, in)``, full row rank.
        scale: the module's LoRA scale s.
        step_size: xi.

    Returns:
        B, ``(out, r)``, fp32, on ``a``'s device.
    """
    a32 = a.detach().float()
    g = grad.float().to(a32.device)
    rank, fan_in = a32.shape
    # B^T = (A A^T)^-1 A G^T: a solve with the r x r Gram matrix, not an explicit inverse.
    bt = torch.linalg.solve(a32 @ a32.T, a32 @ g.T)
    factor = -(step_size / scale) * math.sqrt(fan_in / rank)
    return factor * bt.T


def mean_weight_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
) -> tuple[dict[str, torch.Tensor], int]:
    """The mean gradient of every LoRA module's base weight over the first ``num_batches`` batches.

    Inside :func:`fimlora.calibration.calibration_mode` (eval mode, only these weights need grad, restored
    on exit with their flags and ``.grad``); a hook moves each weight's gradient into an fp32 sum as soon as
    it is accumulated, so at most one module's ``.grad`` exists at a time. Memory: one fp32 tensor per
    adapted weight, on the weight's device.

    Returns:
        ``({module: G (out, in) fp32}, batches seen)``.

    Raises:
        CalibrationError: no batches, a batch without a loss, or a non-finite gradient.
    """
    mods = lora_modules(model, adapter_name)
    weights = {n: base_weight(m) for n, m in mods.items()}
    sums = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}

    def collect(name: str, grad: torch.Tensor) -> None:
        sums[name].add_(grad)

    seen = gradient_passes(model, weights, batches, num_batches, loss_fn, collect, "GoRA")
    bad = [n for n, s in sums.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise CalibrationError(f"non-finite weight gradient in module {bad[0]!r}; check the batches' inputs")
    return {n: weight_out_in(mods[n], s.div_(seen)) for n, s in sums.items()}, seen


def gradient_init_lora_b(
    model: nn.Module,
    batches: Iterable[Any],
    step_size: float,
    *,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
) -> int:
    """Set every LoRA module's B to GoRA's gradient init at its current rank and A (see :func:`gora_lora_b`).

    The mean full-weight gradients are taken over ``batches`` with B = 0 first (the adapted model is then
    the base model, as GoRA's init assumes). Returns the number of batches seen.
    """
    mods = lora_modules(model, adapter_name)
    for m in mods.values():
        set_lora_factors(
            m, b=torch.zeros_like(lora_factors(m, adapter_name)[1].weight), adapter_name=adapter_name
        )
    batches = list(batches)
    grads, seen = mean_weight_gradients(
        model, batches, len(batches), loss_fn=loss_fn, adapter_name=adapter_name
    )
    for n, m in mods.items():
        a, _ = lora_factors(m, adapter_name)
        b = gora_lora_b(grads.pop(n), a.weight, lora_scale(m, adapter_name), step_size)
        set_lora_factors(m, b=b, adapter_name=adapter_name)
    return seen


# ---- the method --------------------------------------------------------------------------------------


@register_method("gora")
class GoraMethod(StaticRanksMethod):
    """GoRA: ranks and LoRA-B from full weight gradients before training, then plain LoRA (ranks fixed)."""

    name = "gora"
    options_class = GoraOptions
    supports_dora = False  # B starts from the gradient, which DoRA's magnitude does not account for
    options: GoraOptions

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """See :meth:`fimlora.methods.base.MethodBase.check_budget`."""
        plan_rank_map(
            dict.fromkeys(shapes, 1.0),
            shapes,
            self.options.allocation_config(calibration_batches=self.options.calibration_batches),
            r=r,
        )

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        """Wrap with LoRA, average the weight gradients of the first batches, set ranks, A and B.

        Raises:
            ValueError: a quantized base layer, infeasible bounds or budget.
            CalibrationError: the batches give no loss or a non-finite gradient.
        """
        from peft import get_peft_model

        assert batches is not None  # checked by prepare
        o = self.options
        cfg = lora_config
        model = get_peft_model(base_model, cfg)
        r = int(cfg.r)
        mods = lora_modules(model)
        shapes = module_shapes(mods)
        t0 = time.perf_counter()
        grads, seen = mean_weight_gradients(model, batches, o.calibration_batches, loss_fn=loss_fn)
        importance = {n: gora_importance(weight_out_in(m, base_weight(m)), grads[n]) for n, m in mods.items()}
        planned = plan_gora_ranks(
            importance,
            shapes,
            o,
            r=r,
            metadata={"calibration_batches": seen, "calibration_seconds": time.perf_counter() - t0},
        )
        apply_rank_map(model, planned, adjust_scaling_factors=o.adjust_scaling_factors, seed=o.seed)
        if o.gradient_init:
            for n, m in lora_modules(model).items():
                a, _ = lora_factors(m)
                set_lora_factors(m, b=gora_lora_b(grads.pop(n), a.weight, lora_scale(m), o.init_step_size))
        del grads
        meta = planned.metadata
        meta.update(budget_metadata("gora", dict(planned), shapes, r))
        return model, RankMap(dict(planned), metadata=meta)
