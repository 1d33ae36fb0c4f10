"""What a calibration session needs from a LoRA-B gradient accumulator, and the parts both share.

Calibration estimates, per LoRA module m, the empirical Fisher ``E[g^2]`` and the variance of the gradient
``g`` of its B factor (shape ``(out_m, r_m)``; with B = 0 at init only B carries signal). Two estimators
square different gradients: :class:`~fimlora.calibration.batch.BatchAccumulator` each calibration batch's,
:class:`~fimlora.calibration.per_example.PerExampleAccumulator` each example's. They are siblings behind
:class:`GradientAccumulator`; the session (:mod:`fimlora.calibration.session`) picks one from
``FimConfig.estimator`` and drives it through this protocol only.

Shared by both: :class:`LazyFlags` (device-side check flags read once, at the end),
:func:`raise_if_nonfinite`, :func:`all_reduce_sums` (one collective for all sums and counters),
:func:`on_one_device` and :class:`HookHandles`; by the two per-batch estimators (``.grad`` and layer
gradients), :class:`BatchSums`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle

from fimlora.calibration.stats import ModuleStat, batch_module_stats
from fimlora.errors import CalibrationError

__all__ = [
    "BatchSums",
    "GradientAccumulator",
    "HookHandles",
    "LazyFlags",
    "Reduction",
    "all_reduce_sums",
    "on_one_device",
    "raise_if_nonfinite",
]


@dataclass(frozen=True)
class Reduction:
    """What an accumulator's statistics reduce to.

    Attributes:
        modules: module name -> :class:`ModuleStat`, in module order.
        num_batches: backward passes seen (the most any module saw).
        num_samples: what the variance is taken over (batches or examples); it needs at least 2.
        sample_unit: the unit of ``num_samples``, plural ("batches" or "examples"), for messages.
        metadata: entries the estimator adds to :attr:`ModuleStats.metadata`.
    """

    modules: dict[str, ModuleStat]
    num_batches: int
    num_samples: int
    sample_unit: str
    metadata: dict[str, Any] = field(default_factory=dict)


class GradientAccumulator(Protocol):
    """Running sums over LoRA-B gradients, driven by a calibration session in this order:

    ``attach`` once; the model's backward passes (each followed by ``after_backward`` in a loop that owns
    them); ``detach``; then, unless the block raised, ``finish``, ``all_reduce`` and ``reduce``.
    """

    def attach(self, *, own_loop: bool = False) -> None:
        """Start observing backward passes. ``own_loop``: the caller calls :meth:`after_backward` after
        each backward, so an estimator that can read ``.grad`` then needs no hook."""
        ...

    def after_backward(self) -> None:
        """Called after each backward by a loop that owns it (``attach(own_loop=True)``)."""
        ...

    def detach(self) -> None:
        """Remove every hook :meth:`attach` registered."""
        ...

    def finish(self) -> None:
        """Add what is pending and raise :class:`CalibrationError` on a non-finite gradient."""
        ...

    def all_reduce(self) -> int:
        """Sum the raw statistics over processes; returns the world size (1 when not distributed)."""
        ...

    def reduce(self, shapes: Mapping[str, tuple[int, int]]) -> Reduction:
        """Per-module statistics; ``shapes`` maps module -> ``(in_features, out_features)``."""
        ...


class LazyFlags:
    """Boolean device tensors keyed by ``(batch index, module)``, read in one synchronisation at the end.

    Reading a flag per batch would stall the device once per batch and module.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[list[tuple[int, str]], torch.Tensor]] = []

    def add(self, keys: list[tuple[int, str]], flags: torch.Tensor) -> None:
        """Record ``flags`` (bool, ``len(keys)`` elements, any shape) for ``keys``."""
        self._entries.append((keys, flags))

    def first_set(self) -> tuple[int, str] | None:
        """The smallest key whose flag is set (None when none is), and forget all entries."""
        entries, self._entries = self._entries, []
        if not entries:
            return None
        device = entries[0][1].device
        flags = torch.cat([flag.reshape(-1).to(device) for _, flag in entries]).tolist()
        keys = [key for ks, _ in entries for key in ks]
        bad = [key for key, flag in zip(keys, flags, strict=True) if flag]
        return min(bad) if bad else None


def raise_if_nonfinite(flags: LazyFlags) -> None:
    """Raise naming the first batch (and module) whose gradient had a NaN or inf."""
    bad = flags.first_set()
    if bad is not None:
        i, n = bad
        raise CalibrationError(
            f"non-finite (NaN or inf) LoRA-B gradient in calibration batch {i} (module {n!r}); "
            "check the inputs and labels of that batch, lower the learning rate of any prior "
            "training, or calibrate in fp32"
        )


