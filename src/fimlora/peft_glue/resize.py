"""Change an adapter's LoRA layers: rebuild them at new ranks and write ``rank_pattern``/``alpha_pattern``.

This is the only fimlora code that calls ``update_layer`` or writes an adapter's patterns, so that
``save_pretrained`` always describes the layers as they are and vanilla PEFT can load the result.

PEFT matches a pattern key ``k`` against a module name with ``re.match(rf"(.*\\.)?({k})$", name)``; a key
``^<escaped full name>$`` can only match that one module (PEFT >= 0.15).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fimlora.peft_glue.layers import (
    PEFT_MODEL_PREFIX,
    is_sharded,
    lora_config,
    lora_factors,
    lora_modules,
    lora_root,
    sharded_resize_error,
)
from fimlora.peft_glue.verify import ProbedUpdate, check_updates, factor_update, layer_update

__all__ = [
    "apply_rank_map",
    "drop_lora_modules",
    "lora_layout",
    "pattern_key",
    "rank_patterns",
    "resize_lora_modules",
    "restore_lora_layout",
    "scaled_alpha",
    "set_rank_patterns",
]

# Inits that read the base weights or data, or rewrite the base weights: rebuilding at a new rank with
# them would be wrong, so we refuse rather than silently produce a different adapter.
_UNSUPPORTED_INITS = ("pissa", "corda", "loftq", "eva", "olora", "lora_ga", "mica")


def pattern_key(module_name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly ``module_name`` and nothing else."""
    if module_name.startswith(PEFT_MODEL_PREFIX):
        module_name = module_name[len(PEFT_MODEL_PREFIX) :]
    return "^" + re.escape(module_name) + "$"


def scaled_alpha(lora_alpha: float, r: int, new_r: int, *, use_rslora: bool) -> float | int:
    """The alpha that keeps a module's scale when its rank goes from ``r`` to ``new_r``.

    LoRA's scale is alpha/r (rsLoRA: alpha/sqrt(r)), so alpha_i = alpha*r_i/r (rsLoRA: alpha*sqrt(r_i/r)).
    Integral values are returned as ``int`` so that configs stay tidy.
    """
    value = lora_alpha * (math.sqrt(new_r / r) if use_rslora else new_r / r)
    rounded = round(value)
    return int(rounded) if abs(value - rounded) < 1e-9 else value


def rank_patterns(
    ranks: Mapping[str, int], alphas: Mapping[str, float] | None = None
) -> tuple[dict[str, int], dict[str, float]]:
    """``(rank_pattern, alpha_pattern)`` with one exact-match key per module (no alphas: empty alpha_pattern).

    For a ``LoraConfig`` built before the model exists (e.g. to wrap a fresh model that will be sharded).
    """
    rank_pattern = {pattern_key(n): int(r) for n, r in ranks.items()}
    alpha_pattern = {pattern_key(n): a for n, a in alphas.items()} if alphas is not None else {}
    return rank_pattern, alpha_pattern


def set_rank_patterns(
    model: nn.Module,
    ranks: Mapping[str, int],
    alphas: Mapping[str, float] | None = None,
    *,
    adapter_name: str = "default",
) -> None:
    """Replace the adapter's ``rank_pattern`` (and ``alpha_pattern``; empty when ``alphas`` is None) by one
    exact-match key per module, so that ``save_pretrained`` writes a standard LoRA adapter.

    Only the config changes: call it with the ranks the layers have (see :func:`resize_lora_modules`).
    """
    cfg = lora_config(model, adapter_name)
    cfg.rank_pattern, cfg.alpha_pattern = rank_patterns(ranks, alphas)


