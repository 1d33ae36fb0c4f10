"""Find an adapter's LoRA layers and read them: config, shapes, ranks, factors.

Everything here reads PEFT's LoRA layers (``lora_A``/``lora_B`` module dicts keyed by adapter name,
``r``) so that no other fimlora module has to; changing them is :mod:`fimlora.peft_glue.resize`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import nn

__all__ = [
    "PEFT_MODEL_PREFIX",
    "current_ranks",
    "data_parallel_inner",
    "is_sharded",
    "lora_config",
    "lora_factor_params",
    "lora_factors",
    "lora_modules",
    "lora_root",
    "module_shapes",
    "sharded_resize_error",
]

PEFT_MODEL_PREFIX = "base_model.model."
"""What a ``PeftModel`` puts before the transformers model's module names (and saved tensor names)."""


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
    if name == "FullyShardedDataParallel":
        return TypeError(
            f"{name} (FSDP1): fimlora calibrates models sharded with FSDP2 (torch.distributed.fsdp."
            "fully_shard; in accelerate `fsdp_version: 2`), not FSDP1's wrapper, whose flattened parameters "
            "and renamed modules it does not read; shard with fully_shard, or calibrate before wrapping"
        )
    if name == "DeepSpeedEngine":
        return TypeError(
            f"{name}: fimlora works on the PEFT model inside the DeepSpeed engine, `engine.module` (run its "
            "forward and `loss.backward()` yourself, or pass it to estimate_module_scores)"
        )
    return None


def _zero3_partitioned(model: nn.Module) -> bool:
    # DeepSpeed ZeRO-3 gives every parameter a `ds_id`: the first one tells.
    return hasattr(next(model.parameters(), None), "ds_id")


def _fsdp2_module_cls() -> type | None:
    import torch

    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return cast(type, FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded: FSDP2's ``fully_shard`` (on it or a submodule) or
    DeepSpeed ZeRO-3 partitioning."""
    if _zero3_partitioned(model):
        return True
    cls = _fsdp2_module_cls()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def sharded_resize_error(model: nn.Module, action: str) -> TypeError:
    """The error for changing LoRA ranks on a sharded model, naming the flow that works instead."""
    return TypeError(
        f"{type(model).__name__} is sharded (FSDP2 or ZeRO-3): {action} would change LoRA ranks, and a sharded "
        "model's LoRA weights cannot be resized. Calibrate it with estimate_module_scores (or "
        "fim_calibration), plan the rank map, then build the adapter at its ranks before sharding: "
        "`get_peft_model(fresh_base_model, fimlora.lora_config_with_ranks(lora_config, rank_map))`, then "
        "shard and train (docs/sharded.md)"
    )


def _root_and_configs(model: nn.Module) -> tuple[nn.Module, Mapping[str, Any]]:
    """The module whose ``named_modules()`` names are PEFT's keys, and the adapter configs."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    wrapped = _wrapper_error(model)  # FSDP2's fully_shard keeps the model's class as a base: accepted
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


def lora_root(model: nn.Module) -> nn.Module:
    """The module whose ``named_modules()`` names are the LoRA module names (the base model inside PEFT)."""
    return _root_and_configs(model)[0]


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


def current_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Module name -> the rank its LoRA factors have now."""
    return {n: int(m.r[adapter_name]) for n, m in lora_modules(model, adapter_name).items()}


def lora_factors(module: Any, adapter_name: str = "default") -> tuple[nn.Linear, nn.Linear]:
    """The ``(A, B)`` layers of one LoRA module: A maps in -> r (weight ``(r, in)``), B maps r -> out
    (weight ``(out, r)``).

    B's input has shape ``(..., r)``: a forward pre-hook on B sees (and may scale) every rank column, which
    is how training-time methods put gates between A and B without subclassing PEFT's layers. A layer
    rebuilt by a resize is a new ``nn.Linear``: hooks must be installed again.
    """
    return module.lora_A[adapter_name], module.lora_B[adapter_name]


def lora_factor_params(module: Any, adapter_name: str = "default") -> list[nn.Parameter]:
    """``[A weight (r, in), B weight (out, r)]`` and, with ``lora_bias``, B's bias ``(out,)``.

    The rank is dim 0 of A's weight and dim 1 of B's; the bias is not rank-shaped.
    """
    a, b = lora_factors(module, adapter_name)
    params = [cast(nn.Parameter, a.weight), cast(nn.Parameter, b.weight)]
    if b.bias is not None:
        params.append(cast(nn.Parameter, b.bias))
    return params
