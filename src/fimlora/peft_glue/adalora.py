"""AdaLoRA's internals: its SVD-form layers, its ``RankAllocator``, and the conversion to plain LoRA.

AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023) keeps
each module in SVD form, delta_W = B diag(E) A * alpha / (ranknum + 1e-5), with A ``(r, in)``, E ``(r, 1)``
and B ``(out, r)`` parameters in ``lora_A``/``lora_E``/``lora_B``; pruned singular values E are zeroed by a
mask that PEFT stores as the config's ``rank_pattern`` (key ``<module>.lora_E.<adapter>``, a list of
bools). The allocator (``model.base_model.rankallocator``) keeps importance EMAs per parameter name and
decides the masks in ``budget_schedule``/``mask_to_budget``. :mod:`fimlora.methods.adalora` uses AdaLoRA
only through the functions here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from fimlora.errors import AdapterCheckError
from fimlora.peft_glue.layers import lora_factors, lora_modules
from fimlora.peft_glue.resize import rank_patterns, scaled_alpha
from fimlora.peft_glue.saved_modules import (
    check_saved_modules,
    load_saved_module_states,
    saved_module_states,
    swap_in_original_modules,
)
from fimlora.peft_glue.verify import check_updates, forward_updates, version_advice

__all__ = [
    "AdaLoraSchedule",
    "adalora_allocator_state",
    "adalora_factor_shapes",
    "adalora_params",
    "adalora_ranks",
    "adalora_schedule",
    "adalora_shapes",
    "adalora_to_lora",
    "adalora_triplet_scores",
    "adalora_update_and_allocate",
    "load_adalora_allocator_state",
    "mask_adalora_triplets",
    "replace_adalora_allocation",
]

_IPT = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the allocator's importance statistics (EMAs)


class AdaLoraSchedule(NamedTuple):
    """The allocator's schedule, in steps: warm-up, final phase, total, steps between allocations."""

    tinit: int
    tfinal: int
    total_step: int
    delta_t: int


def _tuner(model: nn.Module) -> Any:
    """The ``AdaLoraModel`` (tuner) of a ``PeftModel``, or the model itself if it is the tuner."""
    return getattr(model, "base_model", model) if hasattr(model, "peft_config") else model


def _layers(model: nn.Module) -> dict[str, Any]:
    """Module name (as in LoRA's ``lora_modules``) -> AdaLoRA layer."""
    from peft.tuners.adalora import AdaLoraLayer

    root = _tuner(model)
    out = {}
    for name, module in root.model.named_modules():
        if isinstance(module, AdaLoraLayer):
            out[name] = module
    if not out:
        raise TypeError("the model has no AdaLoRA layers")
    return out


def adalora_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> ``(in_features, out_features)`` of each AdaLoRA layer."""
    return {n: (int(m.in_features), int(m.out_features)) for n, m in _layers(model).items()}


def adalora_factor_shapes(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[int, int, int]]:
    """Module name -> ``(r, in, out)`` of its AdaLoRA factors A ``(r, in)`` and B ``(out, r)`` (r: triplets
    allocated, pruned or not)."""
    out = {}
    for name, layer in _layers(model).items():
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        out[name] = (int(a.shape[0]), int(a.shape[1]), int(b.shape[0]))
    return out


def adalora_params(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """Every AdaLoRA parameter, ``[A, E, B]`` per layer in module order."""
    params = []
    for layer in _layers(model).values():
        params += [layer.lora_A[adapter_name], layer.lora_E[adapter_name], layer.lora_B[adapter_name]]
    return params


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


def adalora_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Effective ranks: triplets kept by the current mask (0 is possible)."""
    cfg = _tuner(model).peft_config[adapter_name]
    return {n: len(_kept_triplets(n, layer, adapter_name, cfg)) for n, layer in _layers(model).items()}


def adalora_update_and_allocate(model: nn.Module, step: int) -> None:
    """PEFT's ``update_and_allocate(step)``: update the importance EMAs from the current gradients and, on
    the schedule, mask triplets (it must run every step, or AdaLoRA silently keeps every rank)."""
    _tuner(model).update_and_allocate(step)


