"""PEFT's own adaptive-rank methods as baselines behind fimlora's method protocol, ending as plain LoRA.

* **AdaLoRA** (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023),
  via ``peft.AdaLoraConfig``. Its adapter is in SVD form, delta_W = B diag(E) A * alpha / (ranknum + 1e-5),
  with pruned singular values E zeroed by a mask; :func:`adalora_to_lora` turns it into a standard LoRA
  adapter with per-module ranks (``rank_pattern``/``alpha_pattern``) and identical outputs.
  ``update_and_allocate`` is called every step from :meth:`AdaLoraMethod.on_step_end` (forgetting it makes
  AdaLoRA silently keep every rank).
* **EVA** (Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
  Adaptation", 2024), via ``peft.initialize_lora_eva_weights``: A is initialised from the right singular
  vectors of the layers' inputs and ranks are redistributed (``rho``) keeping the rank sum r * n. The result
  already is a standard LoRA adapter.

Budgets (``budget_unit``): with ``"ranks"`` (the default, PEFT's own budgets) both hold the *rank sum* of
uniform LoRA at the config's r (AdaLoRA: ``target_r = r``, so its final triplet count is r * n; EVA by
construction), whatever the modules' shapes; their parameter counts then differ from uniform LoRA's. With
``"params"`` both hold uniform LoRA's *parameter count* P = r * sum_m (in_m + out_m) (AdaLoRA: ``target_r``
in place of r), spending it with :func:`select_within_budget`: items in decreasing importance, each
costing in_m + out_m of its module, kept while they fit, so the result stays <= P and the slack is smaller
than any item left out.

* AdaLoRA: the allocator's budget follows PEFT's cubic schedule in parameters, from init_r * sum(in + out)
  down to P, and each masking keeps the most important triplets that fit (PEFT keeps the top-k by
  ``kthvalue``). The final mask (PEFT's ``rank_pattern`` at tfinal) is that selection, so
  :func:`adalora_to_lora` gives a plain LoRA model with <= P parameters.
* EVA: components in decreasing explained-variance ratio (PEFT's order), at most round(rho * r) per
  module (PEFT's maximum), each costing in_m + out_m, until P is spent. A module left with no component is
  not adapted (PEFT puts its base layer back).

The final rank map's metadata reports ``total_rank`` and ``total_params`` next to uniform LoRA's, so a
comparison can say which budget matched.

This module reaches into AdaLoRA's layers (``lora_E``, ``ranknum``) and allocator, and into EVA's rank
distribution, the one place outside :mod:`fimlora.peft_glue` that does: both are specific to these baselines.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from fimlora.allocate import select_within_budget
from fimlora.methods.base import StaticRanksMethod, register_method, trainable_param_groups
from fimlora.methods.history import RankEvent, RankHistory
from fimlora.methods.l1ra import BudgetUnit, _check_budget
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes, pattern_key, scaled_alpha
from fimlora.rankmap import RankMap

__all__ = [
    "AdaLoraMethod",
    "AdaLoraOptions",
    "EvaMethod",
    "EvaOptions",
    "adalora_to_lora",
]


# ---- the budget in parameters (pure) ---------------------------------------------------------------------


def _cubic_budget(step: int, *, tinit: int, tfinal: int, total: int, start: int, end: int) -> int:
    """AdaLoRA's budget at ``step``: ``start`` until tinit, then a cubic decrease to ``end`` reached at
    total - tfinal, then ``end`` (PEFT's ``RankAllocator.budget_schedule``, in any unit)."""
    if step <= tinit:
        return start
    if step >= total - tfinal:
        return end
    left = 1 - (step - tinit) / (total - tfinal - tinit)  # 1 -> 0 over the pruning phase
    return int((start - end) * left**3 + end)


# ---- AdaLoRA ----------------------------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        _check_budget(self.budget_unit, None, None)
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
class AdaLoraMethod:
    """AdaLoRA via PEFT, budget-matched to uniform LoRA's rank sum or parameter count, finalised as plain LoRA.

    ``update_and_allocate`` needs each step's gradients, and the protocol's training loop calls
    ``on_step_end`` after ``optimizer.zero_grad()``. So the method keeps a *reference* to every AdaLoRA
    gradient when backward produces it (a post-accumulate-grad hook; no copy) and hands those to PEFT when
    ``p.grad`` has been set to None. Gradient clipping, which works in place, is seen. A loop that zeroes
    gradients in place (``zero_grad(set_to_none=False)``) before ``on_step_end`` would leave only zeros:
    that is detected and raised rather than letting AdaLoRA silently do nothing.
    """

    name = "adalora"

    def __init__(self, options: AdaLoraOptions | None = None, **overrides: Any) -> None:
        self.options = options or AdaLoraOptions(**overrides)
        self.adapter_name = "default"
        self.history = RankHistory()
        self.lora_config: Any = None
        self.total_step: int | None = None
        self._grads: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._ranks: dict[str, int] = {}
        self._model: nn.Module | None = None

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        """Wrap ``base_model`` with AdaLoRA built from ``lora_config`` (targets, alpha, dropout, task).

        Raises:
            ValueError: no total number of steps, or a schedule with no pruning phase (before wrapping).
        """
        from peft import get_peft_model

        ada_config = self.adalora_config(lora_config, total_steps)
        self.lora_config = copy.deepcopy(lora_config)
        model = get_peft_model(base_model, ada_config)
        if self.options.budget_unit == "params":
            _ParamBudgetAllocation(model, _peft_root(model).rankallocator, int(ada_config.target_r))
        self._model = model
        self._ranks = _adalora_ranks(model, self.adapter_name)
        self.history.log(RankEvent(0, n, int(lora_config.r), r, "init") for n, r in self._ranks.items())
        for p in _adalora_params(model, self.adapter_name):
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
        params = _adalora_params(model, self.adapter_name)
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
            _peft_root(model).update_and_allocate(step)
        finally:
            for p in borrowed:
                p.grad = None
            self._grads.clear()
        ranks = _adalora_ranks(model, self.adapter_name)
        events = self.history.log_changes(step, self._ranks, ranks, "adalora")
        self._ranks = ranks
        return RankMap({n: max(r, 1) for n, r in ranks.items()}, metadata={"step": step}) if events else None

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        """Convert to a plain PEFT LoRA model with per-module ranks and the same outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        ada_ranks = _adalora_ranks(model, self.adapter_name)
        shapes = {n: (int(m.in_features), int(m.out_features)) for n, m in _adalora_layers(model).items()}
        plain = adalora_to_lora(model, self.lora_config, adapter_name=self.adapter_name)
        ranks = current_ranks(plain)
        # Budget over every module AdaLoRA adapted, fully pruned ones at rank 0.
        meta = _budget_metadata(
            "adalora", {n: ranks.get(n, 0) for n in shapes}, shapes, int(self.lora_config.r)
        )
        meta["shapes"] = {n: list(s) for n, s in module_shapes(lora_modules(plain)).items()}
        zero_rank = sorted(n for n, r in ada_ranks.items() if r == 0)
        meta["config"] = asdict(self.options)
        meta["zero_rank_modules"] = zero_rank  # not adapted in the LoRA result (see adalora_to_lora)
        return plain, RankMap(ranks, metadata=meta)

    def state_dict(self) -> dict[str, Any]:
        """Rank history and AdaLoRA's importance statistics (EMAs), for an exact resume."""
        root = _peft_root(self._model) if self._model is not None else None
        alloc = getattr(root, "rankallocator", None)
        cfg = root.peft_config[self.adapter_name] if root is not None else None
        return {
            "method": self.name,
            "history": self.history.state_dict(),
            "ranks": dict(self._ranks),
            "rank_pattern": copy.deepcopy(getattr(cfg, "rank_pattern", None)),
            "ipt": {k: {n: t.detach().cpu().clone() for n, t in getattr(alloc, k, {}).items()} for k in _IPT},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"this state is for method {state.get('method')!r}, not {self.name!r}")
        self.history.load_state_dict(state["history"])
        self._ranks = {n: int(r) for n, r in state["ranks"].items()}
        if self._model is not None:
            root = _peft_root(self._model)
            root.peft_config[self.adapter_name].rank_pattern = copy.deepcopy(state["rank_pattern"])
            device = next(iter(_adalora_params(self._model, self.adapter_name))).device
            for key in _IPT:
                setattr(root.rankallocator, key, {n: t.to(device) for n, t in state["ipt"][key].items()})


_IPT = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def adalora_to_lora(model: nn.Module, lora_config: Any, *, adapter_name: str = "default") -> nn.Module:
    """Rewrite an AdaLoRA PEFT model as a standard LoRA PEFT model with the same outputs.

    AdaLoRA computes delta(x) = (B[:, k] E[k] A[k, :] x) * s / (ranknum + 1e-5) over kept triplets k (the
    mask is PEFT's ``rank_pattern``; without one, every triplet is kept). LoRA computes
    B' A' x * alpha_i / r_i. With A' = (E * A)[kept] (r_i x in) and B' = B[:, kept] * s / (ranknum + 1e-5) /
    (alpha_i / r_i), the two agree; alpha_i = alpha * r_i / r keeps the config's scale convention. A module
    whose triplets are all pruned is excluded from the LoRA adapter (``exclude_modules``; LoRA has no rank
    0), or, when ``exclude_modules`` is a regex, gets one inert rank (B' = 0): outputs unchanged.

    Args:
        model: a PEFT model with an AdaLoRA adapter ``adapter_name``.
        lora_config: the ``LoraConfig`` to build on (its r, alpha, rsLoRA and dropout are used; targets,
            modules to save and task come from the AdaLoRA config).
        adapter_name: the AdaLoRA adapter.

    Returns:
        A new ``PeftModel`` with a LoRA adapter ``"default"`` whose ``save_pretrained`` output loads with
        vanilla PEFT. ``model`` is consumed (its base model is reused).
    """
    from peft import LoraConfig, get_peft_model

    root = _peft_root(model)
    ada_cfg = root.peft_config[adapter_name]
    found = {
        name: _lora_factors(name, layer, adapter_name, ada_cfg)
        for name, layer in _adalora_layers(model).items()
    }
    pruned = sorted(n for n, f in found.items() if f is None)
    exclude = ada_cfg.exclude_modules
    if pruned and not isinstance(exclude, str):
        # A module whose triplets were all pruned is left out of the LoRA adapter (LoRA has no rank 0), so
        # the rank sum stays AdaLoRA's.
        exclude = sorted(set(exclude or ()) | set(pruned))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, f in found.items():
        if f is not None:
            factors[name] = f
        elif isinstance(exclude, str):  # a regex can't be extended safely: one inert rank (B = 0) instead
            layer = _adalora_layers(model)[name]
            a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            factors[name] = (a[:1].detach().clone(), torch.zeros_like(b[:, :1]).detach())
    r, alpha, rslora = int(lora_config.r), lora_config.lora_alpha, bool(lora_config.use_rslora)
    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    alphas = {n: scaled_alpha(alpha, r, k, use_rslora=rslora) for n, k in ranks.items()}
    plain_cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=copy.deepcopy(ada_cfg.target_modules),
        exclude_modules=exclude or None,
        lora_dropout=ada_cfg.lora_dropout,
        fan_in_fan_out=ada_cfg.fan_in_fan_out,
        bias=ada_cfg.bias,
        modules_to_save=copy.deepcopy(ada_cfg.modules_to_save),
        task_type=ada_cfg.task_type,
        rank_pattern={pattern_key(n): k for n, k in ranks.items()},
        alpha_pattern={pattern_key(n): a for n, a in alphas.items()},
    )
    base = root.unload()  # trained modules_to_save copies replace the originals here
    with torch.random.fork_rng(devices=[]):  # LoRA init draws random A; leave the caller's RNG alone
        plain = get_peft_model(base, plain_cfg)
    mods = lora_modules(plain)
    missing = sorted(set(factors) ^ set(mods))
    if missing:
        raise RuntimeError(f"AdaLoRA and LoRA adapt different modules ({missing[:3]}); please report this")
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = mods[name]
            scale = layer.scaling["default"]  # alpha_i / r_i (or / sqrt(r_i)), as PEFT computed it
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b / scale)
    return plain


