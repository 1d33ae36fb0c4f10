"""L1RA: L1-regularised gates that prune LoRA ranks and reassign them during training.

Singh, Brunello, Scotti, Carman, "L1RA: Dynamic Rank Assignment in LoRA Fine-Tuning", arXiv 2509.04884.

Every adapted module m gets a gate vector g_m (one entry per rank, initialised to 1) between A and B::

    delta_m(x) = s_m * B_m diag(g_m) A_m x,        loss = task loss + lam * mean_m ||g_m||_1

The gates have their own learning rate and are clamped to [0, 1] after each optimizer step. Every
``reallocate_every`` of training, gate entries below ``prune_threshold`` are pruned (at least ``r_min``
kept per module) and the freed budget goes to the modules whose gates are most saturated (highest mean
gate); new columns start with random A, zero B and gate 1, so the model's output does not change. At
the end, gates are folded into B (B <- B diag(g)) and the hooks removed: a plain PEFT LoRA adapter.

Differences from the published code, on purpose:

* the budget is held exactly as a rank sum, *or* as a parameter count sum_m r_m (in_m + out_m) (the
  published code holds the rank sum only, and its parameter count drifted by +14%);
* modules keep their scale alpha/r (alpha_m = alpha * r_m / r), so adding or dropping zero columns does
  not change the output;
* optimizer state is carried for surviving columns and zero for new ones (:mod:`.optim_state`).

The gates live in the method (an ``nn.ParameterDict``), not in the model, so the model's state dict stays
a standard LoRA one; :meth:`L1raMethod.state_dict` holds gates, ranks, history and the schedule. They are
applied with a forward pre-hook on each ``lora_B`` (its input has shape (..., r)), so no PEFT layer is
subclassed. The hooks and scale-keeping resizes (:mod:`.gates`) and the budget (:mod:`.budget`) are shared
with LR-LoRA.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fimlora import peft_glue  # peft_glue.lora_config: in prepare(), `lora_config` is the argument
from fimlora.config import BudgetUnit
from fimlora.methods.base import MethodBase, Preparation, register_method, trainable_param_groups
from fimlora.methods.budget import RankBudget, check_budget, check_float, check_int, initial_ranks
from fimlora.methods.gates import (
    RankScaleHooks,
    module_of_key,
    param_key,
    resize_keep_scale,
    write_scaled_patterns,
)
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

__all__ = [
    "L1raOptions",
    "L1raMethod",
    "Reallocation",
    "plan_reallocation",
]


@dataclass
class L1raOptions:
    """L1RA hyper-parameters. Each field's docstring is its help text."""

    l1_lambda: float = 1e-3
    """Weight lam of the penalty lam * mean over modules of ||gate||_1 (>= 0)."""

    gate_lr: float = 1e-2
    """Learning rate of the gates (their own optimizer group, no weight decay)."""

    prune_threshold: float = 1e-2
    """Gate entries below this value are pruned at a reallocation (0 <= threshold < 1)."""

    reallocate_every: float | int = 0.1
    """Reallocation period: a fraction of the training steps (float in (0, 1)) or a number of steps (int)."""

    r_min: int = 1
    """Fewest ranks a module keeps after pruning (the largest gates survive)."""

    r_max: int | None = None
    """Most ranks a module can grow to. Default: four times the LoRA rank, capped at min(in, out)."""

    budget_unit: BudgetUnit = "ranks"
    """What is held constant: the rank sum ("ranks") or the LoRA parameter count ("params")."""

    budget_ranks: int | None = None
    """Total rank to hold (default: uniform LoRA at the config's r). Only with budget_unit="ranks"."""

    budget_params: int | None = None
    """Parameter count to hold (default: uniform LoRA at r). Only with budget_unit="params"."""

    seed: int = 0
    """Seed of the random A columns added at reallocations (the global RNG is not consumed)."""

    start: str = "uniform"
    """Initial ranks: "uniform" (the budget split evenly, L1RA's) or "fim" (FIM-LoRA's map from the first calibration batches, within [max(r_min, r/2), r_max])."""

    start_calibration_batches: int = 8
    """Calibration batches of the "fim" start (FIM-LoRA's T)."""

    history_path: str | None = None
    """JSONL file that every rank change is appended to (None: kept in memory and in the state dict)."""

    def __post_init__(self) -> None:
        check_float("l1_lambda", self.l1_lambda, low=0.0)
        check_float("gate_lr", self.gate_lr, low=0.0, strict=True)
        check_float("prune_threshold", self.prune_threshold, low=0.0)
        if self.prune_threshold >= 1.0:
            raise ValueError(
                f"`prune_threshold` must be < 1 (gates live in [0, 1]), got {self.prune_threshold}"
            )
        _check_schedule(self.reallocate_every)
        check_int("r_min", self.r_min, minimum=1)
        if self.r_max is not None:
            check_int("r_max", self.r_max, minimum=self.r_min)
        check_budget(self.budget_unit, self.budget_ranks, self.budget_params)
        if self.start not in ("uniform", "fim"):
            raise ValueError(f"`start` must be 'uniform' or 'fim', got {self.start!r}")
        check_int("start_calibration_batches", self.start_calibration_batches, minimum=1)


