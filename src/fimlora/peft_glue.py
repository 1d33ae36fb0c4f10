"""Everything that touches PEFT internals lives here, so a PEFT change touches one file.

* find a model's LoRA layers for an adapter, with clear errors for non-PEFT models;
* rebuild LoRA layers at new ranks (re-initialised, or keeping chosen rank columns for training-time
  reallocation) and write ``rank_pattern``/``alpha_pattern`` with keys that match exactly one module;
* export an adapter in the single-rank form that serving engines load correctly (scales folded into B,
  every module zero-padded to the largest rank).

PEFT matches a pattern key ``k`` against a module name with ``re.match(rf"(.*\\.)?({k})$", name)``; a key
``^<escaped full name>$`` can only match that one module (PEFT >= 0.15).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "apply_rank_map",
    "current_ranks",
    "export_uniform",
    "lora_config",
    "lora_modules",
    "module_shapes",
    "pattern_key",
    "resize_lora_modules",
    "scaled_alpha",
]

_PREFIX = "base_model.model."
# Inits that read the base weights or data, or rewrite the base weights: rebuilding at a new rank with
# them would be wrong, so we refuse rather than silently produce a different adapter.
_UNSUPPORTED_INITS = ("pissa", "corda", "loftq", "eva", "olora", "lora_ga", "mica")


def _lora_layer_cls() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def data_parallel_inner(model: nn.Module) -> nn.Module | None:
    """The model inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper; None for anything else."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return cast(nn.Module, model.module)
    return None


def _wrapper_error(model: nn.Module) -> TypeError | None:
    """A clear error for a data-parallel wrapper (whose ``.module`` fimlora must be given), else None."""
    name = type(model).__name__
    if data_parallel_inner(model) is not None:
        return TypeError(
            f"{name} is a data-parallel wrapper; fimlora works on the PEFT model inside it, `model.module`. "
            "estimate_module_scores unwraps it itself; in your own loop use "
            "`fim_calibration(model.module)` and call `model.module(...)`, because the wrapper's backward "
            "averages gradients over processes and statistics of averaged gradients are wrong (fimlora "
            "all-reduces its own sums). Change ranks (initialize_lora_fim_ranks with scores=...) on "
            "`model.module` before wrapping: the wrapper must be built after parameters change shape"
        )
    if name == "FullyShardedDataParallel" or any(c.__name__ == "FSDPModule" for c in type(model).__mro__):
        return TypeError(
            f"{name}: fimlora does not calibrate or resize sharded (FSDP) models; calibrate and set the "
            "ranks on the PEFT model before sharding it (or calibrate under DDP, which fimlora supports)"
        )
    return None


