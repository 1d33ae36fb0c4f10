"""Calibration: empirical Fisher and gradient variance of every LoRA-B factor.

With LoRA's usual init (B = 0), dL/dA = 0 and only B carries signal:
``dL/dB_m = s_m * sum_tokens delta_m (A_m x)^T``. Over T calibration batches with gradients ``g_t`` of
shape ``(out_m, r_m)`` we accumulate, in fp32,

    F_m = (1/T) sum_t g_t**2          (empirical Fisher diagonal)
    V_m = F_m - ((1/T) sum_t g_t)**2  (gradient variance)

and reduce each to one score per module by a mean or a sum over its elements. The statistics cost two
fp32 tensors per B (O(sum numel(B_m))), a few hundred times less than a full-model Fisher diagonal.

In a user's own loop (:func:`fim_calibration`) gradients are read by ``register_post_accumulate_grad_hook``
on the B parameters; the dataloader path (:func:`estimate_module_scores`) owns its loop and reads B's
``.grad`` after each backward instead, which saves a call from autograd into Python per module per batch.
Both add one backward's gradients to the sums with the same few multi-tensor kernels.
Under ``torch.distributed`` the raw sums are all-reduced, so T counts the batches of all processes.
Calibration is transactional: train/eval modes, ``requires_grad`` flags and existing ``.grad`` tensors are
restored whether it returns or raises.

``FimConfig(estimator="per_example")`` squares each *example's* gradient instead of each batch's. A
forward hook on every ``lora_B`` keeps its input ``H`` (N, T, r) and puts a tensor hook on its output that
receives ``D = dL/d(output)`` (N, T, out); B's post-accumulate-grad hook then turns this backward's pairs
into exact per-example squared norms with :func:`fimlora.per_example.per_example_sq_norms` (no per-example
gradient is stored) and drops B's ``.grad``. Over all M calibration examples, per module,

    F_m = (1/M) sum_n ||g_n||^2            (trace of the per-example empirical Fisher)
    V_m = F_m - ||(1/M) sum_n g_n||^2      (trace of the per-example gradient covariance)

reported as ``fisher_sum`` and ``variance_sum`` (the sums over B's elements of E_n[g^2] and Var_n[g]), so
"mean" aggregation divides by B's element count exactly as for batches. Scaling: a model's loss is usually
the mean over the batch, so ``dL/dB`` restricted to example n is ``grad(loss_n) / N``; each example's
gradient is multiplied by the batch size N, which makes ``g_n`` exactly ``grad(loss_n)`` for a mean over
examples and weights examples by their token share for a mean over tokens (as the batch estimator does).
Without this factor batches of different sizes would be weighted by ``1/N^2``. The first dimension of
lora_B's input must index examples (true of Hugging Face models). Each calibration example is counted once
under gradient checkpointing: a forward that records no graph (reentrant checkpointing's first pass) is
skipped and its recomputation counted, and the tensor hooks of a recomputation that is not differentiated
(non-reentrant checkpointing) never fire.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fimlora.config import AGGREGATIONS, SCORE_KINDS, FimConfig
from fimlora.errors import CalibrationError
from fimlora.peft_glue import data_parallel_inner, lora_modules, module_shapes
from fimlora.per_example import per_example_sq_norms

__all__ = ["CalibrationError", "ModuleStat", "ModuleStats", "estimate_module_scores", "fim_calibration"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
_FORMAT = "fimlora.module_stats/1"


@dataclass(frozen=True)
class ModuleStat:
    """Reduced statistics of one LoRA module's B gradient.

    Attributes:
        in_features: input size of the adapted layer.
        out_features: output size of the adapted layer.
        numel: number of elements of B at calibration time (out_features * r).
        fisher_sum: sum over B's elements of E[g^2].
        variance_sum: sum over B's elements of E[g^2] - E[g]^2.
    """

    in_features: int
    out_features: int
    numel: int
    fisher_sum: float
    variance_sum: float

    def score(self, kind: str, aggregation: str) -> float:
        """The module's score: ``kind`` in {"fisher", "variance"}, ``aggregation`` in {"mean", "sum"}."""
        if kind not in SCORE_KINDS:
            raise ValueError(f"`score` must be one of {SCORE_KINDS}, got {kind!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}")
        total = self.fisher_sum if kind == "fisher" else self.variance_sum
        return total / self.numel if aggregation == "mean" else total


