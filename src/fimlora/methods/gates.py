"""Per-rank vectors between LoRA's A and B, and resizes that keep every module's scale.

Shared by the methods that learn ranks during training: L1RA's gates and LR-LoRA's soft mask are both a
vector over rank columns, multiplied into the input of B (shape ``(..., r)``) by a forward pre-hook, so no
PEFT layer is subclassed. When such a method changes ranks it resizes with the module's scale kept
(alpha_m = alpha * r_m / r, or rsLoRA's alpha * sqrt(r_m / r)), so adding or dropping zero columns does not
change the output, and it records the ranks in the adapter's patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fimlora.peft_glue import (
    current_ranks,
    lora_config,
    lora_factors,
    resize_lora_modules,
    scaled_alpha,
    set_rank_patterns,
)

__all__ = [
    "RankScaleHooks",
    "module_of_key",
    "param_key",
    "resize_keep_scale",
    "write_scaled_patterns",
]


def param_key(name: str) -> str:
    """A module name as an ``nn.ParameterDict`` key (keys can't contain "."; ":" never occurs in names)."""
    return name.replace(".", ":")


def module_of_key(key: str) -> str:
    """The module name of a :func:`param_key`."""
    return key.replace(":", ".")


class RankScaleHooks:
    """Multiply the input of each module's ``lora_B`` (shape (..., r)) by a per-rank vector.

    ``vector(name)`` is called at every forward, so the vector may be a parameter (L1RA's gates) or be
    computed from parameters (LR-LoRA's soft mask). Hooks must be re-installed on a module whose
    ``lora_B`` was rebuilt by a resize (the old ``nn.Linear`` is gone).
    """

    def __init__(self, vector: Callable[[str], torch.Tensor], adapter_name: str = "default") -> None:
        self.vector = vector
        self.adapter_name = adapter_name
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def install(self, modules: Mapping[str, Any]) -> None:
        """(Re-)install the hook on ``modules[name].lora_B[adapter]`` for every listed module."""
        for name, module in modules.items():
            self.remove([name])
            _, lora_b = lora_factors(module, self.adapter_name)
            self._handles[name] = lora_b.register_forward_pre_hook(self._make_hook(name))

    def remove(self, names: Iterable[str] | None = None) -> None:
        """Remove the hooks of ``names`` (all when None)."""
        for name in list(self._handles) if names is None else list(names):
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.remove()

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            # .to() is a no-op once the vector lives with the layer; it keeps a model moved after
            # prepare() (model.to("cuda")) correct until param_groups() moves the gates along.
            return (x * self.vector(name).to(device=x.device, dtype=x.dtype), *args[1:])

        return hook


def resize_keep_scale(
    model: nn.Module,
    ranks: Mapping[str, int],
    adapter: str,
    *,
    keep: Mapping[str, Sequence[int]] | None,
    seed: int,
) -> None:
    """Resize with ``resize_lora_modules`` keeping every module's scale, and record the patterns.

    Only modules whose rank changes (or that are listed in ``keep``) are rebuilt; the patterns are written
    for every module.
    """
    cfg = lora_config(model, adapter)
    now = current_ranks(model, adapter)
    todo = {n: int(r) for n, r in ranks.items() if int(r) != now[n] or (keep is not None and n in keep)}
    if todo:
        alphas = {
            n: scaled_alpha(cfg.lora_alpha, cfg.r, r, use_rslora=cfg.use_rslora) for n, r in todo.items()
        }
        resize_lora_modules(model, todo, adapter_name=adapter, alphas=alphas, keep=keep, seed=seed)
    write_scaled_patterns(model, current_ranks(model, adapter), adapter)


def write_scaled_patterns(model: nn.Module, ranks: Mapping[str, int], adapter: str) -> None:
    """rank_pattern/alpha_pattern with one exact key per module and the scale-keeping alphas, so
    ``save_pretrained`` writes a standard LoRA adapter."""
    cfg = lora_config(model, adapter)
    alphas = {
        n: scaled_alpha(cfg.lora_alpha, cfg.r, int(r), use_rslora=cfg.use_rslora) for n, r in ranks.items()
    }
    set_rank_patterns(model, ranks, alphas, adapter_name=adapter)
