"""PEFT's ``modules_to_save`` (fully trained copies, e.g. a classifier head) and taking adapters off a model.

A ``ModulesToSaveWrapper`` holds the original module and one trained copy per adapter; the forward uses the
active adapter's copy and ``save_pretrained`` writes it. When fimlora rebuilds an adapter as another kind
(AdaLoRA -> LoRA) it carries those copies over itself, by parameter, rather than relying on what PEFT's
``unload()`` does with them (0.21 bound the trained weights to the original module, 0.22 keeps the original).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fimlora.errors import AdapterCheckError
from fimlora.peft_glue.layers import lora_root
from fimlora.peft_glue.verify import version_advice

__all__ = [
    "check_saved_modules",
    "load_saved_module_states",
    "saved_module_states",
    "swap_in_original_modules",
]

SavedStates = dict[str, dict[str, torch.Tensor]]


def _wrappers(model: nn.Module) -> dict[str, Any]:
    from peft.utils import ModulesToSaveWrapper

    return {n: m for n, m in lora_root(model).named_modules() if isinstance(m, ModulesToSaveWrapper)}


def saved_module_states(model: nn.Module, adapter_name: str = "default") -> SavedStates:
    """Wrapped module name -> a detached copy of the parameters and buffers of ``adapter_name``'s trained
    copy (what the forward uses and ``save_pretrained`` writes)."""
    out: SavedStates = {}
    for name, wrapper in _wrappers(model).items():
        if adapter_name in wrapper.modules_to_save:
            state = wrapper.modules_to_save[adapter_name].state_dict()
            out[name] = {k: v.detach().clone() for k, v in state.items()}
    return out


def load_saved_module_states(
    model: nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]], adapter_name: str
) -> None:
    """Load :func:`saved_module_states` into ``model``'s copies for ``adapter_name`` (same names).

    Raises:
        AdapterCheckError: ``model`` does not wrap one of the modules (a PEFT that wraps differently).
    """
    wrappers = _wrappers(model)
    for name, state in states.items():
        if name not in wrappers or adapter_name not in wrappers[name].modules_to_save:
            raise AdapterCheckError(
                f"the rebuilt adapter has no trained copy of {name} (modules_to_save) " + version_advice()
            )
        wrappers[name].modules_to_save[adapter_name].load_state_dict(dict(state))


def check_saved_modules(expected: SavedStates, got: SavedStates, *, what: str) -> None:
    """Raise unless both hold the same saved modules with identical tensors.

    Raises:
        AdapterCheckError: the first module or tensor that differs.
    """
    for name in sorted(set(expected) | set(got)):
        e, g = expected.get(name, {}), got.get(name, {})
        bad = sorted(
            k
            for k in set(e) | set(g)
            if k not in e or k not in g or not torch.equal(e[k], g[k].to(e[k].device))
        )
        if bad:
            raise AdapterCheckError(
                f"{what} changed the trained copy of {name} (modules_to_save: {bad[0]}) " + version_advice()
            )


def swap_in_original_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every PEFT layer by its base layer and every ``modules_to_save``-style wrapper by its original
    module, in ``model`` (a transformers model with adapters injected). Returns ``(parent, child name,
    replaced module)`` for each, so that putting the replaced modules back undoes it."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t, _ in targets):
            continue  # inside a module already taken off
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            targets.append((name, module.get_base_layer()))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            targets.append((name, module.original_module))
    swapped = []
    for name, original in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swapped.append((parent, child, getattr(parent, child)))
        setattr(parent, child, original)
    return swapped