def _lora_factors(
    name: str, layer: Any, adapter: str, ada_cfg: Any
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A' (r_i x in), B' (out x r_i) with AdaLoRA's whole scale folded in), or None if all are pruned."""
    a, e, b = layer.lora_A[adapter], layer.lora_E[adapter], layer.lora_B[adapter]  # (r, in), (r, 1), (out, r)
    keep = _kept_triplets(name, layer, adapter, ada_cfg)
    scale = layer.scaling[adapter] / (layer.ranknum[adapter] + 1e-5)
    if not keep:
        return None
    index = torch.tensor(keep, device=a.device)
    a_new = (a * e).index_select(0, index).detach().clone()
    b_new = (b.index_select(1, index) * scale).detach().clone()
    return a_new, b_new


def _kept_triplets(name: str, layer: Any, adapter: str, ada_cfg: Any) -> list[int]:
    """Triplets the mask keeps. PEFT keys its ``rank_pattern`` by the name of ``lora_E``, relative to the
    transformers model, with the adapter suffix during training and without it after ``save_pretrained``."""
    pattern = ada_cfg.rank_pattern
    r = layer.lora_E[adapter].shape[0]
    if not pattern:
        return list(range(r))
    mask = pattern.get(f"{name}.lora_E.{adapter}", pattern.get(f"{name}.lora_E"))
    if mask is None:
        return list(range(r))
    return [i for i, keep in enumerate(list(mask)) if bool(keep)]


def _peft_root(model: nn.Module) -> Any:
    """The ``AdaLoraModel`` (tuner) of a ``PeftModel``, or the model itself if it is the tuner."""
    return getattr(model, "base_model", model) if hasattr(model, "peft_config") else model


def _adalora_layers(model: nn.Module) -> dict[str, Any]:
    """Module name (as in LoRA's ``lora_modules``) -> AdaLoRA layer."""
    from peft.tuners.adalora import AdaLoraLayer

    root = _peft_root(model)
    out = {}
    for name, module in root.model.named_modules():
        if isinstance(module, AdaLoraLayer):
            out[name] = module
    if not out:
        raise TypeError("the model has no AdaLoRA layers")
    return out


def _adalora_params(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    params = []
    for layer in _adalora_layers(model).values():
        params += [layer.lora_A[adapter], layer.lora_E[adapter], layer.lora_B[adapter]]
    return params


def _adalora_ranks(model: nn.Module, adapter: str) -> dict[str, int]:
    """Effective ranks: triplets kept by the current mask (0 is possible)."""
    root = _peft_root(model)
    cfg = root.peft_config[adapter]
    return {n: len(_kept_triplets(n, layer, adapter, cfg)) for n, layer in _adalora_layers(model).items()}


class _ParamBudgetAllocation:
    """AdaLoRA's allocation with its budget in parameters, installed on one PEFT ``RankAllocator``.

    It replaces the allocator's ``budget_schedule`` (same cubic schedule, from init_r * sum(in + out) down
    to target_r * sum(in + out)) and ``mask_to_budget`` (the most important triplets that fit, each costing
    in_m + out_m of its module, instead of the top-k). Importance is still PEFT's: the allocator's EMAs,
    combined per triplet by its own ``_element_score`` and ``_combine_ipt``. Since PEFT stores what
    ``mask_to_budget`` returns as ``rank_pattern`` at tfinal and masks with it afterwards, the final ranks
    are this selection.
    """

    def __init__(self, model: nn.Module, allocator: Any, target_r: int) -> None:
        self.allocator = allocator
        self.adapter = allocator.adapter_name
        self.layers = _adalora_layers(model)
        self.costs: dict[str, int] = {}
        self.start = 0
        for name, layer in self.layers.items():
            a, b = layer.lora_A[self.adapter], layer.lora_B[self.adapter]  # (r, in), (out, r)
            self.costs[name] = int(a.shape[1] + b.shape[0])
            self.start += int(a.shape[0]) * self.costs[name]
        self.target = target_r * sum(self.costs.values())
        allocator.budget_schedule = self.budget_schedule
        allocator.mask_to_budget = self.mask_to_budget

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget in parameters, whether to mask at this step), as PEFT's schedule decides."""
        cfg = self.allocator.peft_config
        tinit, tfinal, total = cfg.tinit, cfg.tfinal, cfg.total_step
        budget = _cubic_budget(
            step, tinit=tinit, tfinal=tfinal, total=total, start=self.start, end=self.target
        )
        mask = step > tinit and (step > total - tfinal or step % cfg.deltaT == 0)
        return budget, mask

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of the triplets left out; PEFT's ``rank_pattern`` of the kept ones."""
        alloc, adapter = self.allocator, self.adapter
        scores: list[float] = []
        costs: list[int] = []
        for name in self.layers:
            ipt_e = alloc._element_score(f"{name}.lora_E.{adapter}")  # (r, 1)
            ipt_a = alloc._element_score(f"{name}.lora_A.{adapter}").mean(dim=1, keepdim=True)  # (r, 1)
            ipt_b = alloc._element_score(f"{name}.lora_B.{adapter}").mean(dim=0).view(-1, 1)  # (r, 1)
            triplet = alloc._combine_ipt(ipt_e, torch.cat([ipt_a, ipt_b], dim=1))  # (r,)
            scores += triplet.tolist()
            costs += [self.costs[name]] * triplet.numel()
        keep = select_within_budget(scores, costs, budget)
        pattern: dict[str, list[bool]] = {}
        start = 0
        with torch.no_grad():
            for name, layer in self.layers.items():
                e = layer.lora_E[adapter]  # (r, 1)
                kept = keep[start : start + e.shape[0]]
                start += e.shape[0]
                e.masked_fill_(~torch.tensor(kept, device=e.device).view(-1, 1), 0.0)
                pattern[f"{name}.lora_E.{adapter}"] = kept
        return pattern


def _steps(value: float | int, total: int) -> int:
    return int(round(value * total)) if isinstance(value, float) else int(value)


def _budget_metadata(
    method: str, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], r: int
) -> dict[str, Any]:
    uniform_params = r * sum(i + o for i, o in shapes.values())
    total_params = sum(k * (shapes[n][0] + shapes[n][1]) for n, k in ranks.items())
    return {
        "method": method,
        "lora_r": r,
        "total_rank": sum(ranks.values()),
        "uniform_rank": r * len(ranks),
        "total_params": total_params,
        "uniform_params": uniform_params,
        "params_vs_uniform": total_params / uniform_params,
        "shapes": {n: list(s) for n, s in shapes.items()},
    }


