"""LR-LoRA: the rank of each LoRA module is learned during training, then truncated inside the budget.

After Garg, Lucey, Saratchandran, arXiv 2606.04325 ("the adapter rank is learned during training", per
layer, no fixed rank). No code is public; this is our design for that abstract, written up with its
equations in ``docs/methods/lrlora.md``:

* each module m has ``R_m`` physical rank columns and a learnable cutoff tau_m (in rank units); a soft
  mask over rank indices k = 0..R_m-1 sits between A and B (same hook as L1RA's gates)::

      mask_mk = sigmoid((tau_m - k - 1/2) / T),      soft rank rho_m = sum_k mask_mk

* the budget is an equality constraint on the soft ranks, g = sum_m c_m rho_m / Budget - 1 = 0 (c_m = 1
  for a rank budget, in_m + out_m for a parameter budget): the budget is spent, training decides where.
  It is handled with an augmented Lagrangian: the loss gets mu * g + kappa/2 * g^2 and
  mu <- mu + eta * g after every step;
* the temperature T is annealed geometrically from ``temperature_start`` to ``temperature_end``, so the
  mask hardens into a step and the final truncation barely changes the function;
* at ``truncate_at`` of training (default 90%), integer ranks come from the soft ranks by the exact
  allocator (sum r_m = R, or sum r_m c_m <= P), columns k >= r_m are dropped, the remaining mask values
  are folded into B and the hooks removed; the rest of training is plain LoRA at those ranks, which
  repairs what the truncation of a fractional cutoff changed (like AdaLoRA's final phase). Optimizer
  state is carried over for the surviving columns (:mod:`.optim_state`).

B = 0 at init makes dL/dtau = 0 at the first step (no column contributes yet); tau starts at the
uniform rank, where the budget term is also zero, so nothing moves until B has learnt something. Only the
columns near the cutoff carry gradient to tau (dmask/dtau = mask (1 - mask) / T), which is what decides
whether the cutoff should move.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fimlora import peft_glue  # peft_glue.lora_config: in prepare(), `lora_config` is the argument
from fimlora.config import BudgetUnit
from fimlora.methods.base import MethodBase, Preparation, register_method, trainable_param_groups
from fimlora.methods.budget import RankBudget, check_budget, check_float, check_int, initial_ranks
from fimlora.methods.gates import RankScaleHooks, module_of_key, param_key, resize_keep_scale
from fimlora.methods.history import RankEvent, RankHistory
from fimlora.methods.optim_state import ParamRemap, carry_optimizer_state
from fimlora.peft_glue import (
    current_ranks,
    lora_factor_params,
    lora_factors,
    lora_modules,
    module_shapes,
)
from fimlora.rankmap import RankMap

__all__ = ["LrLoraOptions", "LrLoraMethod", "soft_rank_mask"]


@dataclass
class LrLoraOptions:
    """LR-LoRA hyper-parameters. Each field's docstring is its help text."""

    r_max: int | None = None
    """Physical rank columns per module, the most it can learn. Default: 2r, capped at min(in, out)."""

    r_min: int = 1
    """Smallest rank any module is truncated to."""

    budget_unit: BudgetUnit = "ranks"
    """What the constraint holds: the rank sum ("ranks") or the LoRA parameter count ("params")."""

    budget_ranks: int | None = None
    """Total rank (default: uniform LoRA at the config's r). Only with budget_unit="ranks"."""

    budget_params: int | None = None
    """Parameter count (default: uniform LoRA at r). Only with budget_unit="params"."""

    cutoff_lr: float = 0.05
    """Learning rate of the cutoffs tau (in rank units; Adam moves them about this much per step)."""

    dual_lr: float = 0.5
    """Step size eta of the multiplier update mu <- max(0, mu + eta * g)."""

    penalty_weight: float = 1.0
    """kappa of the quadratic term kappa/2 * g^2 (>= 0)."""

    temperature_start: float = 1.0
    """Mask temperature at the first step (in rank units: how many columns the soft edge spans)."""

    temperature_end: float = 0.05
    """Mask temperature at the last step (annealed geometrically)."""

    seed: int = 0
    """Seed for the random A of the extra physical columns (the global RNG is not consumed)."""

    truncate_at: float = 0.9
    """Fraction of training after which ranks are made integer and training goes on as plain LoRA (1.0: at
    the end, with no repair phase)."""

    history_path: str | None = None
    """JSONL file for rank changes (the rounded soft rank of a module, and the final truncation)."""

    def __post_init__(self) -> None:
        check_int("r_min", self.r_min, minimum=1)
        if self.r_max is not None:
            check_int("r_max", self.r_max, minimum=self.r_min)
        check_budget(self.budget_unit, self.budget_ranks, self.budget_params)
        check_float("cutoff_lr", self.cutoff_lr, low=0.0, strict=True)
        check_float("dual_lr", self.dual_lr, low=0.0)
        check_float("penalty_weight", self.penalty_weight, low=0.0)
        check_float("temperature_start", self.temperature_start, low=0.0, strict=True)
        check_float("temperature_end", self.temperature_end, low=0.0, strict=True)
        check_float("truncate_at", self.truncate_at, low=0.0, strict=True)
        if self.truncate_at > 1.0:
            raise ValueError(f"`truncate_at` is a fraction of training in (0, 1], got {self.truncate_at}")
        if self.temperature_end > self.temperature_start:
            raise ValueError(
                "`temperature_end` must be <= `temperature_start` (the mask hardens over training)"
            )


