"""What the ablations share: the base run settings, a replay of fimlora's calibration on a benchmark run
(its model, batches and LoRA-B gradients), scores and rank maps from those, and table helpers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bench.harness import RunSpec
from fimlora.rankmap import kendall_tau_b, spearman

__all__ = [
    "BASE_OVERRIDES",
    "VARIANTS",
    "calibration_setup",
    "capture_b_gradients",
    "fmt_cell",
    "nan_mean",
    "nan_sd",
    "rank_maps_for",
    "scores_from_gradients",
    "spearman_kendall",
]

VARIANTS: tuple[tuple[str, str], ...] = (
    ("fisher", "mean"),
    ("fisher", "sum"),
    ("variance", "mean"),
    ("variance", "sum"),
)
BASE_OVERRIDES: dict[str, Any] = {
    "max_train": 1280,  # 80 batches of 16: enough for two disjoint sets of 32 batches
    "max_eval": 400,
    "max_length": 32,
    "batch_size": 16,
    "lr": 0.003,
    "device": "cpu",
}


def capture_b_gradients(
    spec: RunSpec, n_batches: int
) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int]]]:
    """LoRA-B gradients of the first ``n_batches`` training batches of a run, one dict per batch.

    Mirrors fimlora's calibration: the same batch order (``training.BatchPlan``), the same seeding of the
    LoRA init (``torch.manual_seed(seed)`` before wrapping, see :func:`calibration_setup`), and the model
    in fimlora's own calibration state (``fimlora.calibration.calibration_mode``: eval mode, no dropout,
    only B trainable).

    Returns:
        ``(grads, shapes)``: ``grads[t][module]`` is a float64 CPU tensor of shape ``(out, r)``;
        ``shapes[module] = (in, out)``.
    """
    from fimlora.calibration import calibration_mode
    from fimlora.peft_glue import lora_factors, lora_modules, module_shapes

    model, stream = calibration_setup(spec, n_batches)
    mods = lora_modules(model)
    shapes = module_shapes(mods)
    b_params = {n: lora_factors(m)[1].weight for n, m in mods.items()}
    grads = []
    with calibration_mode(model, b_params.values()):
        for batch in stream:
            model(**batch).loss.backward()
            grads.append({n: p.grad.detach().double().clone() for n, p in b_params.items()})
            for p in b_params.values():
                p.grad = None
    return grads, shapes


def scores_from_gradients(
    grads: Sequence[Mapping[str, Any]], shapes: Mapping[str, tuple[int, int]], kind: str, aggregation: str
) -> dict[str, float]:
    """Module scores from per-batch B gradients (float64 sums), reduced by fimlora's own
    ``batch_module_stats`` and ``ModuleStat.score``."""
    from fimlora.calibration import ModuleStats, batch_module_stats

    names = list(grads[0])
    sum_g = {n: sum(g[n] for g in grads) for n in names}
    sum_g2 = {n: sum(g[n] * g[n] for g in grads) for n in names}
    stats = ModuleStats(batch_module_stats(sum_g, sum_g2, len(grads), shapes), num_batches=len(grads))
    return stats.scores(kind, aggregation)


def rank_maps_for(
    scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], r: int, **fim: Any
) -> Any:
    """fimlora's rank map for ``scores`` under the parameter budget of uniform LoRA at ``r``."""
    from fimlora import FimConfig
    from fimlora.initialize import plan_rank_map

    cfg = FimConfig(budget_unit="params", show_progress=False, **fim)
    return plan_rank_map(scores, shapes, cfg, r=r)


def calibration_setup(spec: RunSpec, n_batches: int) -> tuple[Any, list[dict[str, Any]]]:
    """A fresh PEFT model (B = 0) and the run's first ``n_batches`` training batches, as the run sees them."""
    import torch
    from peft import get_peft_model

    from bench.suites.run import prepare_spec
    from fimlora.tasks import collator_for
    from fimlora.training import BatchPlan

    prepared = prepare_spec(spec)
    torch.manual_seed(spec.seed)
    model = get_peft_model(prepared.model, prepared.lora_config)
    collate = collator_for("classification", prepared.tokenizer)
    plan = BatchPlan(len(prepared.train_rows), prepared.train_config.batch_size, spec.seed)
    if plan.steps_per_epoch < n_batches:
        raise ValueError(f"{n_batches} batches requested, the training set has {plan.steps_per_epoch}")
    stream = [collate([prepared.train_rows[i] for i in plan.indices(step)]) for step in range(n_batches)]
    return model, stream


def spearman_kendall(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float]:
    """(Spearman, Kendall tau-b) between two score (or rank) dicts over ``a``'s module names."""
    names = list(a)
    x, y = [a[n] for n in names], [b[n] for n in names]
    return spearman(x, y), kendall_tau_b(x, y)


def nan_mean(values: Sequence[float]) -> float:
    """Mean of the non-nan values; nan when there are none (e.g. every rank map was constant)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def nan_sd(values: Sequence[float]) -> float:
    """Sample standard deviation of the non-nan values; nan with fewer than two."""
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2:
        return float("nan")
    m = sum(finite) / len(finite)
    return math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1))


def fmt_cell(x: float) -> str:
    """A table cell: two decimals, or "–" for a missing (None or nan) value."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