def adalora_allocator_state(model: nn.Module | None, adapter_name: str = "default") -> dict[str, Any]:
    """The current mask (``rank_pattern``) and the allocator's importance EMAs, on the CPU, for a checkpoint
    (None and empty dicts without a model)."""
    root = _tuner(model) if model is not None else None
    alloc = getattr(root, "rankallocator", None)
    cfg = root.peft_config[adapter_name] if root is not None else None
    return {
        "rank_pattern": copy.deepcopy(getattr(cfg, "rank_pattern", None)),
        "ipt": {k: {n: t.detach().cpu().clone() for n, t in getattr(alloc, k, {}).items()} for k in _IPT},
    }


def load_adalora_allocator_state(
    model: nn.Module, state: Mapping[str, Any], adapter_name: str = "default"
) -> None:
    """Restore what :func:`adalora_allocator_state` returned (EMAs moved to the adapter's device)."""
    root = _tuner(model)
    root.peft_config[adapter_name].rank_pattern = copy.deepcopy(state["rank_pattern"])
    device = next(iter(adalora_params(model, adapter_name))).device
    for key in _IPT:
        setattr(root.rankallocator, key, {n: t.to(device) for n, t in state["ipt"][key].items()})


# ---- replacing the allocator's budget and masking --------------------------------------------------------


def adalora_schedule(model: nn.Module) -> AdaLoraSchedule:
    """The allocator's schedule, as its config says now."""
    cfg = _tuner(model).rankallocator.peft_config
    return AdaLoraSchedule(cfg.tinit, cfg.tfinal, cfg.total_step, cfg.deltaT)