def _root_and_configs(model: nn.Module) -> tuple[nn.Module, Mapping[str, Any]]:
    """The module whose ``named_modules()`` names are PEFT's keys, and the adapter configs."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    wrapped = _wrapper_error(model)  # first: FSDP2's fully_shard keeps the model's class as a base
    if wrapped is not None:
        raise wrapped
    if isinstance(model, PeftModel):
        root: Any = model.base_model.model
        return root, model.peft_config
    if isinstance(model, LoraModel):
        return model.model, model.peft_config
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping) and any(isinstance(m, _lora_layer_cls()) for m in model.modules()):
        return (
            model,
            configs,
        )  # adapters injected with transformers' `add_adapter` / `inject_adapter_in_model`
    raise TypeError(
        f"{type(model).__name__} is not a PEFT LoRA model: wrap it first, e.g. "
        "`model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules='all-linear'))`"
    )


def lora_config(model: nn.Module, adapter_name: str = "default") -> Any:
    """The ``LoraConfig`` of ``adapter_name``; raises naming the adapters that exist."""
    _, configs = _root_and_configs(model)
    if adapter_name not in configs:
        raise ValueError(
            f"unknown adapter name {adapter_name!r}; this model has {sorted(configs)}: pass one of those as "
            "`adapter_name`"
        )
    cfg = configs[adapter_name]
    if str(getattr(cfg, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise ValueError(
            f"adapter {adapter_name!r} is a {cfg.peft_type} adapter; fimlora works on LoRA adapters "
            "(peft.LoraConfig)"
        )
    return cfg


def lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """Module name (without the ``base_model.model.`` prefix) -> LoRA layer carrying ``adapter_name``.

    Raises:
        TypeError: ``model`` is not a PEFT model.
        ValueError: unknown adapter, no LoRA layers, or LoRA layers that are not linear (embedding, conv).
    """
    root, _ = _root_and_configs(model)
    lora_config(model, adapter_name)
    layer_cls = _lora_layer_cls()
    found: dict[str, Any] = {}
    unsupported = []
    for name, module in root.named_modules():
        if not isinstance(module, layer_cls):
            continue
        module = cast(Any, module)
        if adapter_name in getattr(module, "lora_A", {}):
            if not isinstance(module.lora_A[adapter_name], nn.Linear):
                unsupported.append(f"{name} ({type(module.lora_A[adapter_name]).__name__})")
                continue
            found[name] = module
        elif adapter_name in getattr(module, "lora_embedding_A", {}):
            unsupported.append(f"{name} (embedding)")
    if unsupported:
        raise ValueError(
            "fimlora supports LoRA on linear layers only; these adapted modules are not: "
            + ", ".join(unsupported[:5])
            + (" ..." if len(unsupported) > 5 else "")
            + ". Remove them from `target_modules`."
        )
    if not found:
        raise ValueError(
            f"the model has no LoRA layers for adapter {adapter_name!r}: check `target_modules` in its LoraConfig"
        )
    return found


def module_shapes(modules: Mapping[str, Any], adapter_name: str = "default") -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of its LoRA pair (Conv1D's fan_in_fan_out handled)."""
    return {
        n: (m.lora_A[adapter_name].in_features, m.lora_B[adapter_name].out_features)
        for n, m in modules.items()
    }