@dataclass
class ModuleStats:
    """Calibration statistics for every LoRA module of one adapter, JSON-serialisable.

    This is the hand-off of the two-step API: compute under DDP, save on rank 0, apply later.
    """

    modules: dict[str, ModuleStat]
    num_batches: int
    seconds: float = 0.0
    world_size: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)

    def scores(self, kind: str = "fisher", aggregation: str = "mean") -> dict[str, float]:
        """Module name -> score, in module order."""
        return {n: m.score(kind, aggregation) for n, m in self.modules.items()}

    def costs(self) -> dict[str, int]:
        """Parameters per unit of rank for each module (in + out)."""
        return {n: m.in_features + m.out_features for n, m in self.modules.items()}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features)."""
        return {n: (m.in_features, m.out_features) for n, m in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "num_batches": self.num_batches,
            "seconds": self.seconds,
            "world_size": self.world_size,
            "metadata": self.metadata,
            "modules": {n: vars(m) for n, m in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModuleStats:
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a fimlora statistics file: expected format {_FORMAT!r}")
        return cls(
            modules={n: ModuleStat(**m) for n, m in data["modules"].items()},
            num_batches=int(data["num_batches"]),
            seconds=float(data.get("seconds", 0.0)),
            world_size=int(data.get("world_size", 1)),
            metadata=dict(data.get("metadata", {})),
        )

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a crash never leaves a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> ModuleStats:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read statistics file {path}: {e}") from e
        return cls.from_dict(data)


class _BGradAccumulator:
    """fp32 running sums of g and g^2 for every LoRA-B weight, fed by post-accumulate-grad hooks or by
    :meth:`collect` after each backward.

    Hooks run on autograd's backward thread, where every kernel launch and every line of Python delays
    the rest of the backward pass; at 1.5B parameters a backward is partly launch-bound, so five small
    kernels per module per batch measured +12% over plain passes on an H200. So a hook only takes the
    gradient (and drops ``.grad``); the gradients of one backward are added to the sums together, with a
    few multi-tensor (``torch._foreach_*``) kernels, when the next backward reaches a module again or when
    calibration ends. :meth:`collect` takes them all at once after a backward, with no hook at all.
    Nothing synchronises with the device until the end, when all non-finite flags are read at once.
    """

    def __init__(self, b_params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(b_params)
        self.sum_g = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.sum_g2 = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.counts = dict.fromkeys(self.params, 0)
        # Non-finite flags, read lazily: ((batch index, module) per entry, bool tensor of that length).
        self.nonfinite: list[tuple[list[tuple[int, str]], torch.Tensor]] = []
        # Gradients taken (by the hooks or collect) and not yet added: module -> (batch index, gradient).
        self._taken: dict[str, tuple[int, torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._one_device = len({p.device for p in self.params.values()}) <= 1

    def attach(self) -> None:
        for name, p in self.params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            g = param.grad
            if g is None:
                return
            # The gradient is consumed here: dropping it keeps memory at one backward's worth.
            param.grad = None
            if name in self._taken:  # a new backward pass: add the previous one first
                self.flush()
            self._taken[name] = (self.counts[name], g.detach())
            self.counts[name] += 1

        return hook

    def collect(self) -> None:
        """Take the B gradients one backward left in ``.grad`` and add them (instead of the hooks).

        For a loop that calls this after every backward: one pass over the B weights, where the hooks
        cost a call from autograd into Python per module per backward.
        """
        for name, p in self.params.items():
            g = p.grad
            if g is not None:
                p.grad = None
                self._taken[name] = (self.counts[name], g.detach())
                self.counts[name] += 1
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Add the pending gradients to the sums (each module at most once, so no aliasing)."""
        if not self._taken:
            return
        taken, self._taken = self._taken, {}
        names = list(taken)
        grads = [g if g.dtype == torch.float32 else g.float() for _, g in taken.values()]
        torch._foreach_add_([self.sum_g[n] for n in names], grads)
        torch._foreach_addcmul_([self.sum_g2[n] for n in names], grads, grads)
        # ||g|| is inf or NaN exactly when g holds an inf or a NaN (or overflows, which g^2 would too).
        flags = ~torch.isfinite(torch.stack(self._on_one_device(torch._foreach_norm(grads))))
        self.nonfinite.append(([(i, n) for n, (i, _) in taken.items()], flags))

    def _on_one_device(
        self, tensors: Sequence[torch.Tensor], device: torch.device | None = None
    ) -> list[torch.Tensor]:
        """``tensors`` on ``device`` (default: the first one's), for stacking; a model split over devices
        has its per-module results on each. A no-op, without a call per tensor, on one device."""
        if self._one_device:
            return list(tensors)
        target = device if device is not None else tensors[0].device
        return [x.to(target) for x in tensors]

    def finish(self) -> None:
        """Add what is pending and raise on any non-finite gradient (one device synchronisation)."""
        self.flush()
        self.check_finite()

    def check_finite(self) -> None:
        """Raise naming the first batch (and module) whose gradient had a NaN or inf."""
        entries, self.nonfinite = self.nonfinite, []
        if not entries:
            return
        device = entries[0][1].device
        flags = torch.cat([flag.reshape(-1).to(device) for _, flag in entries]).tolist()
        keys = [key for ks, _ in entries for key in ks]
        bad = [key for key, flag in zip(keys, flags, strict=True) if flag]
        if bad:
            i, n = min(bad)
            raise CalibrationError(
                f"non-finite (NaN or inf) LoRA-B gradient in calibration batch {i} (module {n!r}); "
                "check the inputs and labels of that batch, lower the learning rate of any prior "
                "training, or calibrate in fp32"
            )

    def all_reduce(self) -> int:
        """Sum the statistics over processes; returns the world size (1 when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        names = list(self.params)
        flat = torch.cat(
            [self.sum_g[n].flatten() for n in names]
            + [self.sum_g2[n].flatten() for n in names]
            + [torch.tensor([float(self.counts[n]) for n in names], device=self.sum_g[names[0]].device)]
        )
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for store in (self.sum_g, self.sum_g2):
            for n in names:
                k = store[n].numel()
                store[n].copy_(flat[offset : offset + k].view_as(store[n]))
                offset += k
        for i, n in enumerate(names):
            self.counts[n] = int(round(flat[offset + i].item()))
        return torch.distributed.get_world_size()

    def reduce(self, shapes: Mapping[str, tuple[int, int]]) -> tuple[dict[str, ModuleStat], int]:
        """Per-module statistics; batches where a module got no gradient count as zero gradient."""
        num_batches = max(self.counts.values(), default=0)
        t = max(num_batches, 1)
        # Modules with one shape (on one device) are reduced together: a few kernels per shape rather than
        # ten per module, which on a thousand-module model is most of the time spent here.
        groups: dict[tuple[tuple[int, ...], torch.device], list[str]] = {}
        for n, s in self.sum_g.items():
            groups.setdefault((tuple(s.shape), s.device), []).append(n)
        order: list[str] = []
        parts = []
        for names in groups.values():
            fisher = torch.stack([self.sum_g2[n] for n in names]).double() / t
            mean = torch.stack([self.sum_g[n] for n in names]).double() / t
            # One batch: E[g^2] - E[g]^2 is exactly 0, but fp32 g^2 vs (fp32 g)^2 in fp64 leaves rounding
            # noise (~1e-8 of the Fisher) that would otherwise become a random rank map.
            variance = (fisher - mean * mean).clamp_min(0.0) if t > 1 else torch.zeros_like(fisher)
            parts.append(torch.stack([fisher.flatten(1).sum(1), variance.flatten(1).sum(1)], dim=1))
            order += names
        # One synchronisation for all modules (which may sit on several devices).
        rows = torch.cat([x.to(parts[0].device) for x in parts]).tolist() if parts else []
        by_name = dict(zip(order, rows, strict=True))
        values = [by_name[n] for n in self.params]
        out = {}
        for n, (fisher_sum, variance_sum) in zip(self.params, values, strict=True):
            fan_in, fan_out = shapes[n]
            out[n] = ModuleStat(
                in_features=fan_in,
                out_features=fan_out,
                numel=self.sum_g[n].numel(),
                fisher_sum=fisher_sum,
                variance_sum=variance_sum,
            )
        return out, num_batches


class _PerExampleAccumulator(_BGradAccumulator):
    """fp32 running sums of sum_n ||g_n||^2 and sum_n g_n for every LoRA-B weight (see the module docstring).

    ``sum_g`` holds ``sum_n g_n``, ``sum_sq`` ``sum_n ||g_n||^2``, ``counts`` backward passes and
    ``examples`` examples per module. As in the batch accumulator, a hook does only the per-module work
    (here the exact squared norms from the layer's H and D) and one backward's parts are added to the sums,
    and its finiteness flags made, by a few multi-tensor kernels when the next backward reaches a module
    again or calibration ends. Whether B's whole gradient passes through its lora_B layer is checked on
    each module's first backward only: it depends on the model's structure, not on the batch.
    """

    # B's gradient must equal the sum of what its forward calls saw, to this relative tolerance (bf16 grads
    # are rounded; a gradient path that bypasses lora_B's forward, as DoRA's weight norm, is caught).
    _SEEN_RTOL = 2e-2

    def __init__(self, model: nn.Module, b_layers: Mapping[str, nn.Linear]) -> None:
        super().__init__({n: cast(nn.Parameter, layer.weight) for n, layer in b_layers.items()})
        self.sum_g2 = {}  # unused: the squares are per-example scalars in ``sum_sq``
        self.model = model
        self.layers = dict(b_layers)
        self.sum_sq = {n: p.new_zeros((), dtype=torch.float32) for n, p in self.params.items()}
        self.examples = dict.fromkeys(self.params, 0)
        # (forward id, H, D) of the current backward, per module; forward ids tell two forwards apart.
        self._pending: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {n: [] for n in self.params}
        self._forward_id = 0
        self.unseen: list[tuple[int, str, torch.Tensor]] = []
        self._checked: set[str] = set()  # modules whose gradient path has been checked
        self._probes: dict[tuple[int, torch.device], torch.Tensor] = {}
        # One backward's parts not yet added, per module: (batch index, tensor, its weight in sum_g,
        # sum of squared per-example norms, its weight in sum_sq).
        self._taken_pe: dict[str, tuple[int, torch.Tensor, float, torch.Tensor, float]] = {}

    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._new_forward))
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._capture(name)))
            self._handles.append(self.params[name].register_post_accumulate_grad_hook(self._hook(name)))

    def _new_forward(self, module: nn.Module, args: Any) -> None:
        self._forward_id += 1

    def _capture(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # No graph (no_grad, or reentrant checkpointing's first pass): nothing will be differentiated
            # here; a checkpointed layer's recomputation, which is differentiated, comes through again.
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return
            h = args[0].detach()
            forward_id = self._forward_id

            def on_grad(d: torch.Tensor) -> None:
                # The list is looked up now, not at forward time: graphs may be differentiated out of order.
                self._pending[name].append((forward_id, h, d.detach()))

            output.register_hook(on_grad)

        return hook

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            g = param.grad
            pending, self._pending[name] = self._pending[name], []
            if g is None:
                return
            param.grad = None
            if not pending:
                raise CalibrationError(
                    f"estimator='per_example': the LoRA-B weight of {name!r} got a gradient that did not "
                    "pass through its lora_B layer; use estimator='batch' for this model"
                )
            if name in self._taken_pe:  # a new backward pass: add the previous one first
                self.flush()
            # One group per forward pass: a layer called several times in one forward (shared weights)
            # adds positions to the same examples; separate forwards are separate examples.
            groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for forward_id, h, d in pending:
                groups.setdefault(forward_id, []).append((h, d))
            g = g.detach()
            check = name not in self._checked  # the gradient path is the model's structure: check it once
            self._checked.add(name)
            # x n below: the loss is a mean over the batch, so N * (example n's part) is grad(loss_n).
            if len(groups) == 1:
                # The usual case, one forward per backward: sum_n g_n is N times B's own gradient, and a
                # projection on a fixed probe vector checks that all of it went through the layer.
                n, h, d = self._positions(name, next(iter(groups.values())))
                sq = per_example_sq_norms(h, d).sum().float()
                self._taken_pe[name] = (self.counts[name], g, float(n), sq, float(n * n))
                if check:
                    gf, probe = g.float(), self._probe(g)
                    seen = torch.einsum("nto,nt->o", d.float(), h.float() @ probe)
                    unseen = (seen - gf @ probe).norm() > self._SEEN_RTOL * gf.norm() * probe.norm()
                    self.unseen.append((self.counts[name], name, unseen))
                examples = n
            else:
                gf = g.float()
                sum_sq = gf.new_zeros(())
                total = torch.zeros_like(gf)
                weighted = torch.zeros_like(gf)
                examples = 0
                for pairs in groups.values():
                    n, h, d = self._positions(name, pairs)
                    sum_sq += per_example_sq_norms(h, d).sum().float() * (n * n)
                    g_group = torch.einsum("nto,ntr->or", d.float(), h.float())
                    total += g_group
                    weighted.add_(g_group, alpha=n)
                    examples += n
                self._taken_pe[name] = (self.counts[name], weighted, 1.0, sum_sq, 1.0)
                if check:
                    self.unseen.append(
                        (self.counts[name], name, (total - gf).norm() > self._SEEN_RTOL * gf.norm())
                    )
            self.counts[name] += 1
            self.examples[name] += examples

        return hook

    @torch.no_grad()
    def flush(self) -> None:
        """Add one backward's per-module parts to the sums with a few multi-tensor kernels."""
        if not self._taken_pe:
            return
        taken, self._taken_pe = self._taken_pe, {}
        names = list(taken)
        parts = list(taken.values())
        grads = [g if g.dtype == torch.float32 else g.float() for _, g, _, _, _ in parts]
        torch._foreach_add_(
            [self.sum_g[n] for n in names], torch._foreach_mul(grads, [a for _, _, a, _, _ in parts])
        )
        sqs = list(torch._foreach_mul([sq for _, _, _, sq, _ in parts], [a for _, _, _, _, a in parts]))
        torch._foreach_add_([self.sum_sq[n] for n in names], sqs)
        # Non-finite exactly when B's gradient or the squared norms hold an inf or a NaN.
        norms = self._on_one_device(torch._foreach_norm(grads))
        flags = ~torch.isfinite(torch.stack(norms) + torch.stack(self._on_one_device(sqs, norms[0].device)))
        self.nonfinite.append(([(i, n) for n, (i, _, _, _, _) in taken.items()], flags))

    @staticmethod
    def _positions(
        name: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(N, H (N, P, r), D (N, P, out)) of one forward pass: each call of the layer adds positions."""
        n = pairs[0][0].shape[0]
        if any(h.shape[0] != n or d.shape[0] != n for h, d in pairs):
            raise CalibrationError(
                f"estimator='per_example': lora_B of {name!r} saw inputs with different first dimensions "
                f"{sorted({h.shape[0] for h, _ in pairs})} in one forward pass; the first dimension must "
                "index the examples"
            )
        hs = [h.reshape(n, -1, h.shape[-1]) for h, _ in pairs]
        ds = [d.reshape(n, -1, d.shape[-1]) for _, d in pairs]
        if len(pairs) == 1:  # no copy
            return n, hs[0], ds[0]
        return n, torch.cat(hs, dim=1), torch.cat(ds, dim=1)

    def _probe(self, g: torch.Tensor) -> torch.Tensor:
        """A fixed vector of r positive entries (cached per r and device)."""
        key = (g.shape[1], g.device)
        if key not in self._probes:
            gen = torch.Generator().manual_seed(0)
            self._probes[key] = (0.5 + torch.rand(g.shape[1], generator=gen)).to(g.device)
        return self._probes[key]

    def check_finite(self) -> None:
        """Raise on a non-finite gradient, or on a B gradient not made of what its lora_B layer saw."""
        super().check_finite()
        entries, self.unseen = self.unseen, []
        if not entries:
            return
        device = entries[0][2].device
        flags = torch.stack([flag.to(device) for _, _, flag in entries]).tolist()
        bad = [(i, n) for (i, n, _), flag in zip(entries, flags, strict=True) if flag]
        if bad:
            i, n = min(bad)
            raise CalibrationError(
                f"estimator='per_example': in calibration batch {i} the LoRA-B gradient of {n!r} differs "
                "from the sum of what its lora_B layer saw (part of it bypasses the layer, as with DoRA); "
                "use estimator='batch' for this model"
            )

    def all_reduce(self) -> int:
        """Sum the statistics over processes; returns the world size (1 when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        names = list(self.params)
        device = self.sum_g[names[0]].device
        flat = torch.cat(
            [self.sum_g[n].flatten() for n in names]
            + [torch.stack([self.sum_sq[n] for n in names])]
            + [torch.tensor([float(self.counts[n]) for n in names], device=device)]
            + [torch.tensor([float(self.examples[n]) for n in names], device=device)]
        )
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for n in names:
            k = self.sum_g[n].numel()
            self.sum_g[n].copy_(flat[offset : offset + k].view_as(self.sum_g[n]))
            offset += k
        for i, n in enumerate(names):
            self.sum_sq[n].copy_(flat[offset + i])
        offset += len(names)
        for i, n in enumerate(names):
            self.counts[n] = int(round(flat[offset + i].item()))
            self.examples[n] = int(round(flat[offset + len(names) + i].item()))
        return torch.distributed.get_world_size()

    @property
    def num_examples(self) -> int:
        return max(self.examples.values(), default=0)

    def reduce(self, shapes: Mapping[str, tuple[int, int]]) -> tuple[dict[str, ModuleStat], int]:
        """Per-module statistics over all examples; a module's missing examples count as zero gradient."""
        num_batches = max(self.counts.values(), default=0)
        m = max(self.num_examples, 1)
        out = {}
        for n in self.params:
            fisher = float(self.sum_sq[n].double()) / m
            mean = self.sum_g[n].double() / m
            fan_in, fan_out = shapes[n]
            out[n] = ModuleStat(
                in_features=fan_in,
                out_features=fan_out,
                numel=self.sum_g[n].numel(),
                fisher_sum=fisher,
                variance_sum=max(fisher - float((mean * mean).sum()), 0.0),
            )
        return out, num_batches


@dataclass
class _SavedState:
    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor]]


def _checkpoints(module: nn.Module) -> bool:
    """``module.gradient_checkpointing is True``, without nn.Module's slow ``__getattr__`` miss.

    Hugging Face sets the flag as a plain instance attribute over a class default; reading the instance
    dict, then the class, gives what ``getattr`` gives for such a flag at a fraction of the cost
    (calibration looks at every module of the model on each call).
    """
    own = vars(module)
    if "gradient_checkpointing" in own:
        return own["gradient_checkpointing"] is True
    return getattr(type(module), "gradient_checkpointing", False) is True


def _enter_calibration(model: nn.Module, trainable: Iterable[nn.Parameter]) -> _SavedState:
    """Put the model in calibration state (eval mode, only ``trainable`` needs grad, no .grad).

    One pass over the modules and one over the parameters: on a model with a thousand modules each pass
    costs about a millisecond, a visible part of calibrating a small model.
    """
    modules = list(model.modules())
    params = list(model.parameters())
    saved = _SavedState(
        training=[(m, m.training) for m in modules],
        requires_grad=[(p, p.requires_grad) for p in params],
        grads=[(p, p.grad) for p in params if p.grad is not None],
    )
    for p, _ in saved.grads:
        p.grad = None
    keep = {id(p) for p in trainable}
    for p in params:
        wanted = id(p) in keep
        if p.requires_grad != wanted:
            p.requires_grad_(wanted)
    # eval(): no dropout, so the statistics depend on the data and the seed of LoRA-A only.
    model.eval()
    # ...except for the layers (transformers >= 4.35) or models (older) that gradient-checkpoint: they
    # checkpoint only while `training` is True, so eval() would silently keep every activation and push
    # calibration's peak memory above a checkpointed training step's. Only that module's own flag is set;
    # its children (dropout included) stay in eval mode.
    for m in modules:
        if _checkpoints(m):
            m.training = True
    return saved


def _exit_calibration(saved: _SavedState) -> None:
    for m, mode in saved.training:
        m.training = mode
    for p, flag in saved.requires_grad:
        if p.grad is not None:  # left by calibration (A's, when it was trainable)
            p.grad = None
        if p.requires_grad != flag:
            p.requires_grad_(flag)
    for p, g in saved.grads:
        p.grad = g


class FimCalibration:
    """State of one calibration run; use through :func:`fim_calibration` or :func:`estimate_module_scores`."""

    def __init__(
        self,
        model: nn.Module,
        fim_config: FimConfig | None = None,
        *,
        adapter_name: str = "default",
        _own_loop: bool = False,
    ):
        self.model = model
        self.config = fim_config or FimConfig()
        self.adapter_name = adapter_name
        mods = lora_modules(model, adapter_name)  # validates model and adapter before touching anything
        self._shapes = module_shapes(mods, adapter_name)
        b_params = {n: m.lora_B[adapter_name].weight for n, m in mods.items()}
        trainable = list(b_params.values())
        if not self.config.freeze_lora_A:
            trainable += [m.lora_A[adapter_name].weight for m in mods.values()]
        self._acc = (
            _PerExampleAccumulator(model, {n: m.lora_B[adapter_name] for n, m in mods.items()})
            if self.config.estimator == "per_example"
            else _BGradAccumulator(b_params)
        )
        self._trainable = trainable
        # The batch estimator under estimate_module_scores' own loop reads .grad after each backward
        # (collect_backward); in a user's loop, and for the per-example estimator, hooks do the reading.
        self._hooks = not (_own_loop and type(self._acc) is _BGradAccumulator)
        self._saved: _SavedState | None = None
        self._t0 = 0.0
        self._result: ModuleStats | None = None

    def __enter__(self) -> FimCalibration:
        self._saved = _enter_calibration(self.model, self._trainable)
        if self._hooks:
            self._acc.attach()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._acc.detach()
            if exc_type is None:
                self._result = self._finish()
        finally:
            assert self._saved is not None
            _exit_calibration(self._saved)

    def _finish(self) -> ModuleStats:
        self._acc.finish()
        world = self._acc.all_reduce()
        modules, num_batches = self._acc.reduce(self._shapes)
        if num_batches == 0:
            raise CalibrationError(
                "no LoRA-B gradient was seen during calibration: run loss.backward() inside the block, "
                "and make sure the loss depends on the adapted modules"
            )
        metadata: dict[str, Any] = {"score": self.config.score, "aggregation": self.config.aggregation}
        if isinstance(self._acc, _PerExampleAccumulator):
            metadata.update(estimator="per_example", num_examples=self._acc.num_examples)
            if self.config.score == "variance" and self._acc.num_examples < 2:
                warnings.warn(
                    "the variance score needs >= 2 calibration examples; with 1 it is zero", stacklevel=3
                )
        elif self.config.score == "variance" and num_batches < 2:
            warnings.warn(
                "the variance score needs >= 2 calibration batches; with 1 it is zero", stacklevel=3
            )
        return ModuleStats(
            modules=modules,
            num_batches=num_batches,
            seconds=time.perf_counter() - self._t0,
            world_size=world,
            metadata=metadata,
        )

    def collect_backward(self) -> None:
        """Called after each backward by a loop that built the session with ``_own_loop=True``."""
        if not self._hooks:
            self._acc.collect()

    @property
    def scores(self) -> ModuleStats:
        """The statistics, available after the ``with`` block has exited without error."""
        if self._result is None:
            raise RuntimeError("calibration statistics are available only after the `with` block ends")
        return self._result


def fim_calibration(
    model: nn.Module, fim_config: FimConfig | None = None, *, adapter_name: str = "default"
) -> FimCalibration:
    """Context manager for calibrating inside your own loop.

    Example::

        with fim_calibration(model, FimConfig()) as cal:
            for batch in batches[:8]:
                model(**batch).loss.backward()     # no optimizer step
        initialize_lora_fim_ranks(model, scores=cal.scores)

    Every ``backward()`` inside the block counts as one calibration batch. On exit the model's modes,
    ``requires_grad`` flags and ``.grad`` tensors are restored as they were.
    """
    return FimCalibration(model, fim_config, adapter_name=adapter_name)


def estimate_module_scores(
    model: nn.Module,
    dataloader: Iterable[Any],
    fim_config: FimConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
) -> ModuleStats:
    """Run ``calibration_batches`` forward/backward passes and return per-module LoRA-B statistics.

    Args:
        model: a PEFT model with LoRA layers for ``adapter_name`` (B = 0, as freshly initialised). A
            ``DistributedDataParallel`` or ``DataParallel`` wrapper is unwrapped: the model inside is run,
            so that its backward does not average gradients over processes.
        dataloader: yields batches: dicts of tensors (Hugging Face convention; the model output's
            ``.loss`` is used) or anything ``loss_fn`` understands.
        fim_config: calibration settings (``calibration_batches`` is T).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, for batches without labels or custom losses.
        adapter_name: which adapter to calibrate.

    Returns:
        :class:`ModuleStats` with, per module, sums over B's ``(out, r)`` elements of E[g^2] and Var[g].

    Raises:
        CalibrationError: no batches, a batch without a loss, or a non-finite gradient (the message names
            the batch index). The model is left exactly as it was.
    """
    cfg = fim_config or FimConfig()
    # A DDP / DataParallel wrapper would average gradients over processes in backward; this loop is ours,
    # so it runs the model inside (the statistics are all-reduced here instead).
    inner = data_parallel_inner(model)
    if inner is not None:
        model = inner
    session = FimCalibration(model, cfg, adapter_name=adapter_name, _own_loop=True)
    device = _model_device(model)
    with session:
        seen = 0
        loss_flags: list[torch.Tensor] = []
        for i, batch in enumerate(
            _progress(itertools.islice(iter(dataloader), cfg.calibration_batches), cfg)
        ):
            loss = _batch_loss(model, _to_device(batch, device), loss_fn, i)
            loss.backward()
            session.collect_backward()
            # Read after the loop: a per-batch read would stall the device once per batch.
            loss_flags.append(~torch.isfinite(loss.detach()))
            seen += 1
        if loss_flags:
            bad = torch.stack([f.to(loss_flags[0].device) for f in loss_flags]).nonzero().flatten().tolist()
            if bad:
                raise CalibrationError(
                    f"calibration batch {bad[0]} has a non-finite loss; check its inputs and labels"
                )
        if seen == 0:
            raise CalibrationError(
                "the calibration dataloader yielded no batches: pass a non-empty dataloader"
            )
        if seen < cfg.calibration_batches:
            warnings.warn(
                f"the dataloader gave only {seen} of the {cfg.calibration_batches} calibration batches "
                "requested; using those",
                stacklevel=2,
            )
    return session.scores


def _progress(it: Iterator[Any], cfg: FimConfig) -> Iterator[Any]:
    if not cfg.show_progress:
        return it
    from tqdm.auto import tqdm

    return iter(tqdm(it, total=cfg.calibration_batches, desc="FIM calibration", leave=False))


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return (
            type(batch)(_to_device(v, device) for v in batch)
            if isinstance(batch, list)
            else tuple(_to_device(v, device) for v in batch)
        )
    return batch


def _batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None, index: int) -> torch.Tensor:
    loss: Any
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    elif isinstance(batch, Mapping):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
    else:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}, not a dict: pass "
            "`loss_fn=lambda model, batch: ...` that returns a scalar loss"
        )
    if loss is None:
        raise CalibrationError(
            f"calibration batch {index} produced no loss: include `labels` in the batch or pass `loss_fn`"
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise CalibrationError(
            f"the loss of calibration batch {index} must be a scalar tensor, got "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; reduce it "
            "(e.g. .mean()) in `loss_fn`"
        )
    if not loss.requires_grad:
        raise CalibrationError(
            f"the loss of calibration batch {index} does not depend on any LoRA-B weight (no gradient); "
            "check that the adapter is active and that the adapted modules are used in the forward pass"
        )
    return loss
