"""EVA as a baseline behind fimlora's method protocol: data-driven A and ranks, then plain LoRA.

Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation",
2024, via ``peft.initialize_lora_eva_weights``: A is initialised from the right singular vectors of the
layers' inputs and ranks are redistributed (``rho``). The result already is a standard LoRA adapter.

Budgets (``budget_unit``): with ``"ranks"`` (the default, PEFT's own EVA) the *rank sum* r * n of uniform
LoRA is kept by construction, whatever the modules' shapes; the parameter count then differs from uniform
LoRA's. With ``"params"`` it holds uniform LoRA's *parameter count* P = r * sum_m (in_m + out_m):
components in decreasing explained-variance ratio (PEFT's order), at most round(rho * r) per module
(PEFT's maximum), each costing in_m + out_m, until P is spent
(:func:`~fimlora.peft_glue.eva.eva_state_dict_within_params`, which patches PEFT's EVA and so checks the
PEFT version). A module left with no component is not adapted (PEFT puts its base layer back). An explicit
budget (``budget_ranks`` R or ``budget_params`` P, what ``fimlora train --budget-ranks/--budget-params``
gives every method) is spent the same way, each component costing 1 in ranks (rank sum exactly R).

The final rank map's metadata reports ``total_rank`` and ``total_params`` next to uniform LoRA's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fimlora.config import BudgetUnit
from fimlora.errors import CalibrationError
from fimlora.methods.base import LossFn, StaticRanksMethod, register_method
from fimlora.methods.budget import budget_metadata, check_budget
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes
from fimlora.peft_glue.eva import check_eva_patch_supported, eva_state_dict_within_params
from fimlora.rankmap import RankMap

__all__ = ["EvaMethod", "EvaOptions"]


@dataclass
class EvaOptions:
    """EVA initialisation. Each field's docstring is its help text."""

    rho: float = 2.0
    """Largest rank of a module as a multiple of r (>= 1; 1 keeps every module at r)."""

    tau: float = 0.99
    """Cosine-similarity threshold at which a module's singular vectors count as converged."""

    use_label_mask: bool = True
    """Ignore token positions whose label is ``label_mask_value`` (only for token-level labels)."""

    label_mask_value: int = -100
    """Label value of positions to ignore."""

    whiten: bool = False
    """Whiten the singular vectors."""

    calibration_batches: int = 8
    """How many batches EVA cycles over until convergence (taken from the start of the training batches)."""

    max_passes: int = 20
    """Give up (with an error) after this many passes over the calibration batches without convergence."""

    budget_unit: BudgetUnit = "ranks"
    """What is held constant: the rank sum ("ranks", PEFT's) or the LoRA parameter count ("params",
    r * sum_m (in_m + out_m))."""

    budget_ranks: int | None = None
    """Rank sum over all modules (needs budget_unit="ranks"; default: r per module, PEFT's own EVA)."""

    budget_params: int | None = None
    """LoRA parameter count, sum_m r_m (in_m + out_m) (needs budget_unit="params"; default: uniform LoRA's)."""

    def __post_init__(self) -> None:
        check_budget(self.budget_unit, self.budget_ranks, self.budget_params)
        if self.rho < 1.0:
            raise ValueError(f"`rho` must be >= 1.0, got {self.rho}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"`tau` must be in [0, 1], got {self.tau}")
        if isinstance(self.calibration_batches, bool) or self.calibration_batches < 1:
            raise ValueError(
                f"`calibration_batches` must be a positive integer, got {self.calibration_batches}"
            )


@register_method("eva")
class EvaMethod(StaticRanksMethod):
    """EVA via PEFT: data-driven A and ranks before training, then plain LoRA (ranks fixed)."""

    name = "eva"
    options_class = EvaOptions
    options: EvaOptions
    lora_r = 0

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """Raise ValueError when the budget is more than EVA may give (round(rho * r) components a module)."""
        self._budget(shapes, r)

    def _budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> int:
        o = self.options
        costs = {n: (i + j if o.budget_unit == "params" else 1) for n, (i, j) in shapes.items()}
        budget = o.budget_ranks or o.budget_params or r * sum(costs.values())
        most = round(r * o.rho) * sum(costs.values())
        if budget > most:
            raise ValueError(
                f"EVA: the {o.budget_unit} budget {budget} is more than every component EVA may give "
                f"({most}: round(rho * r) per module); raise rho or lower the budget"
            )
        return budget

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        """Wrap with LoRA, run EVA on the first ``calibration_batches`` dict batches, fix the ranks.

        Raises:
            ValueError: batches that are not dicts of model inputs.
            UsageError: ``budget_unit="params"`` with a PEFT version its EVA patch was not written for.
        """
        from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

        assert batches is not None  # checked by prepare
        given, batches = batches, []
        for batch in given:
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError("EVA needs dict batches with `input_ids` (as passed to model(**batch))")
            batches.append(dict(batch))
            if len(batches) == self.options.calibration_batches:
                break
        if not batches:
            raise ValueError("the calibration batches are empty")
        o = self.options
        cfg = lora_config
        cfg.init_lora_weights = "eva"
        cfg.eva_config = EvaConfig(
            rho=o.rho,
            tau=o.tau,
            use_label_mask=o.use_label_mask,
            label_mask_value=o.label_mask_value,
            whiten=o.whiten,
            adjust_scaling_factors=True,  # keep every module's scale alpha/r, as fimlora does
        )
        own_budget = o.budget_unit == "params" or o.budget_ranks is not None  # fimlora's choice, not PEFT's
        if own_budget and cfg.rank_pattern:
            raise ValueError(
                "EVA with budget_unit='params' or an explicit budget chooses every module's rank itself: the "
                "LoRA config must not have a rank_pattern"
            )
        if own_budget:
            check_eva_patch_supported()  # before the model is wrapped
        model = get_peft_model(base_model, cfg)
        self.lora_r = int(lora_config.r)
        shapes = module_shapes(lora_modules(model))  # before EVA drops the modules it gives no component
        forward = _BoundedForward(o.max_passes * len(batches), o.rho * self.lora_r)
        if own_budget:
            try:
                budget = self._budget(shapes, self.lora_r)
            except ValueError:
                model.unload()  # leave the caller's model as it was
                raise
            state = eva_state_dict_within_params(
                model,
                batches,
                budget,
                unit=o.budget_unit,
                forward_fn=forward,
                prepare_model_inputs_fn=_eva_token_indices,
                prepare_layer_inputs_fn=_eva_layer_inputs,
            )
            initialize_lora_eva_weights(model, eva_state_dict=state, show_progress_bar=False)
        else:
            initialize_lora_eva_weights(
                model,
                batches,
                prepare_model_inputs_fn=_eva_token_indices,
                prepare_layer_inputs_fn=_eva_layer_inputs,
                forward_fn=forward,
                show_progress_bar=False,
            )
        ranks = current_ranks(model)
        # Budget over every targeted module, those EVA left without a component at rank 0.
        meta = budget_metadata("eva", {n: ranks.get(n, 0) for n in shapes}, shapes, self.lora_r)
        meta["config"] = asdict(o)
        meta["zero_rank_modules"] = sorted(set(shapes) - set(ranks))
        return model, RankMap(ranks, metadata=meta)


def _eva_token_indices(model_input: Mapping[str, torch.Tensor], peft_config: Any) -> torch.Tensor:
    """Indices (n, 2) of the token positions EVA uses: attended ones, minus masked labels.

    PEFT's default also reads ``labels``, which breaks on sequence-level labels (shape (batch,)); those
    are ignored here, since they say nothing about token positions.
    """
    ids = model_input["input_ids"]
    mask = model_input.get("attention_mask", torch.ones_like(ids)).bool()
    labels = model_input.get("labels")
    eva = peft_config.eva_config
    if eva.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
        mask = mask & (labels != eva.label_mask_value)
    return mask.nonzero()


def _eva_layer_inputs(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The rows EVA's SVD sees: selected token positions of a (batch, seq, hidden) input.

    A layer that sees one vector per sequence (BERT's pooler: (batch, hidden)) has no token positions to
    select; PEFT's default indexing fails there, so its input is used whole.
    """
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"EVA: unsupported input type {type(x).__name__} of layer {layer_name}")
    if x.dim() == 2:
        return x.contiguous()  # e.g. hidden[:, 0]; PEFT hashes inputs with .view(-1)
    return x[model_input.T.unbind()]


class _BoundedForward:
    """PEFT's EVA forward, with a limit: EVA cycles over the batches until every layer converges, forever
    if a layer never gets enough rows per batch for its SVD (BERT's pooler sees one row per sequence)."""

    def __init__(self, limit: int, components: float) -> None:
        self.limit = limit
        self.components = components
        self.calls = 0

    def __call__(self, model: nn.Module, inputs: Mapping[str, Any]) -> Any:
        self.calls += 1
        if self.calls > self.limit:
            raise CalibrationError(  # a RuntimeError the CLI reports in one line (exit 2)
                f"EVA did not converge in {self.limit} forward passes. A layer whose input has fewer rows per "
                f"batch than rho * r = {self.components:g} components never can (e.g. BERT's pooler: one row "
                "per sequence): use larger calibration batches, a lower rho, or leave that layer out of "
                "target_modules; or raise max_passes / lower tau"
            )
        return model(**inputs)
