"""Carry optimizer state across a resize of LoRA factors, so that no state is ever stale.

Training-time rank methods (L1RA, Singh et al., arXiv 2509.04884) rebuild a module's LoRA factors at a
new rank, keeping some rank indices (rows of A, columns of B, entries of a gate). The rebuilt tensors
are new ``nn.Parameter`` objects, so the optimizer still points at the old ones: it would keep updating
tensors that are no longer in the model, and the new ones would never move. :func:`carry_optimizer_state`
swaps the parameters in ``optimizer.param_groups`` and remaps ``optimizer.state``:

* per-element buffers (AdamW's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``: any tensor with the
  old parameter's shape) keep the slices of the surviving rank indices, in their new positions; the
  positions of new indices are zero, i.e. what a fresh optimizer would hold;
* everything else (AdamW's ``step``, a scalar per parameter) is kept as is.

A caveat worth knowing: AdamW keeps one ``step`` per tensor, so fresh entries in a tensor that has
already taken many steps get the bias correction of a late step. Their first updates are then larger
than a fresh optimizer's (about ``(1-beta1)/sqrt(1-beta2)`` times the learning rate, 3.2 with the default
betas, decaying as the moments fill). Per-element step counts would need a custom optimizer; we prefer
zero moments (fresh) over copying moments from other indices (stale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParamRemap", "carry_optimizer_state", "stale_optimizer_params"]


@dataclass(frozen=True)
class ParamRemap:
    """How one parameter was rebuilt.

    Attributes:
        old: the parameter the optimizer knows.
        new: its replacement (may have a different size along ``dim``).
        dim: the rank dimension: 0 for LoRA-A (r x in) and gates (r,), 1 for LoRA-B (out x r).
        kept: old indices along ``dim`` whose values now sit at positions ``0..len(kept)-1`` of ``new``.
    """

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    kept: Sequence[int]


def carry_optimizer_state(optimizer: torch.optim.Optimizer, remaps: Sequence[ParamRemap]) -> None:
    """Point ``optimizer`` at the new parameters and carry the state of the kept indices over.

    Args:
        optimizer: any ``torch.optim`` optimizer holding the old parameters.
        remaps: one entry per rebuilt parameter.

    Raises:
        ValueError: an old parameter is not in the optimizer, or ``kept`` does not fit the shapes.
            Nothing is changed when this is raised.
    """
    located: list[tuple[ParamRemap, dict[str, object], int]] = []
    for remap in remaps:
        _check_remap(remap)
        where = _find_param(optimizer, remap.old)
        if where is None:
            raise ValueError(
                f"a resized parameter of shape {tuple(remap.old.shape)} is not in the optimizer: build the "
                "optimizer from `method.param_groups(model, ...)` so the method can keep it consistent"
            )
        located.append((remap, *where))
    for remap, group, index in located:
        params = group["params"]
        assert isinstance(params, list)
        params[index] = remap.new
        old_state = optimizer.state.pop(remap.old, None)
        if old_state:
            optimizer.state[remap.new] = {k: _remap_value(v, remap) for k, v in old_state.items()}


def stale_optimizer_params(
    optimizer: torch.optim.Optimizer, model_params: Sequence[nn.Parameter]
) -> list[str]:
    """Describe every optimizer entry that does not match a live parameter (empty when consistent).

    Checks that each parameter in ``param_groups`` is one of ``model_params`` (by identity), that every
    state key is in ``param_groups``, and that every per-element state tensor has its parameter's shape.
    Used by tests and as a debugging aid after reallocations.
    """
    live = {id(p) for p in model_params}
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    problems = []
    for g_index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in live:
                problems.append(f"group {g_index}: parameter of shape {tuple(p.shape)} is not in the model")
    for p, state in optimizer.state.items():
        if id(p) not in in_groups:
            problems.append(f"state for a parameter of shape {tuple(p.shape)} that no group holds")
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                problems.append(f"state {key!r} has shape {tuple(value.shape)}, parameter {tuple(p.shape)}")
    return problems


def _check_remap(remap: ParamRemap) -> None:
    old, new, dim = remap.old, remap.new, remap.dim
    if old.dim() != new.dim() or not 0 <= dim < old.dim():
        raise ValueError(f"cannot remap a {old.dim()}-d parameter to a {new.dim()}-d one along dim {dim}")
    other_old = [s for i, s in enumerate(old.shape) if i != dim]
    other_new = [s for i, s in enumerate(new.shape) if i != dim]
    if other_old != other_new:
        raise ValueError(f"shapes {tuple(old.shape)} and {tuple(new.shape)} differ outside dim {dim}")
    kept = list(remap.kept)
    if len(kept) > new.shape[dim] or any(not 0 <= i < old.shape[dim] for i in kept):
        raise ValueError(f"kept indices {kept} do not fit shapes {tuple(old.shape)} -> {tuple(new.shape)}")


def _find_param(
    optimizer: torch.optim.Optimizer, param: nn.Parameter
) -> tuple[dict[str, object], int] | None:
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is param:
                return group, i
    return None


def _remap_value(value: object, remap: ParamRemap) -> object:
    """Slice a per-element buffer to the kept indices; zeros for new positions; scalars unchanged."""
    if not isinstance(value, torch.Tensor) or value.shape != remap.old.shape or value.dim() == 0:
        return value
    out = torch.zeros(remap.new.shape, dtype=value.dtype, device=value.device)
    k = len(remap.kept)
    if k:
        index = torch.tensor(list(remap.kept), device=value.device, dtype=torch.long)
        out.narrow(remap.dim, 0, k).copy_(value.index_select(remap.dim, index))
    return out