def soft_rank_mask(tau: torch.Tensor, r: int, temperature: float) -> torch.Tensor:
    """mask_k = sigmoid((tau - k - 1/2) / T) for k = 0..r-1; shape (r,). Monotone decreasing in k.

    Offsetting by 1/2 puts the edge between columns: with tau = 3 and small T, columns 0, 1, 2 are on.
    """
    k = torch.arange(r, device=tau.device, dtype=tau.dtype)
    return torch.sigmoid((tau - k - 0.5) / temperature)


@register_method("lrlora")
class LrLoraMethod(MethodBase):
    """LR-LoRA: a learnable soft rank cutoff per module under a budget constraint, truncated late; plain LoRA at the end.

    Resume: :meth:`prepare` as for a new run, then :meth:`load_state_dict` with the saved state (physical
    ranks don't change during training, so the model needs no resize); then adapter weights, optimizer.
    """

    name = "lrlora"
    options_class = LrLoraOptions

    def __init__(self, options: LrLoraOptions | None = None, **fields: Any) -> None:
        super().__init__(options, **fields)
        self.adapter_name = "default"
        self.cutoffs = nn.ParameterDict()
        self.capacity: dict[str, int] = {}
        self.budget: RankBudget | None = None
        self.multiplier = 0.0
        self.temperature = self.options.temperature_start
        self.total_steps = 0
        self.history = RankHistory(self.options.history_path)
        self._rounded: dict[str, int] = {}
        self._hooks = RankScaleHooks(self._mask, self.adapter_name)
        self._model: nn.Module | None = None
        self.truncated: dict[str, int] | None = None  # the integer ranks, once truncated
        self.truncate_step = 0

    # -- protocol ---------------------------------------------------------------------------------------
    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """The budget within the rank bounds (see :meth:`fimlora.methods.base.MethodBase.check_budget`)."""
        o = self.options
        initial_ranks(
            RankBudget.resolve(shapes, r, o.budget_unit, o.budget_ranks, o.budget_params),
            o.r_min,
            _capacity(shapes, r, o.r_max),
            r,
            "LR-LoRA",
        )

    def setup(self, base_model: nn.Module, lora_config: Any, prep: Preparation) -> nn.Module:
        """Wrap with LoRA at ``r_max`` physical columns, cutoffs at the budget's even split.

        Raises:
            ValueError: no ``total_steps`` (the temperature schedule needs it), DoRA, infeasible budget.
        """
        from peft import get_peft_model

        total_steps = prep.total_steps
        if total_steps is None:
            raise ValueError("LR-LoRA anneals its mask over training: prepare() needs `total_steps`")
        check_int("total_steps", total_steps, minimum=1)
        if getattr(lora_config, "use_dora", False):
            raise ValueError("LR-LoRA's mask sits between A and B; DoRA adapters are not supported")
        self.total_steps = total_steps
        self.truncate_step = max(1, round(self.options.truncate_at * total_steps))
        model = get_peft_model(base_model, copy.deepcopy(lora_config))
        cfg = peft_glue.lora_config(model)
        shapes = module_shapes(lora_modules(model, self.adapter_name), self.adapter_name)
        c = self.options
        self.budget = RankBudget.resolve(shapes, cfg.r, c.budget_unit, c.budget_ranks, c.budget_params)
        self.capacity = _capacity(shapes, cfg.r, c.r_max)
        initial = initial_ranks(self.budget, c.r_min, self.capacity, cfg.r, "LR-LoRA")
        resize_keep_scale(model, self.capacity, self.adapter_name, keep=None, seed=c.seed)
        self.cutoffs = nn.ParameterDict(
            {
                param_key(n): nn.Parameter(torch.tensor(float(initial[n]), device=_device(model, n)))
                for n in initial
            }
        )
        self._model = model
        self._hooks.install(lora_modules(model, self.adapter_name))
        self._rounded = self.soft_ranks_rounded()
        self.history.log(RankEvent(0, n, int(cfg.r), r, "init") for n, r in self._rounded.items())
        return model

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """LoRA factors at ``lr``; cutoffs at ``cutoff_lr``, without weight decay."""
        for name, module in lora_modules(model, self.adapter_name).items():
            tau = self.cutoffs[param_key(name)]
            tau.data = tau.data.to(lora_factors(module, self.adapter_name)[1].weight.device)
        groups = trainable_param_groups(model, lr=lr, weight_decay=weight_decay)
        groups.append(
            {"params": list(self.cutoffs.values()), "lr": self.options.cutoff_lr, "weight_decay": 0.0}
        )
        return groups

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """mu * g + kappa/2 * g^2 with g = soft budget use / budget - 1."""
        if self.truncated is not None:
            return None
        g = self._violation()
        return self.multiplier * g + 0.5 * self.options.penalty_weight * g**2

    def on_step_end(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        """Dual ascent on mu, anneal T; truncate at the schedule. Returns the ranks when they changed."""
        if self.truncated is not None:
            return None
        if step + 1 >= self.truncate_step and step + 1 < self.total_steps:
            if optimizer is None:
                raise ValueError(
                    "LR-LoRA truncates ranks during training and needs the optimizer in on_step_end"
                )
            return self._truncate(model, step, optimizer)
        with torch.no_grad():
            g = float(self._violation())
            self.multiplier += self.options.dual_lr * g
            for name, tau in self.cutoffs.items():  # a cutoff outside [r_min, R] has no gradient left
                tau.clamp_(float(self.options.r_min), float(self.capacity[module_of_key(name)]))
        self.temperature = self._temperature_at(step + 1)
        rounded = self.soft_ranks_rounded()
        events = self.history.log_changes(step, self._rounded, rounded, "lrlora-soft-rank")
        self._rounded = rounded
        return RankMap(rounded, metadata={"method": self.name, "step": step}) if events else None

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        """A plain PEFT LoRA model at integer ranks inside the budget (truncating now if not done yet)."""
        if self.truncated is None:
            self._truncate(model, self.total_steps, None)
        assert self.budget is not None and self.truncated is not None
        final = current_ranks(model, self.adapter_name)
        shapes = module_shapes(lora_modules(model, self.adapter_name), self.adapter_name)
        cfg = peft_glue.lora_config(model)
        meta = {
            "method": self.name,
            "lora_r": cfg.r,
            "config": asdict(self.options),
            "budget": {**self.budget.to_dict(), "used": self.budget.used(final)},
            "cutoffs": {n: float(t.detach()) for n, t in self._cutoffs_by_name().items()},
            "truncated_at_step": self.truncate_step,
            "total_params": sum(r * (shapes[n][0] + shapes[n][1]) for n, r in final.items()),
            "uniform_params": cfg.r * sum(i + o for i, o in shapes.values()),
            "shapes": {n: list(s) for n, s in shapes.items()},
        }
        return model, RankMap(final, metadata=meta)

    def state_dict(self) -> dict[str, Any]:
        """Cutoffs, multiplier, temperature and history: enough to resume exactly."""
        return {
            "method": self.name,
            "config": asdict(self.options),
            "cutoffs": {n: t.detach().cpu().clone() for n, t in self._cutoffs_by_name().items()},
            "multiplier": self.multiplier,
            "temperature": self.temperature,
            "total_steps": self.total_steps,
            "rounded": dict(self._rounded),
            "truncated": dict(self.truncated) if self.truncated is not None else None,
            "truncate_step": self.truncate_step,
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"this state is for method {state.get('method')!r}, not {self.name!r}")
        with torch.no_grad():
            for n, t in state["cutoffs"].items():
                self.cutoffs[param_key(n)].copy_(t)
        self.multiplier = float(state["multiplier"])
        self.temperature = float(state["temperature"])
        self.total_steps = int(state["total_steps"])
        self._rounded = {n: int(r) for n, r in state["rounded"].items()}
        self.history.load_state_dict(state["history"])
        self.truncate_step = int(state["truncate_step"])
        if state["truncated"] is not None:  # rebuild the model at the truncated ranks, without the mask
            if self._model is None:
                raise RuntimeError(
                    "call prepare() before load_state_dict(): the model must exist to be resized"
                )
            self.truncated = {n: int(r) for n, r in state["truncated"].items()}
            self._hooks.remove()
            resize_keep_scale(
                self._model, self.truncated, self.adapter_name, keep=None, seed=self.options.seed
            )

    # -- LR-LoRA-specific ------------------------------------------------------------------------------
    def soft_ranks(self) -> dict[str, float]:
        """rho_m = sum_k mask_mk at the current temperature."""
        with torch.no_grad():
            return {n: float(self._mask(n).sum()) for n in self.capacity}

    def soft_ranks_rounded(self) -> dict[str, int]:
        return {n: max(1, round(v)) for n, v in self.soft_ranks().items()}

    def _truncate(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None) -> RankMap:
        """Integer ranks from the soft ranks (exact budget), fold the mask into B, drop the tail columns."""
        assert self.budget is not None, "prepare() first"
        soft = self.soft_ranks()
        ranks = self.budget.allocate(soft, dict.fromkeys(soft, self.options.r_min), self.capacity)
        mods = lora_modules(model, self.adapter_name)
        with torch.no_grad():
            for name, module in mods.items():
                weight = lora_factors(module, self.adapter_name)[1].weight  # (out, R)
                weight.mul_(self._mask(name).to(weight.dtype).unsqueeze(0))
        self._hooks.remove()
        old = {n: lora_factor_params(mods[n], self.adapter_name) for n in mods}
        keep = {n: list(range(r)) for n, r in ranks.items()}  # the mask is decreasing: first columns win
        resize_keep_scale(model, ranks, self.adapter_name, keep=keep, seed=self.options.seed)
        if optimizer is not None:
            mods = lora_modules(model, self.adapter_name)
            remaps: list[ParamRemap] = []
            for n, old_params in old.items():
                new_params = lora_factor_params(mods[n], self.adapter_name)
                remaps += [
                    ParamRemap(old_params[0], new_params[0], 0, keep[n]),  # A: (r, in)
                    ParamRemap(old_params[1], new_params[1], 1, keep[n]),  # B: (out, r)
                ]
                if len(old_params) == 3:  # lora_bias: not rank-shaped, carried whole
                    bias = old_params[2]
                    remaps.append(ParamRemap(bias, new_params[2], 0, list(range(bias.shape[0]))))
            carry_optimizer_state(optimizer, remaps)
        final = current_ranks(model, self.adapter_name)
        # Every module, changed or not: the truncation is the event that fixes the adapter's ranks.
        self.history.log(
            RankEvent(step, n, self._rounded[n], r, "lrlora-truncate", {"soft_rank": soft[n]})
            for n, r in final.items()
        )
        self._rounded = dict(final)
        self.truncated = dict(final)
        self.truncate_step = min(self.truncate_step, step + 1)
        return RankMap(final, metadata={"method": self.name, "step": step})

    # -- internals --------------------------------------------------------------------------------------
    def _mask(self, name: str) -> torch.Tensor:
        return soft_rank_mask(self.cutoffs[param_key(name)], self.capacity[name], self.temperature)

    def _cutoffs_by_name(self) -> dict[str, nn.Parameter]:
        return {module_of_key(k): v for k, v in self.cutoffs.items()}

    def _violation(self) -> torch.Tensor:
        """g = sum_m c_m rho_m / Budget - 1 (differentiable in the cutoffs)."""
        assert self.budget is not None, "prepare() first"
        used = sum(self.budget.costs[n] * self._mask(n).sum() for n in self.capacity)
        return torch.as_tensor(used) / self.budget.total - 1.0

    def _temperature_at(self, step: int) -> float:
        c = self.options
        frac = min(1.0, step / max(1, self.total_steps - 1))
        return c.temperature_start * math.exp(frac * math.log(c.temperature_end / c.temperature_start))


def _device(model: nn.Module, name: str) -> torch.device:
    return lora_factors(lora_modules(model)[name])[1].weight.device


def _capacity(shapes: Mapping[str, tuple[int, int]], r: int, r_max: int | None) -> dict[str, int]:
    """Each module's rank capacity: r_max (default 2r), never above min(in, out)."""
    cap = r_max if r_max is not None else 2 * r
    return {n: min(cap, min(s)) for n, s in shapes.items()}
