"""Warm-start: ranks read from what a short warm-up at a higher rank learned, then plain LoRA at those ranks.

FIM-LoRA reads its ranks at B = 0, where a module's gradient is large wherever the loss can be reduced through
it, not only where rank is needed. The update a module has learned says how many directions it uses. This
method

1. trains every module at ``warmup_rank`` times the config's rank (scale kept at the config's alpha/r) for the
   first ``warmup`` steps of the run;
2. takes each module's update ``s * B @ A`` through its exact SVD from the small factors
   (:func:`fimlora.compress.spectrum.factor_svd`: QR of both factors, ``O((in + out) r)`` memory, no
   ``out x in`` matrix);
3. allocates the budget (rank sum exactly, or parameters with least slack; the same bounds as every method) by
   one of three signals:

   * ``energy`` (default): the directions with the most energy per unit cost over the whole adapter, the
     selection ``fimlora compress`` makes after training (:func:`~fimlora.compress.spectrum.select_directions`,
     exact for a rank budget by Eckart-Young), within ``[r_min, r_max]``;
   * ``count``: ranks proportional to how many directions hold at least ``threshold`` of their module's
     energy, through the exact allocator (:func:`fimlora.allocate.allocate_ranks`);
   * ``fim``: ranks proportional to FIM-LoRA's own score (mean empirical Fisher of the LoRA-B gradient) taken
     now, with B != 0, on the run's first ``fim_batches`` batches: the paper's signal, re-read after the
     warm-up instead of at B = 0;

4. truncates each module to its rank, keeping its leading singular directions: the new factors carry half of
   the spectrum each (:func:`~fimlora.compress.spectrum.balanced_factors`), so ``s * B' @ A'`` is exactly the
   truncated update (checked through PEFT's own forward on a fixed probe, :mod:`fimlora.peft_glue.verify`);
5. goes on training to the end of the run's steps.

Optimizer state of a truncated module is dropped: its factors are new tensors in another basis, and Adam's
element-wise moments do not rotate with them, so they start as a new parameter's would (AdamW's step count
restarts for them: its bias correction then treats them as new). A module whose rank is unchanged keeps its
factors and its state. The result is a plain PEFT LoRA adapter with ``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from fimlora.calibration import estimate_module_scores
from fimlora.compress.spectrum import FactorSpectrum, balanced_factors, factor_svd, select_directions
from fimlora.config import BudgetUnit, FimConfig, resolve_rank_bounds
from fimlora.methods.base import MethodBase, Preparation, register_method
from fimlora.methods.budget import RankBudget, budget_metadata, check_budget, check_float, check_int
from fimlora.methods.gates import resize_keep_scale
from fimlora.methods.optim_state import ParamRemap, carry_optimizer_state
from fimlora.peft_glue import current_ranks, lora_factors, lora_modules, module_shapes
from fimlora.peft_glue.verify import check_updates, factor_update, layer_update
from fimlora.peft_glue.weights import lora_scale, set_lora_factors
from fimlora.rankmap import RankMap

__all__ = ["SIGNALS", "WarmStartMethod", "WarmStartOptions", "direction_counts", "plan_warmstart_ranks"]

Signal = Literal["energy", "count", "fim"]
SIGNALS: tuple[str, ...] = ("energy", "count", "fim")


@dataclass
class WarmStartOptions:
    """Warm-up, signal, budget and bounds of ``warmstart``. Each field's docstring is its help text."""

    budget_unit: BudgetUnit = "ranks"
    """When no budget is given, match uniform LoRA at the config's r in this unit ("ranks" or "params")."""

    budget_ranks: int | None = None
    """Total rank over all adapted modules after the warm-up. Mutually exclusive with budget_params."""

    budget_params: int | None = None
    """Total LoRA parameters after the warm-up, sum of r_i * (in_i + out_i). Mutually exclusive with
    budget_ranks."""

    r_min: int | None = None
    """Smallest rank of a module after the warm-up. Default: half the LoRA config's r (at least 1)."""

    r_max: int | None = None
    """Largest rank of a module after the warm-up. Default: four times the LoRA config's r; never more than the
    warm-up rank or min(in, out)."""

    warmup: float | int = 0.1
    """Length of the warm-up: a fraction of the run's steps (a float in (0, 1)) or a number of steps (an int)."""

    warmup_rank: float = 2.0
    """Rank of every module during the warm-up, as a multiple of the config's r (>= 1; rounded up)."""

    signal: Signal = "energy"
    """What the ranks are read from: "energy" (the update's singular directions with the most energy, as
    compress), "count" (directions holding at least `threshold` of their module's energy), "fim" (FIM-LoRA's
    Fisher score, taken after the warm-up)."""

    threshold: float = 0.01
    """``count``: share of its module's energy from which a direction counts."""

    fim_batches: int = 8
    """``fim``: the first training batches the Fisher score is taken on (as FIM-LoRA's calibration)."""

    seed: int = 0
    """Seed of LoRA-A of the new columns at the warm-up rank (the caller's global RNG state is left untouched)."""

    def __post_init__(self) -> None:
        check_budget(self.budget_unit, self.budget_ranks, self.budget_params)
        for name in ("r_min", "r_max"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        if self.r_min is not None and self.r_max is not None and self.r_min > self.r_max:
            raise ValueError(f"`r_min` ({self.r_min}) must be <= `r_max` ({self.r_max})")
        if isinstance(self.warmup, float):
            if not 0.0 < self.warmup < 1.0:
                raise ValueError(f"`warmup` as a fraction of the run must be in (0, 1), got {self.warmup}")
        else:
            check_int("warmup", self.warmup, minimum=1)
        check_float("warmup_rank", self.warmup_rank, low=1.0)
        if self.signal not in SIGNALS:
            raise ValueError(f"`signal` must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        check_float("threshold", self.threshold, low=0.0, strict=True)
        if self.threshold >= 1.0:
            raise ValueError(f"`threshold` must be < 1, got {self.threshold}")
        check_int("fim_batches", self.fim_batches, minimum=1)
        check_int("seed", self.seed, minimum=0)

    def warmup_steps(self, total_steps: int) -> int:
        """Steps of the warm-up in a run of ``total_steps``; at least one step must follow it.

        Raises:
            ValueError: a warm-up that leaves no step after it.
        """
        steps = self.warmup if isinstance(self.warmup, int) else max(1, round(self.warmup * total_steps))
        if steps >= total_steps:
            raise ValueError(
                f"the warm-up ({steps} steps) must end before the run does ({total_steps} steps): lower `warmup`"
            )
        return int(steps)

    def rank_of_warmup(self, r: int) -> int:
        """The warm-up rank for a LoRA config of rank ``r``."""
        return max(r, math.ceil(self.warmup_rank * r - 1e-9))


def direction_counts(spectra: Mapping[str, torch.Tensor], threshold: float) -> dict[str, float]:
    """Per module, how many directions hold at least ``threshold`` of its energy ``sum(s**2)`` (0 without any).

    Args:
        spectra: module -> singular values, shape (n,).
        threshold: a share in (0, 1).
    """
    out = {}
    for name, s in spectra.items():
        energy = (s.double() ** 2).sum()
        out[name] = float(((s.double() ** 2) >= threshold * energy).sum()) if energy > 0 else 0.0
    return out


def plan_warmstart_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budget: RankBudget,
    bounds: tuple[int, int],
    *,
    signal: str,
    scores: Mapping[str, float] | None = None,
    threshold: float = 0.01,
) -> dict[str, int]:
    """Each module's rank after the warm-up, within ``bounds`` and the budget (pure; no PEFT).

    Args:
        spectra: module -> the singular values of its warm-up update, non-increasing, shape (n_m,).
        shapes: module -> (in, out).
        budget: the budget (:class:`fimlora.methods.budget.RankBudget`).
        bounds: ``(r_min, r_max)``; a module's largest rank is also capped at ``n_m``.
        signal: "energy", "count" or "fim" (see the module docstring).
        scores: the ``fim`` signal's per-module scores.
        threshold: the ``count`` signal's share.

    Raises:
        ValueError: the budget is infeasible within the bounds (the message gives the feasible range).
    """
    lo, hi = bounds
    caps = {n: min(hi, int(s.shape[0])) for n, s in spectra.items()}
    if any(lo > c for c in caps.values()):
        raise ValueError(f"r_min={lo} is above the warm-up rank or min(in, out) of a module; lower r_min")
    if signal == "energy":
        ranks = select_directions(
            {n: spectra[n][: caps[n]].tolist() for n in spectra},
            budget.costs,
            budget_ranks=budget.total if budget.unit == "ranks" else None,
            budget_params=budget.total if budget.unit == "params" else None,
            min_rank=lo,
        )
        if not budget.holds(ranks):  # a rank budget above every direction there is
            raise ValueError(f"the {budget.unit} budget {budget.total} is infeasible within r_max={hi}")
        return ranks
    if signal == "count":
        values = direction_counts(spectra, threshold)
    elif scores is not None:
        values = dict(scores)
    else:
        raise ValueError("the 'fim' signal needs the modules' scores")
    return budget.allocate(values, dict.fromkeys(spectra, lo), caps)


@register_method("warmstart")
class WarmStartMethod(MethodBase):
    """Warm-start: a short warm-up at a higher rank, ranks from its update, truncation by SVD, plain LoRA."""

    name = "warmstart"
    options_class = WarmStartOptions
    options: WarmStartOptions

    def __init__(self, options: WarmStartOptions | None = None, **fields: Any) -> None:
        super().__init__(options, **fields)
        self.adapter_name = "default"
        self.r = 0
        self.total_steps = 0
        self.warmup_steps = 0
        self.completed = 0
        self.truncated = False
        self.rank_map: RankMap | None = None
        self._model: nn.Module | None = None
        self._fim_batches: list[Any] = []
        self._loss_fn: Any = None

    # -- protocol ---------------------------------------------------------------------------------------
    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """The budget within the bounds (see :meth:`fimlora.methods.base.MethodBase.check_budget`)."""
        o = self.options
        budget = RankBudget.resolve(shapes, r, o.budget_unit, o.budget_ranks, o.budget_params)
        lo, hi = resolve_rank_bounds(r, o.r_min, o.r_max)
        caps = {n: min(hi, self.options.rank_of_warmup(r), *shape) for n, shape in shapes.items()}
        fewest = budget.used(dict.fromkeys(shapes, lo))
        most = budget.used(caps)
        if any(lo > c for c in caps.values()) or not fewest <= budget.total:
            raise ValueError(
                f"warmstart: the {budget.unit} budget {budget.total} is infeasible with r_min={lo} (needs at "
                f"least {fewest}); lower r_min or raise the budget"
            )
        if budget.total > most:  # a parameter budget could not be spent: it would end far below it
            raise ValueError(
                f"warmstart: the {budget.unit} budget {budget.total} is more than the warm-up can give ({most} "
                f"within r_max={hi} and the warm-up rank); raise warmup_rank or r_max, or lower the budget"
            )

    def setup(self, base_model: nn.Module, lora_config: Any, prep: Preparation) -> nn.Module:
        """Wrap with LoRA, then widen every module to the warm-up rank (scale kept at alpha/r).

        Raises:
            ValueError: no ``total_steps``, a warm-up as long as the run, DoRA, an infeasible budget, or no
                batches for the ``fim`` signal. Raised before the model is wrapped.
        """
        from peft import get_peft_model

        o = self.options
        if prep.total_steps is None:
            raise ValueError("warmstart ends its warm-up at a step of the run: prepare() needs `total_steps`")
        if getattr(lora_config, "use_dora", False):
            raise ValueError("warmstart truncates plain LoRA factors; DoRA adapters are not supported")
        self.total_steps = int(prep.total_steps)
        self.warmup_steps = o.warmup_steps(self.total_steps)
        if o.signal == "fim":
            if prep.calibration_batches is None:
                raise ValueError(
                    "warmstart's 'fim' signal needs the run's first batches (calibration_batches)"
                )
            self._fim_batches = list(itertools.islice(iter(prep.calibration_batches), o.fim_batches))
            self._loss_fn = prep.loss_fn
        model = get_peft_model(base_model, lora_config)
        self.r = int(lora_config.r)
        shapes = module_shapes(lora_modules(model, self.adapter_name), self.adapter_name)
        try:
            self.check_budget(shapes, self.r)
        except ValueError:
            model.unload()  # leave the caller's model as it was
            raise
        wide = self.options.rank_of_warmup(self.r)
        resize_keep_scale(
            model, {n: min(wide, *s) for n, s in shapes.items()}, self.adapter_name, keep=None, seed=o.seed
        )
        self._model = model
        return model

    def on_step_end(
        self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None
    ) -> RankMap | None:
        """At the end of the warm-up, choose the ranks and truncate (returns the new map then, else None).

        Raises:
            ValueError: the warm-up ends and ``optimizer`` is None (it would keep the old factors).
        """
        self.completed = step + 1
        if self.truncated or self.completed < self.warmup_steps:
            return None
        if optimizer is None:
            raise ValueError(
                f"warmstart truncates the adapter at step {step} and must update the optimizer: pass it to "
                "on_step_end"
            )
        return self.truncate(model, optimizer)

    def finalize(self, model: nn.Module) -> tuple[nn.Module, RankMap]:
        """A plain PEFT LoRA model at the chosen ranks (truncated now if the run ended inside the warm-up)."""
        if not self.truncated:
            self.truncate(model, None)
        assert self.rank_map is not None
        return model, self.rank_map

    def state_dict(self) -> dict[str, Any]:
        """Where the run stands (the warm-up done or not) and the chosen map: enough to resume exactly."""
        return {
            "method": self.name,
            "options": asdict(self.options),
            "r": self.r,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "completed": self.completed,
            "truncated": self.truncated,
            "rank_map": self.rank_map.to_dict() if self.rank_map is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the method's state; after the warm-up, also rebuild the prepared model at the chosen ranks
        (before its weights and the optimizer are loaded)."""
        if state.get("method") != self.name:
            raise ValueError(f"this state is for method {state.get('method')!r}, not {self.name!r}")
        if self._model is None:
            raise RuntimeError("call prepare() before load_state_dict(): the model must exist to be resized")
        self.r, self.total_steps = int(state["r"]), int(state["total_steps"])
        self.warmup_steps, self.completed = int(state["warmup_steps"]), int(state["completed"])
        self.truncated = bool(state["truncated"])
        self.rank_map = RankMap.from_dict(state["rank_map"]) if state["rank_map"] else None
        if self.truncated and self.rank_map is not None:
            resize_keep_scale(
                self._model, dict(self.rank_map), self.adapter_name, keep=None, seed=self.options.seed
            )

    # -- warm-start ----------------------------------------------------------------------------------------
    def truncate(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> RankMap:
        """Choose every module's rank from its warm-up update and truncate it there, now.

        The optimizer (when given) is pointed at the new factors, with no state for them (see the module
        docstring); modules whose rank is unchanged keep their factors and state.
        """
        o, adapter = self.options, self.adapter_name
        mods = lora_modules(model, adapter)
        shapes = module_shapes(mods, adapter)
        spectra: dict[str, FactorSpectrum] = {}
        for n, m in mods.items():
            a, b = lora_factors(m, adapter)
            spectra[n] = factor_svd(a.weight, b.weight, lora_scale(m, adapter))
        budget = RankBudget.resolve(shapes, self.r, o.budget_unit, o.budget_ranks, o.budget_params)
        bounds = resolve_rank_bounds(self.r, o.r_min, o.r_max)
        scores = self._fim_scores(model) if o.signal == "fim" else None
        values = {n: sp.s for n, sp in spectra.items()}
        ranks = plan_warmstart_ranks(
            values, shapes, budget, bounds, signal=o.signal, scores=scores, threshold=o.threshold
        )
        before = current_ranks(model, adapter)
        changed = [n for n in ranks if ranks[n] != before[n]]
        old = {n: _factor_params(mods[n], adapter) for n in changed}
        resize_keep_scale(model, ranks, adapter, keep=None, seed=o.seed + self.completed)
        mods = lora_modules(model, adapter)
        expected, got = {}, {}
        with torch.no_grad():
            for n in changed:
                dtype = lora_factors(mods[n], adapter)[0].weight.dtype
                a_new, b_new = balanced_factors(
                    spectra[n], ranks[n], lora_scale(mods[n], adapter), dtype=dtype
                )
                set_lora_factors(mods[n], a=a_new, b=b_new, adapter_name=adapter)
                sp, k = spectra[n], ranks[n]
                expected[n] = factor_update(sp.vh[:k], sp.u[:, :k] * sp.s[:k], 1.0)  # the truncated update
                measured = layer_update(mods[n])
                if measured is not None:
                    got[n] = measured
        check_updates({n: expected[n] for n in got}, got, what="warmstart's truncation to the chosen ranks")
        if optimizer is not None and changed:
            remaps = []
            for n in changed:
                a_new, b_new = _factor_params(mods[n], adapter)
                remaps += [ParamRemap(old[n][0], a_new, 0, []), ParamRemap(old[n][1], b_new, 1, [])]
            carry_optimizer_state(optimizer, remaps)
            for remap in remaps:
                optimizer.state.pop(remap.new, None)  # fresh: see the module docstring
        self.truncated = True
        self._fim_batches = []
        self.rank_map = RankMap(ranks, metadata=self._metadata(spectra, ranks, shapes, scores))
        return self.rank_map

    def _fim_scores(self, model: nn.Module) -> dict[str, float]:
        """FIM-LoRA's module scores (mean Fisher of the LoRA-B gradient) on the run's first batches, now."""
        config = FimConfig(calibration_batches=self.options.fim_batches, show_progress=False)
        stats = estimate_module_scores(model, self._fim_batches, config, loss_fn=self._loss_fn)
        return stats.scores(config.score, config.aggregation)

    def _metadata(
        self,
        spectra: Mapping[str, FactorSpectrum],
        ranks: Mapping[str, int],
        shapes: Mapping[str, tuple[int, int]],
        scores: Mapping[str, float] | None,
    ) -> dict[str, Any]:
        o = self.options
        wide = {n: int(sp.s.shape[0]) for n, sp in spectra.items()}
        energy = {n: float((sp.s.double() ** 2).sum()) for n, sp in spectra.items()}
        kept = {n: float((sp.s[: ranks[n]].double() ** 2).sum()) for n, sp in spectra.items()}
        meta = budget_metadata(self.name, dict(ranks), shapes, self.r)
        meta.update(
            {
                "options": asdict(o),
                "signal": o.signal,
                "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps,
                "warmup_rank": max(wide.values(), default=0),
                "warmup_params": sum(wide[n] * (i + j) for n, (i, j) in shapes.items()),
                "update_energy": energy,
                "kept_energy_fraction": sum(kept.values()) / sum(energy.values())
                if any(energy.values())
                else 0.0,
                "singular_values": {n: [float(v) for v in sp.s[: wide[n]]] for n, sp in spectra.items()},
            }
        )
        if scores is not None:
            meta["fim_scores"] = dict(scores)
        return meta


def _factor_params(module: Any, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA-A's weight ``(r, in)`` and LoRA-B's ``(out, r)`` (rank along dim 0 and dim 1)."""
    a, b = lora_factors(module, adapter)
    return cast(nn.Parameter, a.weight), cast(nn.Parameter, b.weight)
