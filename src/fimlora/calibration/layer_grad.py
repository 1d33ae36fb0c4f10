"""The batch estimator computed from each ``lora_B`` layer's input and output gradient, not from ``.grad``.

Same statistics as :class:`~fimlora.calibration.batch.BatchAccumulator` (per module, fp32 sums of
``g_t`` and ``g_t**2`` over calibration batches, ``g_t = dL_t/dB_m`` of shape ``(out_m, r_m)``), but ``g_t``
is formed here, from what the ``lora_B`` layer saw:

    g_t = sum over the layer's calls in backward t of  D^T H

with ``H`` the layer's input ``(..., r)`` (``lora_A(dropout(x))``) and ``D`` the gradient of the loss w.r.t.
its output ``(..., out)``. PEFT computes ``lora_B(lora_A(dropout(x))) * scaling``, so ``D`` already carries
the scale and ``D^T H`` is exactly the gradient autograd accumulates into B's weight (up to summation
order). Why not read ``.grad``: a sharded engine (PyTorch FSDP2 ``fully_shard``, FSDP1, DeepSpeed ZeRO-3)
leaves in ``.grad`` only this process's shard, already averaged over processes; activations are not
sharded, so ``H`` and ``D`` are full size on every data-parallel process and each process gets its own
micro-batch's ``g_t`` whatever the engine does with the parameters' gradients. The sums are then
all-reduced as in the other estimators, so T counts the micro-batches of all processes.

Hooks: a forward hook on every ``lora_B`` keeps ``H`` (autograd keeps it anyway, for B's weight gradient)
and puts a tensor hook on the output, which on ``D``'s arrival adds ``D^T H`` (in fp32 for bf16/fp16
activations) to this backward's gradient of the module and drops both. The first such hook in a backward
queues a callback that autograd runs when that backward ends (the mechanism FSDP and DDP use for their own
end-of-backward work): it adds the finished gradients to the sums, so every ``backward()`` is one
calibration batch, in a loop of any shape. A forward that records no graph (reentrant checkpointing's
first pass) is skipped; its recomputation, which is differentiated, is seen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fimlora.calibration.base import BatchSums, HookHandles

__all__ = ["LayerGradientAccumulator", "layer_weight_grad"]


def layer_weight_grad(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The weight gradient of a bias-free linear layer from its input and output gradient.

    Args:
        h: the layer's input, shape ``(..., r)``.
        d: the gradient of the loss w.r.t. its output, shape ``(..., out)`` (same leading dimensions).

    Returns:
        ``sum over positions of d^T h``, shape ``(out, r)``; in the inputs' dtype for fp32/fp64, in fp32
        for lower precisions (bf16 sums over thousands of tokens would lose the small terms).
    """
    dtype = torch.promote_types(torch.promote_types(h.dtype, d.dtype), torch.float32)
    h2 = h.reshape(-1, h.shape[-1])
    d2 = d.reshape(-1, d.shape[-1])
    h2 = h2 if h2.dtype == dtype else h2.to(dtype)
    d2 = d2 if d2.dtype == dtype else d2.to(dtype)
    # Autograd's weight gradient of F.linear is grad_output^T @ input over flattened positions: the same
    # product in the same order, so on an unsharded fp32 model the two agree to rounding.
    return d2.t().mm(h2)


class LayerGradientAccumulator(BatchSums):
    """fp32 running sums of g and g^2 per LoRA-B weight, g formed from its layer's input and output
    gradient (a :class:`GradientAccumulator`; see the module docstring).

    Args:
        b_layers: module name -> the module's ``lora_B`` layer (``nn.Linear`` r -> out); its weight may be
            sharded (a DTensor): only ``in_features``/``out_features`` and the device are read.

    Attributes:
        sum_g: module name -> ``sum_t g_t``, fp32, shape ``(out, r)``.
        sum_g2: module name -> ``sum_t g_t**2``, fp32, shape ``(out, r)``.
        counts: module name -> backward passes that reached it.
    """

    def __init__(self, b_layers: Mapping[str, nn.Linear]) -> None:
        self.layers = dict(b_layers)
        super().__init__({n: self._zeros(layer) for n, layer in self.layers.items()})
        # This backward's gradient per module (summed over the layer's calls), not yet added to the sums.
        self._current: dict[str, torch.Tensor] = {}
        self._queued = False
        self._hooks = HookHandles()

    @staticmethod
    def _zeros(layer: nn.Linear) -> torch.Tensor:
        # A DTensor weight's .device is its local shard's; the global shape comes from the layer.
        return torch.zeros(
            layer.out_features, layer.in_features, dtype=torch.float32, device=layer.weight.device
        )

    def attach(self, *, own_loop: bool = False) -> None:
        """Hook every lora_B layer's forward (whatever the loop: the hooks see H and D)."""
        for name, layer in self.layers.items():
            self._hooks.add(layer.register_forward_hook(self._capture(name)))

    def detach(self) -> None:
        self._hooks.remove()

    def after_backward(self) -> None:
        """Add the backward just finished (its end-of-backward callback has normally done it already)."""
        self.flush()

    def _capture(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return  # no graph: nothing will be differentiated through this call
            h = args[0].detach()

            def on_grad(d: torch.Tensor) -> None:
                g = layer_weight_grad(h, d.detach())
                current = self._current.get(name)
                self._current[name] = g if current is None else current.add_(g)
                if not self._queued:
                    self._queued = True
                    torch.autograd.Variable._execution_engine.queue_callback(self.flush)  # type: ignore[attr-defined]

            output.register_hook(on_grad)

        return hook

    @torch.no_grad()
    def flush(self) -> None:
        """Add one backward's gradients to the sums with a few multi-tensor kernels."""
        self._queued = False
        if not self._current:
            return
        current, self._current = self._current, {}
        names = list(current)
        grads = [g if g.dtype == torch.float32 else g.float() for g in current.values()]
        grads = [
            g if g.device == self.sum_g[n].device else g.to(self.sum_g[n].device)
            for n, g in zip(names, grads, strict=True)
        ]
        self.add_gradients([(self.counts[n], n) for n in names], grads)
        for n in names:
            self.counts[n] += 1

    def _metadata(self) -> dict[str, Any]:
        return {"gradients": "layer"}