# ---- the reallocation rule (pure: plain lists in, plain dicts out) ---------------------------------------


@dataclass(frozen=True)
class Reallocation:
    """Result of :func:`plan_reallocation`.

    Attributes:
        ranks: module -> new rank.
        keep: module -> old rank indices that survive, in their old order (they become columns 0..k-1).
        pruned: module -> number of columns dropped.
        added: module -> number of fresh columns (random A, zero B, gate 1).
    """

    ranks: dict[str, int]
    keep: dict[str, list[int]]
    pruned: dict[str, int]
    added: dict[str, int]

    @property
    def changed(self) -> list[str]:
        """Modules that lose or gain columns."""
        return [n for n in self.ranks if self.pruned[n] or self.added[n]]


def plan_reallocation(
    gates: Mapping[str, Sequence[float]],
    budget: RankBudget,
    *,
    threshold: float,
    r_min: int,
    r_max: Mapping[str, int],
) -> Reallocation:
    """Prune small gates and hand the freed budget to the most saturated modules, exactly.

    1. In each module, entries with gate < ``threshold`` are pruned; if fewer than ``r_min`` survive, the
       ``r_min`` largest gates survive (ties: lower index).
    2. Saturation of a module = mean of its gates. The budget is re-allocated with
       :meth:`RankBudget.allocate`, ranks proportional to saturation, never below the survivors. Modules
       that pruned this round cannot grow in it (their own gates just said they need fewer ranks), unless
       nobody else can take the freed budget.

    Args:
        gates: module -> gate values (its current rank is the length).
        budget: the budget to hold.
        threshold: pruning threshold.
        r_min: fewest survivors per module.
        r_max: module -> largest rank.

    Returns:
        A :class:`Reallocation`; ``budget.holds(result.ranks)`` is true whenever it held before.
    """
    keep: dict[str, list[int]] = {}
    for name, g in gates.items():
        alive = [k for k, v in enumerate(g) if v >= threshold]
        if len(alive) < r_min:
            by_gate = sorted(range(len(g)), key=lambda k: (-g[k], k))
            alive = sorted(by_gate[: min(r_min, len(g))])
        keep[name] = alive
    pruned = {n: len(gates[n]) - len(keep[n]) for n in gates}
    if not any(pruned.values()):
        ranks = {n: len(g) for n, g in gates.items()}
        return Reallocation(ranks, keep, pruned, dict.fromkeys(gates, 0))
    saturation = {n: (sum(g) / len(g) if len(g) else 0.0) for n, g in gates.items()}
    lo = {n: len(keep[n]) for n in gates}
    hi = {n: (lo[n] if pruned[n] else max(int(r_max[n]), lo[n])) for n in gates}
    if budget.used(hi) < budget.total:  # nobody else can absorb the freed budget: let every module grow
        hi = {n: max(int(r_max[n]), lo[n]) for n in gates}
    ranks = budget.allocate(saturation, lo, hi)
    added = {n: ranks[n] - lo[n] for n in gates}
    return Reallocation(ranks, keep, pruned, added)