# ---- EVA ----------------------------------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        _check_budget(self.budget_unit, None, None)
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

    def __init__(self, options: EvaOptions | None = None, **overrides: Any) -> None:
        self.options = options or EvaOptions(**overrides)
        self.rank_map: RankMap | None = None
        self.lora_r = 0

    def prepare(
        self,
        base_model: nn.Module,
        lora_config: Any,
        *,
        calibration_batches: Iterable[Any] | None = None,
        total_steps: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        """Wrap with LoRA, run EVA on the first ``calibration_batches`` dict batches, fix the ranks.

        Raises:
            ValueError: no calibration batches, or batches that are not dicts of model inputs.
        """
        from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

        if calibration_batches is None:
            raise ValueError("the 'eva' method needs calibration batches (dicts of model inputs)")
        batches = []
        for batch in calibration_batches:
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError("EVA needs dict batches with `input_ids` (as passed to model(**batch))")
            batches.append(dict(batch))
            if len(batches) == self.options.calibration_batches:
                break
        if not batches:
            raise ValueError("the calibration batches are empty")
        o = self.options
        cfg = copy.deepcopy(lora_config)
        cfg.init_lora_weights = "eva"
        cfg.eva_config = EvaConfig(
            rho=o.rho,
            tau=o.tau,
            use_label_mask=o.use_label_mask,
            label_mask_value=o.label_mask_value,
            whiten=o.whiten,
            adjust_scaling_factors=True,  # keep every module's scale alpha/r, as fimlora does
        )
        if o.budget_unit == "params" and cfg.rank_pattern:
            raise ValueError(
                "EVA with budget_unit='params' holds uniform LoRA's parameter count: the LoRA config must not "
                "have a rank_pattern"
            )
        model = get_peft_model(base_model, cfg)
        self.lora_r = int(lora_config.r)
        shapes = module_shapes(lora_modules(model))  # before EVA drops the modules it gives no component
        forward = _BoundedForward(o.max_passes * len(batches), o.rho * self.lora_r)
        if o.budget_unit == "params":
            budget = self.lora_r * sum(i + j for i, j in shapes.values())
            state = _eva_state_dict_within_params(model, batches, budget, forward)
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
        meta = _budget_metadata("eva", {n: ranks.get(n, 0) for n in shapes}, shapes, self.lora_r)
        meta["config"] = asdict(o)
        meta["zero_rank_modules"] = sorted(set(shapes) - set(ranks))
        self.rank_map = RankMap(ranks, metadata=meta)
        return model


def _eva_state_dict_within_params(
    model: nn.Module, batches: list[dict[str, Any]], budget: int, forward: _BoundedForward
) -> dict[str, torch.Tensor]:
    """PEFT's EVA state dict (layer name -> A, shape (rank, in)) with ranks that hold ``budget`` parameters.

    Every component a module may get (round(rho * r), PEFT's maximum) is made a candidate by asking PEFT for
    rank round(rho * r) at rho = 1; :class:`_CostWeightedEvaRanks` then chooses among them.
    """
    from peft import get_eva_state_dict

    cfg: Any = copy.copy(cast(Any, model).peft_config["default"])
    most = round(int(cfg.r) * cfg.eva_config.rho)
    cfg.r = most
    cfg.eva_config = dataclasses.replace(cfg.eva_config, rho=1.0)
    mods = lora_modules(model)
    cost = {n: i + j for n, (i, j) in module_shapes(mods).items()}
    by_id = {id(m): n for n, m in mods.items()}
    costs = {full: cost[by_id[id(m)]] for full, m in model.named_modules() if id(m) in by_id}
    selection = _CostWeightedEvaRanks(costs, budget, most)
    with selection.installed():
        state = get_eva_state_dict(
            model,
            batches,
            peft_config=cfg,
            forward_fn=forward,
            prepare_model_inputs_fn=_eva_token_indices,
            prepare_layer_inputs_fn=_eva_layer_inputs,
            show_progress_bar=False,
        )
    return selection.restore_choice(state)


class _CostWeightedEvaRanks:
    """EVA's rank distribution with a budget in parameters, swapped into PEFT 0.21's EVA while installed.

    PEFT chooses EVA's ranks in ``_get_rank_distribution``, a function nested in ``_get_eva_state_dict``
    that cannot be replaced. It sorts every candidate component by explained-variance ratio, takes the
    first ``rank_budget`` and counts them per layer with ``collections.Counter``, looked up in the EVA
    module's globals. When every candidate fits in ``rank_budget`` (the caller asks for rank round(rho * r)
    at rho = 1), that ``Counter`` receives the layer name of *every* component in PEFT's order; standing in
    for it, this object keeps the components that fit in the parameter budget (:func:`select_within_budget`,
    cost in_m + out_m) and returns their counts. Everything else stays PEFT's: convergence is checked on the
    chosen components only, and a layer given 0 components is later put back to its base layer.

    One thing is undone afterwards: layers that see the same input share one SVD, and PEFT swaps their counts
    so that the layer holding the SVD has the largest (its convergence covers them all). With equal costs
    that is harmless; with different ones (LLaMA's k/v projections are narrower than q) it would change the
    parameter count, so :meth:`restore_choice` gives each layer back its chosen count, as a prefix of the
    shared components. ``find_equal_values`` is wrapped to learn those groups.
    """

    def __init__(self, costs: Mapping[str, int], budget: int, most: int) -> None:
        self.costs = dict(costs)  # PEFT layer name (with base_model.model.) -> in + out
        self.budget = budget
        self.most = most
        self.counts: dict[str, int] | None = None
        self.groups: list[list[str]] = []

    def __call__(self, ordered: Iterable[str]) -> Counter[str]:
        """``Counter(layer names of the chosen components)``, from the names of all components, best first."""
        names = list(ordered)
        if len(names) != self.most * len(self.costs) or not set(names) <= set(self.costs):
            raise RuntimeError(
                "EVA's rank distribution did not receive every candidate component; this PEFT version's EVA "
                "differs from the one fimlora's budget_unit='params' was written for (peft 0.21)"
            )
        scores = [float(len(names) - i) for i in range(len(names))]  # PEFT's order, best first
        keep = select_within_budget(scores, [self.costs[n] for n in names], self.budget)
        counts = Counter(n for n, k in zip(names, keep, strict=True) if k)
        self.counts = {n: counts.get(n, 0) for n in self.costs}
        return counts

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Stand in for PEFT EVA's ``Counter`` and record its equal-input groups; restored on exit or error."""
        from peft.tuners.lora import eva

        counter, find_equal_values = eva.Counter, eva.find_equal_values
        if counter is not Counter:
            raise RuntimeError("PEFT's EVA rank distribution is already replaced (nested EVA runs?)")

        def record_groups(hashes: dict[str, Any]) -> dict[Any, list[str]]:
            groups = find_equal_values(hashes)
            self.groups = [list(names) for names in groups.values()]
            return groups

        setattr(eva, "Counter", self)  # noqa: B010 - a module global, replaced on purpose
        setattr(eva, "find_equal_values", record_groups)  # noqa: B010
        try:
            yield
        finally:
            setattr(eva, "Counter", counter)  # noqa: B010
            setattr(eva, "find_equal_values", find_equal_values)  # noqa: B010

    def restore_choice(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with every layer at its chosen count (undoing PEFT's swaps within equal-input groups).

        Raises:
            RuntimeError: the distribution never ran, or PEFT's ranks are not the chosen ones up to those swaps.
        """
        if self.counts is None:
            raise RuntimeError("EVA's rank distribution never ran (no layer computed an SVD)")
        counts = self.counts
        for group in self.groups:
            if sorted(state[n].shape[0] for n in group) != sorted(counts[n] for n in group):
                raise RuntimeError(f"EVA's ranks of the equal-input layers {group} are not the chosen ones")
            shared = state[max(group, key=lambda n: state[n].shape[0])]  # (most of the group, in)
            for name in group:
                state[name] = shared[: counts[name]].clone()
        wrong = sorted(n for n, u in state.items() if u.shape[0] != counts.get(n))
        if wrong or set(state) != set(counts):
            raise RuntimeError(
                f"EVA's ranks are not the chosen ones ({(wrong or sorted(set(state) ^ set(counts)))[:3]})"
            )
        return state


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
            raise RuntimeError(
                f"EVA did not converge in {self.limit} forward passes. A layer whose input has fewer rows per "
                f"batch than rho * r = {self.components:g} components never can (e.g. BERT's pooler: one row "
                "per sequence): use larger calibration batches, a lower rho, or leave that layer out of "
                "target_modules; or raise max_passes / lower tau"
            )
        return model(**inputs)
