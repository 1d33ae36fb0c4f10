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

Budgets: both hold the *rank sum* of uniform LoRA at the config's r (AdaLoRA: ``target_r = r``, so its final
triplet count is r * n; EVA by construction). Neither can hold a parameter count; the final rank map's
metadata reports both ``total_rank`` and ``total_params`` next to uniform LoRA's, so comparisons at the same
budget can say which budget matched.

This module reaches into AdaLoRA's layers (``lora_E``, ``ranknum``), the one place outside
:mod:`fimlora.peft_glue` that does: the conversion is specific to this baseline.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fimlora.methods.base import StaticRanksMethod, register_method, trainable_param_groups
from fimlora.methods.history import RankEvent, RankHistory
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes, pattern_key, scaled_alpha
from fimlora.rankmap import RankMap

__all__ = ["AdaLoraMethod", "AdaLoraOptions", "EvaMethod", "EvaOptions", "adalora_to_lora"]


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

    def __post_init__(self) -> None:
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
    """AdaLoRA via PEFT, budget-matched to uniform LoRA's rank sum, finalised as plain LoRA.

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

    def __post_init__(self) -> None:
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
        model = get_peft_model(base_model, cfg)
        initialize_lora_eva_weights(
            model,
            batches,
            prepare_model_inputs_fn=_eva_token_indices,
            prepare_layer_inputs_fn=_eva_layer_inputs,
            forward_fn=_BoundedForward(o.max_passes * len(batches), o.rho * int(lora_config.r)),
            show_progress_bar=False,
        )
        self.lora_r = int(lora_config.r)
        ranks = current_ranks(model)
        meta = _budget_metadata("eva", ranks, module_shapes(lora_modules(model)), self.lora_r)
        meta["config"] = asdict(o)
        self.rank_map = RankMap(ranks, metadata=meta)
        return model


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
