"""AdaLoRA as a baseline behind fimlora's method protocol, ending as plain LoRA.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023, via
``peft.AdaLoraConfig``. Its adapter is in SVD form, delta_W = B diag(E) A * alpha / (ranknum + 1e-5), with
pruned singular values E zeroed by a mask; :func:`~fimlora.peft_glue.adalora.adalora_to_lora` turns it into
a standard LoRA adapter with per-module ranks (``rank_pattern``/``alpha_pattern``) and identical outputs.
``update_and_allocate`` is called every step from :meth:`AdaLoraMethod.on_step_end` (forgetting it makes
AdaLoRA silently keep every rank).

Budgets (``budget_unit``): with ``"ranks"`` (the default, PEFT's own budget) the final triplet count is
the *rank sum* of uniform LoRA at the config's r (``target_r = r``), whatever the modules' shapes; its
parameter count then differs from uniform LoRA's. With ``"params"`` it holds uniform LoRA's *parameter
count* P = target_r * sum_m (in_m + out_m): the allocator's budget follows PEFT's cubic schedule in
parameters, from init_r * sum(in + out) down to P, and each masking keeps the most important triplets that
fit (:func:`~fimlora.allocate.select_within_budget`, each costing in_m + out_m of its module; PEFT keeps
the top-k by ``kthvalue``). The final mask (PEFT's ``rank_pattern`` at tfinal) is that selection, so the
plain LoRA model has <= P parameters. An explicit budget (``budget_ranks`` R or ``budget_params`` P, what
``fimlora train --budget-ranks/--budget-params`` gives every method) replaces uniform LoRA's as the end of
that schedule; a rank budget then uses the same replacement with every triplet costing 1, so the final
rank sum is exactly R.

The final rank map's metadata reports ``total_rank`` and ``total_params`` next to uniform LoRA's, so a
comparison can say which budget matched. AdaLoRA's layers and allocator are reached only through
:mod:`fimlora.peft_glue.adalora`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fimlora.allocate import select_within_budget
from fimlora.config import BudgetUnit
from fimlora.methods.base import MethodBase, Preparation, register_method, trainable_param_groups
from fimlora.methods.budget import budget_metadata, check_budget
from fimlora.methods.history import RankEvent, RankHistory
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes
from fimlora.peft_glue.adalora import (
    adalora_allocator_state,
    adalora_factor_shapes,
    adalora_params,
    adalora_ranks,
    adalora_schedule,
    adalora_shapes,
    adalora_to_lora,
    adalora_triplet_scores,
    adalora_update_and_allocate,
    load_adalora_allocator_state,
    mask_adalora_triplets,
    replace_adalora_allocation,
)
from fimlora.rankmap import RankMap

__all__ = ["AdaLoraMethod", "AdaLoraOptions", "cubic_budget"]


def cubic_budget(step: int, *, tinit: int, tfinal: int, total: int, start: int, end: int) -> int:
    """AdaLoRA's budget at ``step``: ``start`` until tinit, then a cubic decrease to ``end`` reached at
    total - tfinal, then ``end`` (PEFT's ``RankAllocator.budget_schedule``, in any unit)."""
    if step <= tinit:
        return start
    if step >= total - tfinal:
        return end
    left = 1 - (step - tinit) / (total - tfinal - tinit)  # 1 -> 0 over the pruning phase
    return int((start - end) * left**3 + end)


@dataclass
class AdaLoraOptions:
    """AdaLoRA schedule and budget. Each field's docstring is its help text."""

    init_r: int | None = None
    """Initial rank of every module (default: ceil(1.5 * r), the ratio of PEFT's defaults 12/8)."""

    target_r: int | None = None
    """Target average rank (default: the LoRA config's r, so the final rank sum equals uniform LoRA's)."""

    tinit: float | int = 0.1
    """Warm-up before pruning starts: a fraction of training (float) or steps (int)."""

    tfinal: float | int = 0.2
    """Final phase with the ranks fixed: a fraction of training (float) or steps (int)."""

    delta_t: int = 1
    """Steps between two budget allocations (PEFT's ``deltaT``)."""

    beta1: float = 0.85
    """EMA coefficient of the sensitivity."""

    beta2: float = 0.85
    """EMA coefficient of the uncertainty."""

    orth_reg_weight: float = 0.5
    """Weight of AdaLoRA's orthogonality regulariser (added by PEFT to ``outputs.loss``)."""

    total_step: int | None = None
    """Total training steps; default: the ``total_steps`` given to ``prepare`` (one of them is required)."""

    budget_unit: BudgetUnit = "ranks"
    """What is held constant: the rank sum ("ranks", PEFT's) or the LoRA parameter count ("params",
    target_r * sum_m (in_m + out_m))."""

    budget_ranks: int | None = None
    """Final rank sum over all modules (needs budget_unit="ranks"; default: target_r per module)."""

    budget_params: int | None = None
    """Final LoRA parameter count, sum_m r_m (in_m + out_m) (needs budget_unit="params"; default:
    target_r * sum_m (in_m + out_m))."""

    def __post_init__(self) -> None:
        check_budget(self.budget_unit, self.budget_ranks, self.budget_params)
        if self.target_r is not None and (self.budget_ranks is not None or self.budget_params is not None):
            raise ValueError(
                "set either `target_r` or an explicit budget (budget_ranks/budget_params), not both"
            )
        for name in ("init_r", "target_r", "total_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(
                    f"`{name}` must be a fraction (float in [0, 1)) or steps (int >= 0), got {value!r}"
                )
            if isinstance(value, float) and value >= 1:
                raise ValueError(f"`{name}` as a fraction of training must be < 1, got {value}")
        if isinstance(self.delta_t, bool) or not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise ValueError(f"`delta_t` must be a positive integer, got {self.delta_t!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` must be >= 0, got {self.orth_reg_weight}")


@register_method("adalora")
class AdaLoraMethod(MethodBase):
    """AdaLoRA via PEFT, budget-matched to uniform LoRA's rank sum or parameter count, finalised as plain LoRA.

    ``update_and_allocate`` needs each step's gradients, and the protocol's training loop calls
    ``on_step_end`` after ``optimizer.zero_grad()``. So the method keeps a *reference* to every AdaLoRA
    gradient when backward produces it (a post-accumulate-grad hook; no copy) and hands those to PEFT when
    ``p.grad`` has been set to None. Gradient clipping, which works in place, is seen. A loop that zeroes
    gradients in place (``zero_grad(set_to_none=False)``) before ``on_step_end`` would leave only zeros:
    that is detected and raised rather than letting AdaLoRA silently do nothing.
    """

    name = "adalora"
    options_class = AdaLoraOptions

    def __init__(self, options: AdaLoraOptions | None = None, **fields: Any) -> None:
        super().__init__(options, **fields)
        self.adapter_name = "default"
        self.history = RankHistory()
        self.lora_config: Any = None
        self.total_step: int | None = None
        self._grads: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._ranks: dict[str, int] = {}
        self._model: nn.Module | None = None

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """Raise ValueError when the budget is more than AdaLoRA starts with (``init_r`` a module: it only
        prunes); pure, run on the module shapes ``name -> (in, out)`` before any weights load."""
        o = self.options
        init_r = o.init_r if o.init_r is not None else math.ceil(1.5 * r)
        target_r = o.target_r if o.target_r is not None else r
        costs = {n: i + j if o.budget_unit == "params" else 1 for n, (i, j) in shapes.items()}
        start = init_r * sum(costs.values())
        target = o.budget_ranks or o.budget_params or target_r * sum(costs.values())
        if target > start:
            raise ValueError(
                f"AdaLoRA prunes ranks: the {o.budget_unit} budget {target} is more than its {start} at "
                "init_r; raise init_r or lower the budget"
            )

    def setup(self, base_model: nn.Module, lora_config: Any, prep: Preparation) -> nn.Module:
        """Wrap ``base_model`` with AdaLoRA built from ``lora_config`` (targets, alpha, dropout, task).

        Raises:
            ValueError: no total number of steps, or a schedule with no pruning phase (before wrapping).
        """
        from peft import get_peft_model

        total_steps = prep.total_steps
        ada_config = self.adalora_config(lora_config, total_steps)
        self.lora_config = copy.deepcopy(lora_config)
        model = get_peft_model(base_model, ada_config)
        o = self.options
        if o.budget_unit == "params" or o.budget_ranks is not None:
            try:
                _BudgetAllocation(
                    model, o.budget_unit, int(ada_config.target_r), o.budget_ranks or o.budget_params
                )
            except ValueError:
                model.unload()  # leave the caller's model as it was
                raise
        self._model = model
        self._ranks = adalora_ranks(model, self.adapter_name)
        self.history.log(RankEvent(0, n, int(lora_config.r), r, "init") for n, r in self._ranks.items())
        for p in adalora_params(model, self.adapter_name):
            self._handles.append(p.register_post_accumulate_grad_hook(self._keep_grad))
        return model

    def _keep_grad(self, p: torch.Tensor) -> None:
        # A reference, not a copy: in-place clipping shows, and no memory is added beyond what
        # zero_grad(set_to_none=True) would have freed one step later.
        self._grads[id(p)] = p.grad  # type: ignore[assignment]

    def adalora_config(self, lora_config: Any, total_steps: int | None) -> Any:
        """The ``AdaLoraConfig`` this method trains with (validated here, before any model is touched)."""
        from peft import AdaLoraConfig

        o = self.options
        total = o.total_step if o.total_step is not None else total_steps
        if total is None:
            raise ValueError(
                "AdaLoRA needs the total number of training steps before training (its pruning schedule "
                "depends on it): pass total_steps to prepare() or set total_step"
            )
        r = int(lora_config.r)
        init_r = o.init_r if o.init_r is not None else math.ceil(1.5 * r)
        target_r = o.target_r if o.target_r is not None else r
        if target_r > init_r:
            raise ValueError(f"AdaLoRA prunes ranks: target_r={target_r} must be <= init_r={init_r}")
        tinit, tfinal = _steps(o.tinit, total), _steps(o.tfinal, total)
        if tinit >= total - tfinal:
            raise ValueError(
                f"AdaLoRA's schedule leaves no pruning phase: tinit={tinit} + tfinal={tfinal} steps >= "
                f"total_step={total}; lower tinit/tfinal or train longer"
            )
        self.total_step = total
        return AdaLoraConfig(
            r=8,  # ignored by AdaLoRA (warns otherwise); init_r is the rank
            init_r=init_r,
            target_r=target_r,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=o.delta_t,
            beta1=o.beta1,
            beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight,
            total_step=total,
            target_modules=copy.deepcopy(lora_config.target_modules),
            exclude_modules=copy.deepcopy(getattr(lora_config, "exclude_modules", None)),
            lora_alpha=lora_config.lora_alpha,
            lora_dropout=lora_config.lora_dropout,
            fan_in_fan_out=lora_config.fan_in_fan_out,
            bias=lora_config.bias,
            modules_to_save=copy.deepcopy(lora_config.modules_to_save),
            task_type=lora_config.task_type,
        )

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        return trainable_param_groups(model, lr=lr, weight_decay=weight_decay)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None  # PEFT adds the orthogonality regulariser to outputs.loss itself

    def on_step_end(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        """Run PEFT's ``update_and_allocate(step)`` with this step's gradients; log rank changes."""
        params = adalora_params(model, self.adapter_name)
        borrowed = []
        for p in params:
            if p.grad is None:
                grad = self._grads.get(id(p))
                if grad is None:
                    raise RuntimeError(
                        "AdaLoRA found no gradient for its parameters at on_step_end: call it after backward() "
                        "in every step"
                    )
                p.grad = grad
                borrowed.append(p)
        if all(not torch.any(p.grad) for p in params if p.grad is not None):  # type: ignore[arg-type]
            raise RuntimeError(
                "every AdaLoRA gradient is zero at on_step_end: the loop zeroed them in place; use "
                "optimizer.zero_grad(set_to_none=True) or call on_step_end before zero_grad()"
            )
        try:
            adalora_update_and_allocate(model, step)
        finally:
            for p in borrowed:
                p.grad = None
            self._grads.clear()
        ranks = adalora_ranks(model, self.adapter_name)
        events = self.history.log_changes(step, self._ranks, ranks, "adalora")
        self._ranks = ranks
        return RankMap({n: max(r, 1) for n, r in ranks.items()}, metadata={"step": step}) if events else None

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        """Convert to a plain PEFT LoRA model with per-module ranks and the same outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        ada_ranks = adalora_ranks(model, self.adapter_name)
        shapes = adalora_shapes(model)
        plain = adalora_to_lora(model, self.lora_config, adapter_name=self.adapter_name)
        ranks = current_ranks(plain)
        # Budget over every module AdaLoRA adapted, fully pruned ones at rank 0.
        meta = budget_metadata(
            "adalora", {n: ranks.get(n, 0) for n in shapes}, shapes, int(self.lora_config.r)
        )
        meta["shapes"] = {n: list(s) for n, s in module_shapes(lora_modules(plain)).items()}
        zero_rank = sorted(n for n, r in ada_ranks.items() if r == 0)
        meta["config"] = asdict(self.options)
        meta["zero_rank_modules"] = zero_rank  # not adapted in the LoRA result (see adalora_to_lora)
        return plain, RankMap(ranks, metadata=meta)

    def state_dict(self) -> dict[str, Any]:
        """Rank history and AdaLoRA's importance statistics (EMAs), for an exact resume."""
        return {
            "method": self.name,
            "history": self.history.state_dict(),
            "ranks": dict(self._ranks),
            **adalora_allocator_state(self._model, self.adapter_name),  # rank_pattern, ipt
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"this state is for method {state.get('method')!r}, not {self.name!r}")
        self.history.load_state_dict(state["history"])
        self._ranks = {n: int(r) for n, r in state["ranks"].items()}
        if self._model is not None:
            load_adalora_allocator_state(self._model, state, self.adapter_name)


class _BudgetAllocation:
    """AdaLoRA's allocation with fimlora's budget, installed on PEFT's ``RankAllocator``: in parameters, or
    an explicit rank sum.

    It replaces the allocator's ``budget_schedule`` (same cubic schedule, from every triplet down to the
    budget: ``target_r`` per module, or ``total``) and ``mask_to_budget`` (the most important triplets that
    fit, each costing in_m + out_m of its module in parameters, 1 in ranks, instead of the top-k).
    Importance is still PEFT's (the allocator's EMAs, combined per triplet by its own scoring). Since PEFT
    stores what ``mask_to_budget`` returns as ``rank_pattern`` at tfinal and masks with it afterwards, the
    final ranks are this selection: exactly ``total`` ranks, or at most ``total`` parameters.

    Raises:
        ValueError: a budget larger than every triplet AdaLoRA starts with (init_r per module).
    """

    def __init__(self, model: nn.Module, unit: BudgetUnit, target_r: int, total: int | None = None) -> None:
        self.model = model
        self.costs: dict[str, int] = {}
        self.start = 0
        for name, (r, fan_in, fan_out) in adalora_factor_shapes(model).items():
            self.costs[name] = fan_in + fan_out if unit == "params" else 1
            self.start += r * self.costs[name]
        self.target = total if total is not None else target_r * sum(self.costs.values())
        if self.target > self.start:
            raise ValueError(
                f"AdaLoRA prunes ranks: the {unit} budget {self.target} is more than its {self.start} at "
                "init_r; raise init_r or lower the budget"
            )
        replace_adalora_allocation(
            model, budget_schedule=self.budget_schedule, mask_to_budget=self.mask_to_budget
        )

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget in its unit, whether to mask at this step), as PEFT's schedule decides."""
        tinit, tfinal, total, delta_t = adalora_schedule(self.model)
        budget = cubic_budget(
            step, tinit=tinit, tfinal=tfinal, total=total, start=self.start, end=self.target
        )
        mask = step > tinit and (step > total - tfinal or step % delta_t == 0)
        return budget, mask

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of the triplets left out; PEFT's ``rank_pattern`` of the kept ones."""
        triplets = adalora_triplet_scores(self.model)  # module -> (r,)
        scores: list[float] = []
        costs: list[int] = []
        for name, triplet in triplets.items():
            scores += triplet.tolist()
            costs += [self.costs[name]] * triplet.numel()
        keep = select_within_budget(scores, costs, budget)
        chosen: dict[str, list[bool]] = {}
        start = 0
        for name, triplet in triplets.items():
            chosen[name] = keep[start : start + triplet.numel()]
            start += triplet.numel()
        return mask_adalora_triplets(self.model, chosen)


def _steps(value: float | int, total: int) -> int:
    return int(round(value * total)) if isinstance(value, float) else int(value)