def adalora_triplet_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> importance of each of its triplets, shape ``(r,)``: PEFT's own score, the allocator's
    EMAs combined by its ``_element_score`` and ``_combine_ipt`` (E's, A's row mean, B's column mean)."""
    alloc = _tuner(model).rankallocator
    adapter = alloc.adapter_name
    out = {}
    for name in _layers(model):
        ipt_e = alloc._element_score(f"{name}.lora_E.{adapter}")  # (r, 1)
        ipt_a = alloc._element_score(f"{name}.lora_A.{adapter}").mean(dim=1, keepdim=True)  # (r, 1)
        ipt_b = alloc._element_score(f"{name}.lora_B.{adapter}").mean(dim=0).view(-1, 1)  # (r, 1)
        out[name] = alloc._combine_ipt(ipt_e, torch.cat([ipt_a, ipt_b], dim=1))  # (r,)
    return out


def mask_adalora_triplets(model: nn.Module, keep: Mapping[str, Sequence[bool]]) -> dict[str, list[bool]]:
    """Zero the singular values E of the triplets not kept; returns the mask in PEFT's ``rank_pattern``
    form (what ``mask_to_budget`` must return: PEFT stores it at tfinal and masks with it afterwards)."""
    adapter = _tuner(model).rankallocator.adapter_name
    pattern: dict[str, list[bool]] = {}
    with torch.no_grad():
        for name, layer in _layers(model).items():
            e = layer.lora_E[adapter]  # (r, 1)
            kept = list(keep[name])
            e.masked_fill_(~torch.tensor(kept, device=e.device).view(-1, 1), 0.0)
            pattern[f"{name}.lora_E.{adapter}"] = kept
    return pattern


def replace_adalora_allocation(
    model: nn.Module,
    *,
    budget_schedule: Callable[[int], tuple[int, bool]],
    mask_to_budget: Callable[[nn.Module, int], dict[str, list[bool]]],
) -> None:
    """Install replacements of the allocator's ``budget_schedule(step) -> (budget, mask now?)`` and
    ``mask_to_budget(model, budget) -> rank_pattern`` (PEFT calls both from ``update_and_allocate``)."""
    alloc = _tuner(model).rankallocator
    alloc.budget_schedule = budget_schedule
    alloc.mask_to_budget = mask_to_budget


# ---- conversion to plain LoRA ------------------------------------------------------------------------------


def adalora_to_lora(model: nn.Module, lora_config: Any, *, adapter_name: str = "default") -> nn.Module:
    """Rewrite an AdaLoRA PEFT model as a standard LoRA PEFT model with the same outputs, checked.

    AdaLoRA computes delta(x) = (B[:, k] E[k] A[k, :] x) * s / (ranknum + 1e-5) over kept triplets k (the
    mask is PEFT's ``rank_pattern``; without one, every triplet is kept). LoRA computes
    B' A' x * alpha_i / r_i. With A' = (E * A)[kept] (r_i x in) and B' = B[:, kept] * s / (ranknum + 1e-5) /
    (alpha_i / r_i), the two agree; alpha_i = alpha * r_i / r keeps the config's scale convention. A module
    whose triplets are all pruned is excluded from the LoRA adapter (``exclude_modules``; LoRA has no rank
    0), or, when ``exclude_modules`` is a regex, gets one inert rank (B' = 0): outputs unchanged. Trained
    ``modules_to_save`` copies (e.g. a classifier head) are carried over explicitly: PEFT's ``unload()``
    stopped doing it in 0.22, so fimlora takes the AdaLoRA layers off itself and leaves ``unload`` alone.

    The result is checked before it is returned: every module's update on a fixed probe, through each
    PEFT layer's own forward, and every saved module's parameters must match the AdaLoRA model's
    (:mod:`fimlora.peft_glue.verify`).

    Args:
        model: a PEFT model with an AdaLoRA adapter ``adapter_name``.
        lora_config: the ``LoraConfig`` to build on (its r, alpha, rsLoRA and dropout are used; targets,
            modules to save and task come from the AdaLoRA config).
        adapter_name: the AdaLoRA adapter.

    Returns:
        A new ``PeftModel`` with a LoRA adapter ``"default"`` whose ``save_pretrained`` output loads with
        vanilla PEFT. ``model`` is consumed (its base model is reused).

    Raises:
        AdapterCheckError: the LoRA model does not compute what the AdaLoRA model did (a PEFT release that
            behaves differently); ``model`` is put back as it was.
    """
    from peft import LoraConfig, get_peft_model

    root = _tuner(model)
    ada_cfg = root.peft_config[adapter_name]
    layers = _layers(model)
    found = {name: _lora_form(name, layer, adapter_name, ada_cfg) for name, layer in layers.items()}
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
            a, b = layers[name].lora_A[adapter_name], layers[name].lora_B[adapter_name]
            factors[name] = (a[:1].detach().clone(), torch.zeros_like(b[:, :1]).detach())
    r, alpha, rslora = int(lora_config.r), lora_config.lora_alpha, bool(lora_config.use_rslora)
    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    alphas = {n: scaled_alpha(alpha, r, k, use_rslora=rslora) for n, k in ranks.items()}
    rank_pattern, alpha_pattern = rank_patterns(ranks, alphas)
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
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    expected = forward_updates(model)
    saved = saved_module_states(model, adapter_name)
    base, undo = _take_off_adapter(root)
    try:
        with torch.random.fork_rng(devices=[]):  # LoRA init draws random A; leave the caller's RNG alone
            plain = get_peft_model(base, plain_cfg)
        mods = lora_modules(plain)
        missing = sorted(set(factors) ^ set(mods))
        if missing:
            raise AdapterCheckError(
                f"AdaLoRA and LoRA adapt different modules ({missing[:3]}) " + version_advice()
            )
        with torch.no_grad():
            for name, (a, b) in factors.items():
                layer = mods[name]
                scale = layer.scaling["default"]  # alpha_i / r_i (or / sqrt(r_i)), as PEFT computed it
                lora_a, lora_b = lora_factors(layer)
                lora_a.weight.copy_(a)
                lora_b.weight.copy_(b / scale)
        load_saved_module_states(plain, saved, "default")
        check_updates(expected, forward_updates(plain), what="the AdaLoRA -> LoRA conversion")
        check_saved_modules(
            saved, saved_module_states(plain, "default"), what="the AdaLoRA -> LoRA conversion"
        )
    except BaseException:
        undo()
        raise
    return plain


def _take_off_adapter(root: Any) -> tuple[nn.Module, Callable[[], None]]:
    """The tuner's base model with every PEFT layer and saved-module wrapper replaced by its original module
    (what ``unload()`` does, without its version-dependent side effects), and a function that undoes it."""
    base = root.model
    swapped = swap_in_original_modules(base)
    config = base.__dict__.get("peft_config")
    if "peft_config" in base.__dict__:
        del base.peft_config

    def undo() -> None:
        for parent, child, module in swapped:
            setattr(parent, child, module)
        if config is not None:
            base.peft_config = config

    return base, undo


def _lora_form(name: str, layer: Any, adapter: str, ada_cfg: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
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