# ---- the method ---------------------------------------------------------------------------------------------


@register_method("l1ra")
class L1raMethod(MethodBase):
    """L1RA: L1-penalised gates prune ranks during training and hand them to saturated modules; plain LoRA at the end.

    Resume: build the model with :meth:`prepare` as for a new run, then :meth:`load_state_dict` (or
    :meth:`restore`) with the saved method state; this rebuilds the LoRA layers at the saved ranks and
    restores the gates. Then load the adapter weights, build the optimizer from :meth:`param_groups` and
    load its state.
    """

    name = "l1ra"
    options_class = L1raOptions

    def __init__(self, options: L1raOptions | None = None, **fields: Any) -> None:
        super().__init__(options, **fields)
        self.adapter_name = "default"
        self.gates = nn.ParameterDict()
        self.history = RankHistory(self.options.history_path)
        self.budget: RankBudget | None = None
        self.r_max: dict[str, int] = {}
        self.interval: int = 0
        self.total_steps: int | None = None
        self.last_step = -1
        self._model: nn.Module | None = None
        self._hooks = RankScaleHooks(self._gate, self.adapter_name)
        self._finalized = False

    # -- protocol ---------------------------------------------------------------------------------------
    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """The budget within the rank bounds (see :meth:`fimlora.methods.base.MethodBase.check_budget`)."""
        o = self.options
        initial_ranks(
            RankBudget.resolve(shapes, r, o.budget_unit, o.budget_ranks, o.budget_params),
            o.r_min,
            _resolve_r_max(shapes, r, o.r_min, o.r_max),
            r,
            "L1RA",
        )

    def setup(self, base_model: nn.Module, lora_config: Any, prep: Preparation) -> nn.Module:
        """Wrap with LoRA at uniform rank (or the budget's equal split, or FIM's map), add gates = 1 and hooks.

        Raises:
            ValueError: unsupported LoRA options, a schedule longer than training, or an infeasible budget.
                Raised before the model is wrapped, so nothing is half built.
        """
        from peft import get_peft_model

        calibration_batches, total_steps, loss_fn = prep.calibration_batches, prep.total_steps, prep.loss_fn
        if getattr(lora_config, "use_dora", False):
            raise ValueError(
                "L1RA gates sit between A and B; DoRA adapters are not supported (use_dora=False)"
            )
        self.interval = _schedule_interval(self.options.reallocate_every, total_steps, "L1RA")
        self.total_steps = total_steps
        model = get_peft_model(base_model, copy.deepcopy(lora_config))
        mods = lora_modules(model, self.adapter_name)
        shapes = module_shapes(mods, self.adapter_name)
        cfg = peft_glue.lora_config(model, self.adapter_name)
        self.budget = RankBudget.resolve(
            shapes, cfg.r, self.options.budget_unit, self.options.budget_ranks, self.options.budget_params
        )
        self.r_max = _resolve_r_max(shapes, cfg.r, self.options.r_min, self.options.r_max)
        if self.options.start == "fim":
            initial = self._fim_start(model, calibration_batches, loss_fn, cfg.r)
        else:
            initial = initial_ranks(self.budget, self.options.r_min, self.r_max, cfg.r, "L1RA")
        resize_keep_scale(model, initial, self.adapter_name, keep=None, seed=self.options.seed)
        self._model = model
        self.gates = nn.ParameterDict(
            {param_key(n): _new_gate(mods[n], self.adapter_name, initial[n]) for n in initial}
        )
        self._hooks.install(lora_modules(model, self.adapter_name))
        self.history.log(RankEvent(0, n, int(cfg.r), r, "init") for n, r in initial.items())
        return model

    def _fim_start(
        self,
        model: nn.Module,
        batches: Iterable[Any] | None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
        r: int,
    ) -> dict[str, int]:
        """FIM-LoRA's map from the raw scores (Fisher, mean over B's elements; no normalisation, as measured
        in the variant grid) under L1RA's budget, within [max(r_min, r/2), r_max]."""
        from fimlora.calibration import estimate_module_scores
        from fimlora.config import FimConfig

        if batches is None:
            raise ValueError("L1RA with start='fim' needs calibration batches (the first T training batches)")
        fim = FimConfig(calibration_batches=self.options.start_calibration_batches, show_progress=False)
        stats = estimate_module_scores(model, batches, fim, loss_fn=loss_fn, adapter_name=self.adapter_name)
        low = max(self.options.r_min, r // 2)
        assert self.budget is not None  # resolved in prepare() before the start is chosen
        return self.budget.allocate(
            stats.scores("fisher", "mean"), dict.fromkeys(self.r_max, low), self.r_max
        )

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """LoRA factors at ``lr``; gates at ``gate_lr`` without weight decay (decay would fight the L1 term)."""
        self._move_gates_to(model)
        gate_ids = {id(p) for p in self.gates.values()}
        groups = trainable_param_groups(model, lr=lr, weight_decay=weight_decay)
        groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in gate_ids]
        groups.append({"params": list(self.gates.values()), "lr": self.options.gate_lr, "weight_decay": 0.0})
        return groups

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """lam * mean over modules of ||gate||_1 (None when lam = 0)."""
        if self.options.l1_lambda == 0.0 or not len(self.gates):
            return None
        l1 = torch.stack([g.abs().sum() for g in self.gates.values()])
        return self.options.l1_lambda * l1.mean()

    def on_step_end(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        """Clamp gates to [0, 1]; at the schedule, prune and reassign (returns the new map if it changed)."""
        if self._finalized:
            raise RuntimeError("L1RA was finalized; build a new method for a new run")
        with torch.no_grad():
            for g in self.gates.values():
                g.clamp_(0.0, 1.0)
        self.last_step = step
        done = step + 1
        if done % self.interval != 0 or (self.total_steps is not None and done >= self.total_steps):
            return None  # reallocating after the last step would add columns that never train
        return self.reallocate(model, step, optimizer)

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        """Fold gates into B (B <- B diag(g)), remove the hooks: a plain PEFT LoRA model and its map."""
        mods = lora_modules(model, self.adapter_name)
        with torch.no_grad():
            for name, module in mods.items():
                weight = lora_factors(module, self.adapter_name)[1].weight  # (out, r)
                weight.mul_(self._gate(name).to(weight.dtype).unsqueeze(0))
        self._hooks.remove()
        self._finalized = True
        ranks = current_ranks(model, self.adapter_name)
        write_scaled_patterns(model, ranks, self.adapter_name)
        return model, RankMap(ranks, metadata=self._metadata(model, ranks))

    def state_dict(self) -> dict[str, Any]:
        """Gates, ranks, budget, schedule position and history: enough to resume exactly."""
        ranks = {n: int(g.numel()) for n, g in self._gates_by_name().items()}
        return {
            "method": self.name,
            "config": asdict(self.options),
            "ranks": ranks,
            "gates": {n: g.detach().cpu().clone() for n, g in self._gates_by_name().items()},
            "budget": self.budget.to_dict() if self.budget else None,
            "r_max": dict(self.r_max),
            "interval": self.interval,
            "total_steps": self.total_steps,
            "last_step": self.last_step,
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore method state; with a prepared model, also rebuild its LoRA layers at the saved ranks."""
        if state.get("method") != self.name:
            raise ValueError(f"this state is for method {state.get('method')!r}, not {self.name!r}")
        if self._model is None:
            raise RuntimeError("call prepare() before load_state_dict(): the model must exist to be resized")
        self.restore(self._model, state)

    # -- L1RA-specific ---------------------------------------------------------------------------------
    def restore(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Rebuild ``model`` at the saved ranks and load gates, budget, schedule and history.

        Call before loading adapter weights and before building the optimizer (the gates are new
        parameters).
        """
        ranks = {n: int(r) for n, r in state["ranks"].items()}
        resize_keep_scale(model, ranks, self.adapter_name, keep=None, seed=self.options.seed)
        mods = lora_modules(model, self.adapter_name)
        self.gates = nn.ParameterDict(
            {param_key(n): _new_gate(mods[n], self.adapter_name, ranks[n]) for n in ranks}
        )
        with torch.no_grad():
            for n, g in state["gates"].items():
                self.gates[param_key(n)].copy_(g)
        b = state["budget"]
        self.budget = RankBudget(b["unit"], int(b["total"]), {k: int(v) for k, v in b["costs"].items()})
        self.r_max = {n: int(v) for n, v in state["r_max"].items()}
        self.interval = int(state["interval"])
        self.total_steps = state["total_steps"]
        self.last_step = int(state["last_step"])
        self.history.load_state_dict(state["history"])
        self._model = model
        self._move_gates_to(model)
        self._hooks.install(mods)

    def reallocate(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        """Prune and reassign now (``on_step_end`` calls this at the schedule); None when nothing changed.

        Raises:
            ValueError: ranks would change but ``optimizer`` is None (it would keep stale parameters).
        """
        assert self.budget is not None, "prepare() first"
        gates = {n: g.detach().float().cpu().tolist() for n, g in self._gates_by_name().items()}
        plan = plan_reallocation(
            gates,
            self.budget,
            threshold=self.options.prune_threshold,
            r_min=self.options.r_min,
            r_max=self.r_max,
        )
        changed = plan.changed
        if not changed:
            return None
        if optimizer is None:
            raise ValueError(
                f"L1RA reallocates ranks at step {step} and needs the optimizer to carry its state over; "
                "pass it to on_step_end"
            )
        mods = lora_modules(model, self.adapter_name)
        old = {
            n: lora_factor_params(mods[n], self.adapter_name) + [self.gates[param_key(n)]] for n in changed
        }
        old_ranks = {n: len(gates[n]) for n in changed}
        resize_keep_scale(
            model,
            {n: plan.ranks[n] for n in changed},
            self.adapter_name,
            keep={n: plan.keep[n] for n in changed},
            seed=self.options.seed + step + 1,  # a function of the step, so a resumed run draws the same A
        )
        mods = lora_modules(model, self.adapter_name)
        remaps: list[ParamRemap] = []
        for n in changed:
            kept = plan.keep[n]
            old_gate = old[n][-1]
            new_gate = _new_gate(mods[n], self.adapter_name, plan.ranks[n])
            with torch.no_grad():
                new_gate[: len(kept)].copy_(old_gate.detach()[kept])
            self.gates[param_key(n)] = new_gate
            remaps += _remaps(old[n], lora_factor_params(mods[n], self.adapter_name) + [new_gate], kept)
        carry_optimizer_state(optimizer, remaps)
        self._hooks.install({n: mods[n] for n in changed})
        self.history.log(
            RankEvent(
                step,
                n,
                old_ranks[n],
                plan.ranks[n],
                "l1ra",
                {"pruned": plan.pruned[n], "added": plan.added[n]},
            )
            for n in changed
        )
        ranks = current_ranks(model, self.adapter_name)
        assert self.budget.holds(ranks), "L1RA broke its budget invariant; please report this"
        return RankMap(ranks, metadata={"method": self.name, "step": step})

    # -- internals --------------------------------------------------------------------------------------
    def _gate(self, name: str) -> torch.Tensor:
        return self.gates[param_key(name)]

    def _move_gates_to(self, model: nn.Module) -> None:
        """Put each gate on its layer's device (the model may have moved after prepare()), in place."""
        for name, module in lora_modules(model, self.adapter_name).items():
            gate = self.gates[param_key(name)]
            device = lora_factors(module, self.adapter_name)[1].weight.device
            if gate.device != device:
                gate.data = gate.data.to(device)  # same Parameter object: optimizer references stay valid

    def _gates_by_name(self) -> dict[str, nn.Parameter]:
        return {module_of_key(k): v for k, v in self.gates.items()}

    def _metadata(self, model: nn.Module, ranks: Mapping[str, int]) -> dict[str, Any]:
        shapes = module_shapes(lora_modules(model, self.adapter_name), self.adapter_name)
        cfg = peft_glue.lora_config(model, self.adapter_name)
        assert self.budget is not None
        return {
            "method": self.name,
            "lora_r": cfg.r,
            "config": asdict(self.options),
            "budget": {**self.budget.to_dict(), "used": self.budget.used(ranks)},
            "total_params": sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items()),
            "uniform_params": cfg.r * sum(i + o for i, o in shapes.values()),
            "reallocations": len({e.step for e in self.history.events if e.reason != "init"}),
            "shapes": {n: list(s) for n, s in shapes.items()},
        }


# ---- L1RA's helpers ---------------------------------------------------------------------------------------


def _new_gate(module: Any, adapter: str, r: int) -> nn.Parameter:
    weight = lora_factors(module, adapter)[1].weight
    dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32  # gates train in fp32 at least
    return nn.Parameter(torch.ones(r, dtype=dtype, device=weight.device))


def _remaps(
    old: Sequence[nn.Parameter], new: Sequence[nn.Parameter], kept: Sequence[int]
) -> list[ParamRemap]:
    """Remaps for [A (r x in), B (out x r), bias (out,)?, gate (r,)]: rank is dim 0, 1, none, 0."""
    a_old, b_old, *rest_old = old
    a_new, b_new, *rest_new = new
    out = [ParamRemap(a_old, a_new, 0, list(kept)), ParamRemap(b_old, b_new, 1, list(kept))]
    if len(rest_old) == 2:  # lora_bias=True: B's bias is not rank-shaped, keep all of it
        bias_old, bias_new = rest_old[0], rest_new[0]
        out.append(ParamRemap(bias_old, bias_new, 0, list(range(bias_old.shape[0]))))
    out.append(ParamRemap(rest_old[-1], rest_new[-1], 0, list(kept)))
    return out


def _resolve_r_max(
    shapes: Mapping[str, tuple[int, int]], r: int, r_min: int, r_max: int | None
) -> dict[str, int]:
    """Per-module cap: the configured r_max (default 4r), never above min(in, out)."""
    cap = r_max if r_max is not None else 4 * r
    out = {n: min(cap, min(s)) for n, s in shapes.items()}
    too_small = [n for n, v in out.items() if v < r_min]
    if too_small:
        raise ValueError(f"r_min={r_min} exceeds min(in, out) of module {too_small[0]!r}; lower r_min")
    return out


def _schedule_interval(every: float | int, total_steps: int | None, method: str) -> int:
    """Steps between reallocations; fails before training when the schedule can't fit in it."""
    if total_steps is not None:
        check_int("total_steps", total_steps, minimum=1)
    if isinstance(every, float):
        if total_steps is None:
            raise ValueError(
                f"{method}: reallocate_every={every} is a fraction of training, so prepare() needs "
                "`total_steps`; or give reallocate_every as a number of steps (int)"
            )
        interval = max(1, round(every * total_steps))
    else:
        interval = every
    if total_steps is not None and interval >= total_steps:
        raise ValueError(
            f"{method}: the reallocation schedule ({interval} steps) is as long as or longer than training "
            f"({total_steps} steps), so ranks would never be reallocated; lower `reallocate_every`"
        )
    return interval


def _check_schedule(every: object) -> None:
    if isinstance(every, bool) or not isinstance(every, (int, float)):
        raise ValueError(
            f"`reallocate_every` must be a fraction (float) or a step count (int), got {every!r}"
        )
    if isinstance(every, float) and not 0.0 < every < 1.0:
        raise ValueError(
            f"`reallocate_every` as a fraction of training must be in (0, 1), got {every}; "
            "give an int for a number of steps"
        )
    if isinstance(every, int) and every < 1:
        raise ValueError(f"`reallocate_every` as a number of steps must be >= 1, got {every}")