def pattern_key(module_name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly ``module_name`` and nothing else."""
    if module_name.startswith(_PREFIX):
        module_name = module_name[len(_PREFIX) :]
    return "^" + re.escape(module_name) + "$"


def scaled_alpha(lora_alpha: float, r: int, new_r: int, *, use_rslora: bool) -> float | int:
    """The alpha that keeps a module's scale when its rank goes from ``r`` to ``new_r``.

    LoRA's scale is alpha/r (rsLoRA: alpha/sqrt(r)), so alpha_i = alpha*r_i/r (rsLoRA: alpha*sqrt(r_i/r)).
    Integral values are returned as ``int`` so that configs stay tidy.
    """
    value = lora_alpha * (math.sqrt(new_r / r) if use_rslora else new_r / r)
    rounded = round(value)
    return int(rounded) if abs(value - rounded) < 1e-9 else value


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

    Raises:
        ValueError: unknown module, bad rank, too many kept indices, unsupported init. The model is
            restored to its previous state when anything fails.
    """
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
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, r in ranks.items():
                module = mods[name]
                old = snapshots[name]
                alpha = alphas[name] if alphas and name in alphas else module.lora_alpha[adapter_name]
                module.update_layer(adapter_name=adapter_name, r=r, lora_alpha=alpha, config=cfg)
                _match_dtypes(module, adapter_name, old)
                if keep and name in keep and keep[name]:
                    _copy_kept(module, adapter_name, old, list(keep[name]))
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
    module's scale equal to the config's. Returns the alpha of every module.

    Raises:
        ValueError: the map and the model's LoRA modules differ (names listed), or a rank is invalid.
            The model and its config are left untouched.
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
    ranks = {n: int(rank_map[n]) for n in mods}
    if adjust_scaling_factors:
        alphas = {
            n: scaled_alpha(cfg.lora_alpha, cfg.r, r, use_rslora=cfg.use_rslora) for n, r in ranks.items()
        }
    else:
        alphas = {n: cfg.lora_alpha for n in ranks}
    resize_lora_modules(model, ranks, adapter_name=adapter_name, alphas=alphas, seed=seed)
    cfg.rank_pattern = {pattern_key(n): r for n, r in ranks.items()}
    cfg.alpha_pattern = {pattern_key(n): a for n, a in alphas.items()} if adjust_scaling_factors else {}
    return alphas


def current_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Module name -> the rank its LoRA factors have now."""
    return {n: int(m.r[adapter_name]) for n, m in lora_modules(model, adapter_name).items()}


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


# ---- export for serving engines ---------------------------------------------------------------------------


def export_uniform(
    model_or_adapter_dir: nn.Module | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write an equivalent single-rank adapter: scale folded into B, every module zero-padded to the max rank.

    The result has ``r = lora_alpha = max rank`` and no patterns (scale 1 everywhere), the form vLLM,
    SGLang and llama.cpp load correctly (they ignore ``alpha_pattern`` or scale by tensor rank). Padding
    rows of A and columns of B are zero, so outputs are unchanged.

    Args:
        model_or_adapter_dir: a PEFT model, or a directory written by ``save_pretrained``.
        out_dir: where to write; must not exist or be empty unless ``overwrite``.
        adapter_name: which adapter of a model to export.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; choose another directory or pass overwrite=True"
        )
    if isinstance(model_or_adapter_dir, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            model_or_adapter_dir.save_pretrained(  # type: ignore[operator]
                tmp, selected_adapters=[adapter_name]
            )
            src = Path(tmp) / adapter_name if adapter_name != "default" else Path(tmp)
            return _export_dir(src, out)
    return _export_dir(Path(model_or_adapter_dir), out)


def _export_dir(src: Path, out: Path) -> Path:
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file, save_file

    config_path, weights_path = src / "adapter_config.json", src / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{src} is not a PEFT adapter directory: it needs adapter_config.json and adapter_model.safetensors "
            "(save with `model.save_pretrained(dir)`)"
        )
    config: dict[str, Any] = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{src}: only plain LoRA adapters (no DoRA) can be exported to the uniform form")
    tensors = load_file(str(weights_path))
    if any(".lora_embedding_" in k for k in tensors):
        raise ValueError(f"{src}: LoRA on embeddings can't be exported to the uniform form")
    a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    ranks = {k: tensors[k].shape[0] for k in a_keys}
    r_max = max(ranks.values())
    alpha, r0 = config["lora_alpha"], config["r"]
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    out_tensors = dict(tensors)
    for a_key, r in ranks.items():
        prefix = a_key[: -len(".lora_A.weight")]
        name = prefix[len(_PREFIX) :] if prefix.startswith(_PREFIX) else prefix
        cfg_r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), r0)
        if cfg_r != r:
            raise ValueError(f"{src}: module {name} has rank {r} but the config says {cfg_r}")
        a_i = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), alpha)
        scale = a_i / math.sqrt(r) if config.get("use_rslora") else a_i / r
        a, b = tensors[a_key], tensors[prefix + ".lora_B.weight"]
        a_pad = torch.zeros(r_max, a.shape[1], dtype=a.dtype)
        b_pad = torch.zeros(b.shape[0], r_max, dtype=b.dtype)
        a_pad[:r] = a
        b_pad[:, :r] = (b.float() * scale).to(b.dtype)
        out_tensors[a_key], out_tensors[prefix + ".lora_B.weight"] = a_pad.contiguous(), b_pad.contiguous()
        bias_key = prefix + ".lora_B.bias"
        if bias_key in tensors:
            out_tensors[bias_key] = (tensors[bias_key].float() * scale).to(tensors[bias_key].dtype)
    new_config = dict(config, r=r_max, lora_alpha=r_max, use_rslora=False, rank_pattern={}, alpha_pattern={})
    # Write next to the destination and rename, so a crash never leaves a half-written adapter.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(out_tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