def resize_lora_modules(
    model: nn.Module,
    ranks: Mapping[str, int],
    *,
    adapter_name: str = "default",
    alphas: Mapping[str, float] | None = None,
    keep: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> None:
    """Rebuild LoRA layers at new ranks, all or nothing.

    Each listed module gets fresh factors of rank ``ranks[name]``, initialised the way the adapter's
    ``init_lora_weights`` says (A random, B = 0). For modules in ``keep``, the listed rank indices of the
    old factors (rows of A, columns of B) are copied into the first positions, so a reallocation during
    training preserves what was learnt; the remaining new columns start with random A and zero B.

    Args:
        model: PEFT model.
        ranks: module name -> new rank (>= 1).
        adapter_name: adapter to resize.
        alphas: module name -> new lora_alpha (default: unchanged).
        keep: module name -> old rank indices to carry over (at most the new rank of that module).
        seed: seed for the random parts; the caller's global RNG state is not consumed.

    The kept columns are checked after the rebuild: each module in ``keep`` must compute, through PEFT's
    own forward, the update its kept columns made before (:mod:`fimlora.peft_glue.verify`).

    Raises:
        ValueError: unknown module, bad rank, too many kept indices, unsupported init. The model is
            restored to its previous state when anything fails.
        AdapterCheckError: a resized module computes something else (a PEFT release that rebuilds layers
            differently); the model is restored.
        TypeError: the model is sharded (FSDP2): build it at its ranks before sharding instead.
    """
    if is_sharded(model):
        raise sharded_resize_error(model, "resizing LoRA modules")
    mods = lora_modules(model, adapter_name)
    cfg = lora_config(model, adapter_name)
    init = cfg.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} derives LoRA from the base weights or data; fimlora can't rebuild "
            "such layers at new ranks. Use init_lora_weights=True or 'gaussian'."
        )
    for name, r in ranks.items():
        if name not in mods:
            raise ValueError(f"module {name!r} is not a LoRA layer of adapter {adapter_name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank of module {name!r} must be a positive integer, got {r!r}")
        if keep and name in keep:
            idx = list(keep[name])
            old_r = mods[name].r[adapter_name]
            if len(idx) > r or any(not 0 <= i < old_r for i in idx):
                raise ValueError(f"kept indices for {name!r} must be < {old_r} and at most {r} of them")

    snapshots = {name: _snapshot(mods[name], adapter_name) for name in ranks}
    kept_updates = _kept_updates(mods, ranks, alphas or {}, keep or {}, adapter_name, cfg)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, r in ranks.items():
                module = mods[name]
                old = snapshots[name]
                alpha = alphas[name] if alphas and name in alphas else module.lora_alpha[adapter_name]
                _update_layer(module, adapter_name, r, alpha, cfg)
                _match_dtypes(module, adapter_name, old)
                if keep and name in keep and keep[name]:
                    _copy_kept(module, adapter_name, old, list(keep[name]))
        got = {n: layer_update(mods[n]) for n in kept_updates}
        check_updates(
            kept_updates,
            {n: u for n, u in got.items() if u is not None},
            what="resizing LoRA modules (kept rank columns)",
        )
    except BaseException:
        for name, snap in snapshots.items():
            _restore(mods[name], adapter_name, snap)
        raise


def apply_rank_map(
    model: nn.Module,
    rank_map: Mapping[str, int],
    *,
    adapter_name: str = "default",
    adjust_scaling_factors: bool = True,
    seed: int = 0,
) -> dict[str, float | int]:
    """Rebuild every LoRA layer at its rank in ``rank_map`` and record it in the adapter's config.

    ``rank_pattern`` gets one exact-match key per module; with ``adjust_scaling_factors`` so does
    ``alpha_pattern`` (alpha_i = alpha*r_i/r, or alpha*sqrt(r_i/r) with rsLoRA), which keeps every
    module's scale equal to the config's. A module at rank 0 is dropped (:func:`drop_lora_modules`): its
    LoRA layer goes and ``target_modules`` becomes the exact list of the modules that keep one. Returns the
    alpha of every module kept.

    Raises:
        ValueError: the map and the model's LoRA modules differ (names listed), a rank is invalid, or
            every rank is 0. The model and its config are left untouched.
    """
    mods = lora_modules(model, adapter_name)
    cfg = lora_config(model, adapter_name)
    missing = [n for n in mods if n not in rank_map]
    extra = [n for n in rank_map if n not in mods]
    if missing or extra:
        raise ValueError(
            "the rank map does not match the model's LoRA modules: "
            + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unknown {extra[:3]}{' ...' if len(extra) > 3 else ''}" if extra else "")
            + "; compute the map on this model and adapter"
        )
    for name in mods:
        r = rank_map[name]
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rank of module {name!r} must be an integer >= 0 (0: dropped), got {r!r}")
    dropped = [n for n in mods if rank_map[n] == 0]
    if len(dropped) == len(mods):
        raise ValueError("every rank in the map is 0, which leaves no LoRA module; raise the budget")
    if dropped:
        _check_droppable(mods, dropped, adapter_name)
    ranks = {n: int(rank_map[n]) for n in mods if rank_map[n] > 0}
    alphas: dict[str, float | int]
    if adjust_scaling_factors:
        alphas = {
            n: scaled_alpha(cfg.lora_alpha, cfg.r, r, use_rslora=cfg.use_rslora) for n, r in ranks.items()
        }
    else:
        alphas = {n: cfg.lora_alpha for n in ranks}
    resize_lora_modules(model, ranks, adapter_name=adapter_name, alphas=alphas, seed=seed)
    if dropped:
        drop_lora_modules(model, dropped, adapter_name=adapter_name)
    set_rank_patterns(model, ranks, alphas if adjust_scaling_factors else None, adapter_name=adapter_name)
    return alphas


