"""A LoRA module's base weight, its scale, and writing its factors: for methods that initialise LoRA from data.

Gradient-based initialisations (GoRA) need the frozen weight of the layer a LoRA module wraps, that weight
seen as ``(out, in)`` whatever its storage (GPT-2's ``Conv1D`` stores ``(in, out)``, PEFT's
``fan_in_fan_out``), the module's scale ``s`` in ``W + s * B @ A``, and a way to write ``A`` and ``B``.
Reading a LoRA layer's attributes and writing its factors is PEFT-internal, so it lives here.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

__all__ = ["base_weight", "lora_scale", "set_lora_factors", "weight_out_in"]


def base_weight(module: Any) -> nn.Parameter:
    """The weight of the layer a LoRA module wraps, as stored: ``(out, in)``, or ``(in, out)`` for a
    ``fan_in_fan_out`` layer (see :func:`weight_out_in`).

    Raises:
        ValueError: the base weight is not a floating-point parameter (a quantized layer).
    """
    weight = module.get_base_layer().weight
    if not isinstance(weight, nn.Parameter) or not torch.is_floating_point(weight):
        raise ValueError(
            f"the base layer of a LoRA module has a {type(weight).__name__} weight of dtype "
            f"{getattr(weight, 'dtype', '?')}; a gradient-based initialisation needs a floating-point "
            "weight (not a quantized layer)"
        )
    return weight


def weight_out_in(module: Any, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, shaped like the module's base weight, viewed as ``(out, in)`` (a transpose for
    ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D``; no copy)."""
    return tensor.T if getattr(module, "fan_in_fan_out", False) else tensor


def lora_scale(module: Any, adapter_name: str = "default") -> float:
    """The scale ``s`` of the adapter's update ``s * B @ A`` (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    return float(module.scaling[adapter_name])


@torch.no_grad()
def set_lora_factors(
    module: Any,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    adapter_name: str = "default",
) -> None:
    """Write the factors of one LoRA module in place (each in the dtype and device it has).

    Args:
        module: a LoRA layer (from :func:`~fimlora.peft_glue.lora_modules`).
        a: new A, shape ``(r, in)``; None keeps A.
        b: new B, shape ``(out, r)``; None keeps B.
        adapter_name: which adapter's factors.

    Raises:
        ValueError: a shape differs from the factor's (nothing is written).
    """
    targets = []
    for label, value in (("A", a), ("B", b)):
        if value is None:
            continue
        layer = cast(nn.Linear, (module.lora_A if label == "A" else module.lora_B)[adapter_name])
        if tuple(value.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"LoRA-{label} has shape {tuple(layer.weight.shape)}, the new value {tuple(value.shape)}"
            )
        targets.append((layer.weight, value))
    for weight, value in targets:
        weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