def all_reduce_sums(tensors: Sequence[torch.Tensor], counters: Sequence[dict[str, int]]) -> int:
    """Sum ``tensors`` in place and ``counters`` (module -> count, same keys) over processes.

    One collective for everything: the tensors (on one device) and the counters, as floats, are
    concatenated, all-reduced and copied back.

    Returns:
        The world size; 1, with nothing changed, when ``torch.distributed`` is not initialised.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    device = tensors[0].device
    names = list(counters[0]) if counters else []
    counts = [torch.tensor([float(c[n]) for n in names], device=device) for c in counters]
    parts = [*tensors, *counts]
    flat = torch.cat([t.flatten() for t in parts])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for t in parts:
        k = t.numel()
        t.copy_(flat[offset : offset + k].view_as(t))
        offset += k
    for counter, summed in zip(counters, counts, strict=True):
        for n, value in zip(names, summed.tolist(), strict=True):
            counter[n] = int(round(value))
    return torch.distributed.get_world_size()


def on_one_device(
    tensors: Sequence[torch.Tensor], device: torch.device | None = None, *, already: bool
) -> list[torch.Tensor]:
    """``tensors`` on ``device`` (default: the first one's), for stacking.

    A model split over devices has its per-module results on each; ``already=True`` (all on one device)
    makes this a no-op without a call per tensor.
    """
    if already:
        return list(tensors)
    target = device if device is not None else tensors[0].device
    return [x.to(target) for x in tensors]


class HookHandles:
    """The hooks one accumulator registered, removed together."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class BatchSums:
    """fp32 sums of each calibration batch's gradient ``g_t`` and of ``g_t**2``, per module, and what a
    per-batch accumulator does with them: add, check, all-reduce, reduce.

    A subclass takes the gradients (hooks, ``.grad`` or layer gradients) and hands each backward's to
    :meth:`add_gradients` from its ``flush``; the device-side non-finite flags are read once, in
    :meth:`finish`.

    Args:
        zeros: module name -> fp32 zeros of B's shape ``(out, r)`` on the device its sums live on.

    Attributes:
        sum_g: module name -> ``sum_t g_t``, fp32, shape ``(out, r)``.
        sum_g2: module name -> ``sum_t g_t**2``, fp32, shape ``(out, r)``.
        counts: module name -> backward passes that reached it.
    """

    def __init__(self, zeros: dict[str, torch.Tensor]) -> None:
        self.sum_g = zeros
        self.sum_g2 = {n: torch.zeros_like(s) for n, s in zeros.items()}
        self.counts = dict.fromkeys(zeros, 0)
        self.nonfinite = LazyFlags()
        self._one_device = len({s.device for s in zeros.values()}) <= 1

    def flush(self) -> None:
        """Add the gradients taken and not yet added (the subclass's)."""
        raise NotImplementedError

    @torch.no_grad()
    def add_gradients(self, keys: list[tuple[int, str]], grads: list[torch.Tensor]) -> None:
        """Add one backward's fp32 gradients, ``keys[i] = (batch index, module)`` for ``grads[i]``, to the
        sums with a few multi-tensor kernels (each module at most once, so no aliasing)."""
        names = [n for _, n in keys]
        torch._foreach_add_([self.sum_g[n] for n in names], grads)
        torch._foreach_addcmul_([self.sum_g2[n] for n in names], grads, grads)
        # ||g|| is inf or NaN exactly when g holds an inf or a NaN (or overflows, which g^2 would too).
        norms = on_one_device(torch._foreach_norm(grads), already=self._one_device)
        self.nonfinite.add(keys, ~torch.isfinite(torch.stack(norms)))

    def finish(self) -> None:
        """Add what is pending and raise on any non-finite gradient (one device synchronisation)."""
        self.flush()
        raise_if_nonfinite(self.nonfinite)

    def all_reduce(self) -> int:
        """Sum the statistics over processes; returns the world size (1 when not distributed)."""
        return all_reduce_sums([*self.sum_g.values(), *self.sum_g2.values()], [self.counts])

    def reduce(self, shapes: Mapping[str, tuple[int, int]]) -> Reduction:
        """Per-module statistics; batches where a module got no gradient count as zero gradient."""
        num_batches = max(self.counts.values(), default=0)
        modules = batch_module_stats(self.sum_g, self.sum_g2, num_batches, shapes)
        return Reduction(
            modules, num_batches, num_samples=num_batches, sample_unit="batches", metadata=self._metadata()
        )

    def _metadata(self) -> dict[str, Any]:
        """Entries this estimator adds to the statistics' metadata (none by default)."""
        return {}