def drop_lora_modules(model: nn.Module, names: Sequence[str], *, adapter_name: str = "default") -> None:
    """Take the LoRA layer off each named module (rank 0), putting its base layer back in its place.

    The adapter's ``target_modules`` becomes the exact list of the modules that keep a LoRA layer, so that
    ``save_pretrained`` writes an adapter that vanilla PEFT loads with the same modules (PEFT cannot hold a
    rank of 0); their ``rank_pattern``/``alpha_pattern`` keys are dropped too.

    Raises:
        ValueError: an unknown module, a module whose LoRA layer also carries another adapter, or no
            module left. Nothing is changed then.
        TypeError: the model is sharded (FSDP2): build it without those modules before sharding instead.
    """
    if is_sharded(model):
        raise sharded_resize_error(model, "dropping LoRA modules")
    mods = lora_modules(model, adapter_name)
    unknown = [n for n in names if n not in mods]
    if unknown:
        raise ValueError(f"modules {unknown[:3]} are not LoRA layers of adapter {adapter_name!r}")
    gone = set(names)
    if gone >= set(mods):
        raise ValueError("dropping every LoRA module leaves no adapter; keep at least one")
    _check_droppable(mods, list(names), adapter_name)
    root = lora_root(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, mods[name].get_base_layer())
    kept = [n for n in mods if n not in gone]
    cfg = lora_config(model, adapter_name)
    cfg.target_modules = kept
    keys = {pattern_key(n) for n in gone}
    cfg.rank_pattern = {k: v for k, v in (cfg.rank_pattern or {}).items() if k not in keys}
    cfg.alpha_pattern = {k: v for k, v in (cfg.alpha_pattern or {}).items() if k not in keys}
    tuner = getattr(model, "base_model", model)
    targeted = getattr(tuner, "targeted_module_names", None)
    if isinstance(targeted, list):  # PEFT's record of what it adapted (used by its own reports)
        tuner.targeted_module_names = [t for t in targeted if t not in gone]


def _check_droppable(mods: Mapping[str, Any], names: Sequence[str], adapter_name: str) -> None:
    shared = [n for n in names if set(mods[n].lora_A) - {adapter_name}]
    if shared:
        raise ValueError(
            f"module {shared[0]!r} also carries adapter(s) {sorted(set(mods[shared[0]].lora_A) - {adapter_name})}: "
            "its LoRA layer can't be removed for one adapter; give it a rank >= 1"
        )


def lora_layout(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The adapter's ranks, alphas, patterns and targets: what a checkpoint needs to rebuild its shapes."""
    mods = lora_modules(model, adapter_name)
    cfg = lora_config(model, adapter_name)
    targets = cfg.target_modules
    return {
        "ranks": {n: int(m.r[adapter_name]) for n, m in mods.items()},
        "alphas": {n: m.lora_alpha[adapter_name] for n, m in mods.items()},
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
        "target_modules": sorted(targets) if isinstance(targets, set | list | tuple) else targets,
    }


def restore_lora_layout(model: nn.Module, layout: Mapping[str, Any], adapter_name: str = "default") -> None:
    """Give the model a :func:`lora_layout`'s ranks, alphas, patterns and targets (modules whose rank differs
    are rebuilt: a training-time method may have resized them; LoRA modules the layout does not list are
    dropped: an allocation gave them rank 0)."""
    current = lora_layout(model, adapter_name)
    missing = [n for n in layout["ranks"] if n not in current["ranks"]]
    if missing:
        raise ValueError(
            f"the checkpoint has LoRA modules {missing[:3]} that this model lacks; resume with the model and "
            "LoraConfig the checkpoint was written with"
        )
    extra = [n for n in current["ranks"] if n not in layout["ranks"]]
    if extra:
        drop_lora_modules(model, extra, adapter_name=adapter_name)
    changed = {n: r for n, r in layout["ranks"].items() if current["ranks"].get(n) != r}
    if changed:
        resize_lora_modules(
            model, changed, adapter_name=adapter_name, alphas={n: layout["alphas"][n] for n in changed}
        )
    cfg = lora_config(model, adapter_name)
    cfg.rank_pattern = dict(layout["rank_pattern"])  # verbatim: the layout's keys need not be exact-match
    cfg.alpha_pattern = dict(layout["alpha_pattern"])
    if "target_modules" in layout:  # (older checkpoints did not record it: they never dropped a module)
        targets = layout["target_modules"]
        cfg.target_modules = set(targets) if isinstance(targets, list) else targets


# ---- transactional resize helpers ---------------------------------------------------------------------

_DICT_ATTRS = ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "lora_bias", "lora_variant")
_MODULE_DICT_ATTRS = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")


