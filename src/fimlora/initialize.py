"""FIM-LoRA end to end: calibrate (or take precomputed statistics), allocate, rebuild the LoRA layers.

This is the glue between :mod:`fimlora.calibration` (torch), :mod:`fimlora.allocate` (pure math) and
:mod:`fimlora.peft_glue` (PEFT internals). It mirrors PEFT's EVA API: ``initialize_lora_fim_ranks`` does
both steps, or takes ``scores=`` computed earlier (e.g. under DDP) and only applies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from fimlora.allocate import allocate_ranks, normalize_scores
from fimlora.calibration import LossFn, ModuleStats, estimate_module_scores
from fimlora.config import FimConfig
from fimlora.peft_glue import (
    apply_rank_map,
    is_sharded,
    lora_config,
    lora_modules,
    module_shapes,
    sharded_resize_error,
)
from fimlora.rankmap import RankMap

__all__ = ["compute_lora_fim_ranks", "initialize_lora_fim_ranks", "plan_rank_map"]


def plan_rank_map(
    scores: Mapping[str, float],
    shapes: Mapping[str, tuple[int, int]],
    fim_config: FimConfig,
    *,
    r: int,
    metadata: Mapping[str, Any] | None = None,
) -> RankMap:
    """Turn module scores into a rank map under the config's budget and bounds.

    Bounds are ``[r_min, r_max]`` from the config (defaults relative to the LoRA rank ``r``). A module
    cannot have a rank above ``min(in, out)``: defaults are capped there, an explicit ``r_max`` above it is
    an error that names the module and the largest valid value.

    Args:
        scores: module name -> score (>= 0).
        shapes: module name -> (in_features, out_features).
        fim_config: budget and bounds.
        r: the LoRA config's rank; the default budget is uniform LoRA at ``r`` (in ranks or parameters).
        metadata: extra data to store in the map.
    """
    missing = [n for n in scores if n not in shapes]
    if missing:
        raise ValueError(f"no shape for modules {missing[:3]}: the scores come from a different model")
    r_min, r_max = fim_config.resolved_bounds(r)
    full_rank = {n: min(shapes[n]) for n in scores}
    too_small = {n: k for n, k in full_rank.items() if k < r_min}
    if too_small:
        name, k = next(iter(too_small.items()))
        raise ValueError(
            f"r_min={r_min} exceeds the full rank min(in, out)={k} of module {name!r}; "
            f"the feasible r_min for this model is at most {min(full_rank.values())}"
        )
    if fim_config.r_max is not None:
        over = {n: k for n, k in full_rank.items() if k < r_max}
        if over:
            name, k = next(iter(over.items()))
            raise ValueError(
                f"r_max={r_max} is above the full rank min(in, out)={k} of module {name!r}; "
                f"set r_max <= {min(full_rank.values())} (or leave it unset to cap it per module)"
            )
    hi = {n: min(r_max, full_rank[n]) for n in scores}
    costs = {n: shapes[n][0] + shapes[n][1] for n in scores}
    budget_ranks, budget_params = fim_config.budget_ranks, fim_config.budget_params
    if budget_ranks is None and budget_params is None:
        if fim_config.budget_unit == "ranks":
            budget_ranks = r * len(scores)
        else:
            budget_params = r * sum(costs.values())
    meta: dict[str, Any] = {
        "method": "fim",
        "lora_r": r,
        "r_min": r_min,
        "r_max": r_max,
        "config": fim_config.to_dict(),
        "uniform_params": r * sum(costs.values()),
        "shapes": {n: list(shapes[n]) for n in scores},
    }
    if metadata:
        meta.update(metadata)
    if fim_config.score_power != 1.0 or fim_config.normalize != "none":
        # the map's "scores" are then the normalised, tempered ones; keep the raw ones too
        meta["raw_scores"] = {n: float(v) for n, v in scores.items()}
        scores = normalize_scores(scores, fim_config.normalize)
        scores = {n: float(v) ** fim_config.score_power if v > 0 else 0.0 for n, v in scores.items()}
    rank_map = allocate_ranks(
        scores,
        budget_ranks=budget_ranks,
        budget_params=budget_params,
        costs=costs,
        r_min=r_min,
        r_max=hi,
        metadata=meta,
    )
    return rank_map


def compute_lora_fim_ranks(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    fim_config: FimConfig | None = None,
    *,
    scores: ModuleStats | Mapping[str, float] | None = None,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
) -> RankMap:
    """Choose every LoRA module's rank from calibration statistics, leaving the model's ranks as they are.

    The first half of :func:`initialize_lora_fim_ranks` (same arguments): the map it would apply. A control
    that permutes the map (``fim-shuffled``) applies its own map instead; ranks of 0 can only be applied
    once, since a dropped module keeps no LoRA layer to rebuild.
    """
    cfg = fim_config or FimConfig()
    if is_sharded(model):  # before calibrating: the ranks could not be applied afterwards
        raise sharded_resize_error(model, "initialize_lora_fim_ranks")
    mods = lora_modules(model, adapter_name)
    lcfg = lora_config(model, adapter_name)
    shapes = module_shapes(mods, adapter_name)
    if scores is None:
        if dataloader is None:
            raise ValueError(
                "pass a calibration `dataloader`, or precomputed `scores=` from estimate_module_scores"
            )
        scores = estimate_module_scores(model, dataloader, cfg, loss_fn=loss_fn, adapter_name=adapter_name)
    extra: dict[str, Any] = dict(cfg.extra)
    if isinstance(scores, ModuleStats):
        score_values = scores.scores(cfg.score, cfg.aggregation)
        extra.update(calibration_batches=scores.num_batches, calibration_seconds=scores.seconds)
    else:
        score_values = {n: float(v) for n, v in scores.items()}
    mismatch = set(score_values) ^ set(mods)
    if mismatch:
        raise ValueError(
            f"the scores do not cover exactly this adapter's LoRA modules (differ on {sorted(mismatch)[:3]}); "
            "compute them on the same model and adapter"
        )
    score_values = {n: score_values[n] for n in mods}
    return plan_rank_map(score_values, shapes, cfg, r=lcfg.r, metadata=extra)


def initialize_lora_fim_ranks(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    fim_config: FimConfig | None = None,
    *,
    scores: ModuleStats | Mapping[str, float] | None = None,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
) -> RankMap:
    """Choose every LoRA module's rank from calibration statistics and rebuild the adapter in place.

    Args:
        model: PEFT model with a freshly initialised LoRA adapter (B = 0).
        dataloader: calibration batches (ignored when ``scores`` is given).
        fim_config: calibration, budget and bounds (defaults: T = 8, budget of uniform LoRA at the config's r).
        scores: statistics from :func:`fimlora.estimate_module_scores` or ``fim_calibration(...).scores``,
            or a plain ``{module: score}`` mapping; skips calibration.
        adapter_name: which adapter to resize.
        loss_fn: ``loss_fn(model, batch) -> loss`` for batches without a ``.loss``.

    Returns:
        The :class:`RankMap` applied. The model's LoRA layers have these ranks (A re-initialised as the
        config says, B = 0) and its ``peft_config[adapter_name]`` has matching ``rank_pattern`` and
        ``alpha_pattern``, so ``save_pretrained`` writes a standard adapter. With ``r_min=0`` a module at
        rank 0 loses its LoRA layer and leaves ``target_modules``.
    """
    cfg = fim_config or FimConfig()
    rank_map = compute_lora_fim_ranks(
        model, dataloader, cfg, scores=scores, adapter_name=adapter_name, loss_fn=loss_fn
    )
    apply_rank_map(
        model,
        rank_map,
        adapter_name=adapter_name,
        adjust_scaling_factors=cfg.adjust_scaling_factors,
        seed=cfg.seed,
    )
    return rank_map