def _snapshot(module: Any, adapter: str) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for attr in _DICT_ATTRS + _MODULE_DICT_ATTRS:
        store = getattr(module, attr, None)
        if store is not None and adapter in store:
            snap[attr] = store[adapter]
    snap["_active"] = list(module.active_adapters)
    return snap


def _restore(module: Any, adapter: str, snap: Mapping[str, Any]) -> None:
    for attr in _DICT_ATTRS + _MODULE_DICT_ATTRS:
        store = getattr(module, attr, None)
        if store is None:
            continue
        if attr in snap:
            store[adapter] = snap[attr]
        elif adapter in store:
            del store[adapter]


@functools.cache
def _update_layer_takes_config() -> bool:
    """Whether the installed PEFT's ``update_layer`` takes the ``LoraConfig`` (0.19 and later); read from the
    version, not the signature, so that a wrapped ``update_layer`` is called the same way."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("peft")) >= Version("0.19.0.dev0")


def _update_layer(module: Any, adapter: str, r: int, alpha: float, cfg: Any) -> None:
    """PEFT's ``update_layer``: it takes the ``LoraConfig`` since peft 0.19, its fields one by one before."""
    if _update_layer_takes_config():
        module.update_layer(adapter_name=adapter, r=r, lora_alpha=alpha, config=cfg)
        return
    module.update_layer(
        adapter_name=adapter,
        r=r,
        lora_alpha=alpha,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights=cfg.init_lora_weights,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        lora_bias=cfg.lora_bias,
    )


def _kept_updates(
    mods: Mapping[str, Any],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    keep: Mapping[str, Sequence[int]],
    adapter: str,
    cfg: Any,
) -> dict[str, ProbedUpdate]:
    """Module name -> what the resized layer must compute: its kept rank columns' product at the new scale,
    ``s' * X A[keep]^T B[:, keep]^T`` with LoRA's s' = alpha' / r' (rsLoRA: alpha' / sqrt(r')), since its new
    columns start with B = 0. Modules whose new columns would not be inert (``init_lora_weights=False``:
    random B) or whose forward is not linear in the factors (DoRA) are not checked."""
    if cfg.init_lora_weights is False or getattr(cfg, "use_dora", False):
        return {}
    out = {}
    for name, idx in keep.items():
        if not idx:
            continue
        module = mods[name]
        a, b = lora_factors(module, adapter)
        index = torch.tensor(list(idx), device=a.weight.device)
        alpha = alphas.get(name, module.lora_alpha[adapter])
        scale = alpha / (math.sqrt(ranks[name]) if cfg.use_rslora else ranks[name])
        out[name] = factor_update(a.weight.index_select(0, index), b.weight.index_select(1, index), scale)
    return out


def _match_dtypes(module: Any, adapter: str, old: Mapping[str, Any]) -> None:
    """Give the rebuilt factors the dtype the old ones had.

    ``update_layer`` creates them in the base layer's dtype, but ``get_peft_model`` upcasts the adapter of
    a bf16/fp16 base to fp32 (``autocast_adapter_dtype=True``, its default). Without this a re-ranked
    adapter on a bf16 model would train in bf16 while uniform LoRA trains in fp32: a different optimizer
    numerics and a different step time, not just different ranks.
    """
    for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
        store = getattr(module, attr, None)
        ref = next(old[attr].parameters(), None) if attr in old else None
        if store is not None and adapter in store and ref is not None:
            store[adapter].to(dtype=ref.dtype)


@torch.no_grad()
def _copy_kept(module: Any, adapter: str, old: Mapping[str, Any], idx: list[int]) -> None:
    new_a, new_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    old_a, old_b = old["lora_A"].weight, old["lora_B"].weight
    k = len(idx)
    index = torch.tensor(idx, device=old_a.device)
    new_a[:k].copy_(old_a.index_select(0, index))
    new_b[:, :k].copy_(old_b.index_select(1, index))
    if old["lora_B"].bias is not None and module.lora_B[adapter].bias is not None:
        module.lora_B[adapter].bias.copy_(old["lora_B"].bias)
