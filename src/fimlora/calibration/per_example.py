"""The per-example estimator: exact squared norms of each example's LoRA-B gradient, from one pass.

``FimConfig(estimator="per_example")`` squares each *example's* LoRA-B gradient instead of each batch's
(the empirical Fisher of per-example gradients; with B = 0 at init only B carries signal). A forward hook
on every ``lora_B`` keeps its input ``H`` (N, T, r) and puts a tensor hook on its output that receives
``D = dL/d(output)`` (N, T, out); B's post-accumulate-grad hook then turns this backward's pairs into
exact per-example squared norms with :func:`per_example_sq_norms` (no per-example gradient is stored) and
drops B's ``.grad``. Over all M calibration examples, per module,

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

The norms: for a bias-free linear layer ``y = h W^T`` (``W`` of shape ``(out, r)``) applied to example n
at positions t, ``G_n = sum_t D[n, t]^T H[n, t]`` and

    ||G_n||^2 = sum_{t, t'} (H_t . H_t') (D_t . D_t')

from two Gram matrices over positions (the "ghost norm" of Goodfellow, 2015, "Efficient per-example
gradient computations", and Li et al., 2022, "Large language models can be strong differentially private
learners"), at ``T^2 (r + out)`` per example without forming ``G_n``; with one position it is
``||D_n||^2 ||H_n||^2``. Forming ``G_n`` costs ``T r out`` instead, cheaper once ``T`` exceeds about ``r``;
``method="auto"`` picks the cheaper by this count, as the "mixed ghost norm" of Bu et al. (2022) does.
Examples are processed in chunks so the temporary stays below ``max_chunk_elements``. Positions whose
output gradient is zero (padding no loss term sees) add nothing, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from fimlora.calibration.base import (
    HookHandles,
    LazyFlags,
    Reduction,
    all_reduce_sums,
    on_one_device,
    raise_if_nonfinite,
)
from fimlora.calibration.stats import example_module_stats
from fimlora.errors import CalibrationError

__all__ = ["NormMethod", "PerExampleAccumulator", "per_example_sq_norms"]

NormMethod = Literal["auto", "gram", "direct"]

# 16 Mi elements = 64 MiB of fp32 temporaries per chunk.
_MAX_CHUNK_ELEMENTS = 1 << 24


def per_example_sq_norms(
    h: torch.Tensor,
    d: torch.Tensor,
    *,
    method: NormMethod = "auto",
    max_chunk_elements: int = _MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Squared Frobenius norms of the per-example weight gradients ``G_n = sum_t D[n,t]^T H[n,t]``.

    Pure torch: no PEFT, no transformers.

    Args:
        h: the layer's input, shape ``(N, r)`` or ``(N, T, r)``; more middle dimensions are flattened
            into T. N indexes examples.
        d: the gradient of the loss w.r.t. the layer's output, shape ``(N, out)`` or ``(N, T, out)``
            (same leading dimensions as ``h``).
        method: "gram" (never forms ``G_n``), "direct" (forms ``G_n`` one chunk of examples at a time)
            or "auto" (the one with fewer multiply-adds).
        max_chunk_elements: upper bound on the elements of one chunk's temporary (``c T T`` for "gram",
            ``c out r`` for "direct"); at least one example is processed per chunk.

    Returns:
        Shape ``(N,)``: ``||G_n||_F^2``, in fp64 for fp64 inputs and fp32 otherwise (bf16/fp16 inputs are
        upcast first, so the squares neither overflow nor lose the small terms).

    Raises:
        ValueError: mismatched leading dimensions, fewer than 2 dimensions, or an unknown method.
    """
    if h.dim() < 2 or d.dim() < 2:
        raise ValueError(f"h and d need shape (N, r) or (N, T, r); got {tuple(h.shape)} and {tuple(d.shape)}")
    if h.shape[:-1] != d.shape[:-1]:
        raise ValueError(
            f"h {tuple(h.shape)} and d {tuple(d.shape)} must agree in every dimension but the last"
        )
    if method not in ("auto", "gram", "direct"):
        raise ValueError(f"`method` must be 'auto', 'gram' or 'direct', got {method!r}")
    dtype = torch.promote_types(torch.promote_types(h.dtype, d.dtype), torch.float32)
    n, r, out = h.shape[0], h.shape[-1], d.shape[-1]
    h3 = h.reshape(n, -1, r)
    d3 = d.reshape(n, -1, out)
    # (.to only when needed: this runs per module per batch, and a no-op conversion still costs a dispatch)
    h3 = h3 if h3.dtype == dtype else h3.to(dtype)
    d3 = d3 if d3.dtype == dtype else d3.to(dtype)
    t = h3.shape[1]
    if t == 1:
        # One position: G_n = d_n^T h_n is rank one, ||G_n||^2 = ||d_n||^2 ||h_n||^2.
        return h3[:, 0].square().sum(-1) * d3[:, 0].square().sum(-1)
    if method == "auto":
        method = "gram" if t * (r + out) <= r * out else "direct"
    per_example = t * t if method == "gram" else out * r
    chunk = max(1, max_chunk_elements // max(per_example, 1))
    norms = []
    for start in range(0, n, chunk):
        hc, dc = h3[start : start + chunk], d3[start : start + chunk]
        if method == "gram":
            # (c, T, T) Gram matrices of inputs and output gradients; their inner product is ||G_n||^2.
            norms.append((hc @ hc.transpose(1, 2)).mul_(dc @ dc.transpose(1, 2)).sum((1, 2)))
        else:
            norms.append((dc.transpose(1, 2) @ hc).square().sum((1, 2)))
    if len(norms) == 1:
        return norms[0]
    return torch.cat(norms) if norms else h3.new_zeros(0)


class PerExampleAccumulator:
    """fp32 running sums of sum_n ||g_n||^2 and sum_n g_n for every LoRA-B weight (a
    :class:`GradientAccumulator`; see the module docstring).

    As in the batch accumulator, a hook does only the per-module work (here the exact squared norms from
    the layer's H and D) and one backward's parts are added to the sums, and its finiteness flags made, by
    a few multi-tensor kernels when the next backward reaches a module again or calibration ends. Whether
    B's whole gradient passes through its lora_B layer is checked on each module's first backward only: it
    depends on the model's structure, not on the batch. Hooks are needed whatever the loop: they see H and D.

    Args:
        model: the model whose forward passes are calibrated (a forward pre-hook tells them apart).
        b_layers: module name -> the module's ``lora_B`` layer (weight of shape ``(out, r)``).

    Attributes:
        params: module name -> B weight, shape ``(out, r)``.
        sum_g: module name -> ``sum_n g_n``, fp32, shape ``(out, r)``.
        sum_sq: module name -> ``sum_n ||g_n||^2``, fp32, shape ``()``.
        counts: module name -> backward passes that reached it.
        examples: module name -> examples that reached it.
    """

    # B's gradient must equal the sum of what its forward calls saw, to this relative tolerance (bf16 grads
    # are rounded; a gradient path that bypasses lora_B's forward, as DoRA's weight norm, is caught).
    _SEEN_RTOL = 2e-2

    def __init__(self, model: nn.Module, b_layers: Mapping[str, nn.Linear]) -> None:
        self.model = model
        self.layers = dict(b_layers)
        self.params = {n: layer.weight for n, layer in self.layers.items()}
        self.sum_g = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.sum_sq = {n: p.new_zeros((), dtype=torch.float32) for n, p in self.params.items()}
        self.counts = dict.fromkeys(self.params, 0)
        self.examples = dict.fromkeys(self.params, 0)
        self.nonfinite = LazyFlags()
        self.unseen = LazyFlags()  # per module's first backward: did part of B's gradient bypass lora_B?
        # (forward id, H, D) of the current backward, per module; forward ids tell two forwards apart.
        self._pending: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {n: [] for n in self.params}
        self._forward_id = 0
        self._checked: set[str] = set()  # modules whose gradient path has been checked
        self._probes: dict[tuple[int, torch.device], torch.Tensor] = {}
        # One backward's parts not yet added, per module: (batch index, tensor, its weight in sum_g,
        # sum of squared per-example norms, its weight in sum_sq).
        self._taken: dict[str, tuple[int, torch.Tensor, float, torch.Tensor, float]] = {}
        self._hooks = HookHandles()
        self._one_device = len({p.device for p in self.params.values()}) <= 1

    def attach(self, *, own_loop: bool = False) -> None:
        """Hook the model's forward, every lora_B layer's forward and every B weight (whatever the loop)."""
        self._hooks.add(self.model.register_forward_pre_hook(self._new_forward))
        for name, layer in self.layers.items():
            self._hooks.add(layer.register_forward_hook(self._capture(name)))
            self._hooks.add(self.params[name].register_post_accumulate_grad_hook(self._hook(name)))

    def after_backward(self) -> None:
        """Nothing to do: the hooks have taken this backward's gradients."""

    def detach(self) -> None:
        self._hooks.remove()

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
            if name in self._taken:  # a new backward pass: add the previous one first
                self.flush()
            # One group per forward pass: a layer called several times in one forward (shared weights)
            # adds positions to the same examples; separate forwards are separate examples.
            groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for forward_id, h, d in pending:
                groups.setdefault(forward_id, []).append((h, d))
            g = g.detach()
            check = name not in self._checked  # the gradient path is the model's structure: check it once
            self._checked.add(name)
            key = [(self.counts[name], name)]
            # x n below: the loss is a mean over the batch, so N * (example n's part) is grad(loss_n).
            if len(groups) == 1:
                # The usual case, one forward per backward: sum_n g_n is N times B's own gradient, and a
                # projection on a fixed probe vector checks that all of it went through the layer.
                n, h, d = self._positions(name, next(iter(groups.values())))
                sq = per_example_sq_norms(h, d).sum().float()
                self._taken[name] = (self.counts[name], g, float(n), sq, float(n * n))
                if check:
                    gf, probe = g.float(), self._probe(g)
                    seen = torch.einsum("nto,nt->o", d.float(), h.float() @ probe)
                    self.unseen.add(
                        key, (seen - gf @ probe).norm() > self._SEEN_RTOL * gf.norm() * probe.norm()
                    )
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
                self._taken[name] = (self.counts[name], weighted, 1.0, sum_sq, 1.0)
                if check:
                    self.unseen.add(key, (total - gf).norm() > self._SEEN_RTOL * gf.norm())
            self.counts[name] += 1
            self.examples[name] += examples

        return hook

    @torch.no_grad()
    def flush(self) -> None:
        """Add one backward's per-module parts to the sums with a few multi-tensor kernels."""
        if not self._taken:
            return
        taken, self._taken = self._taken, {}
        names = list(taken)
        parts = list(taken.values())
        grads = [g if g.dtype == torch.float32 else g.float() for _, g, _, _, _ in parts]
        torch._foreach_add_(
            [self.sum_g[n] for n in names], torch._foreach_mul(grads, [a for _, _, a, _, _ in parts])
        )
        sqs = list(torch._foreach_mul([sq for _, _, _, sq, _ in parts], [a for _, _, _, _, a in parts]))
        torch._foreach_add_([self.sum_sq[n] for n in names], sqs)
        # Non-finite exactly when B's gradient or the squared norms hold an inf or a NaN.
        norms = on_one_device(torch._foreach_norm(grads), already=self._one_device)
        sqs_here = on_one_device(sqs, norms[0].device, already=self._one_device)
        flags = ~torch.isfinite(torch.stack(norms) + torch.stack(sqs_here))
        self.nonfinite.add([(i, n) for n, (i, _, _, _, _) in taken.items()], flags)

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

    def finish(self) -> None:
        """Add what is pending; raise on a non-finite gradient, or on a B gradient not made of what its
        lora_B layer saw (two device synchronisations)."""
        self.flush()
        raise_if_nonfinite(self.nonfinite)
        bad = self.unseen.first_set()
        if bad is not None:
            i, n = bad
            raise CalibrationError(
                f"estimator='per_example': in calibration batch {i} the LoRA-B gradient of {n!r} differs "
                "from the sum of what its lora_B layer saw (part of it bypasses the layer, as with DoRA); "
                "use estimator='batch' for this model"
            )

    def all_reduce(self) -> int:
        """Sum the statistics over processes; returns the world size (1 when not distributed)."""
        return all_reduce_sums([*self.sum_g.values(), *self.sum_sq.values()], [self.counts, self.examples])

    @property
    def num_examples(self) -> int:
        """Examples seen (the most any module saw)."""
        return max(self.examples.values(), default=0)

    def reduce(self, shapes: Mapping[str, tuple[int, int]]) -> Reduction:
        """Per-module statistics over all examples; a module's missing examples count as zero gradient."""
        num_batches = max(self.counts.values(), default=0)
        m = self.num_examples
        modules = example_module_stats(self.sum_g, self.sum_sq, m, shapes)
        metadata = {"estimator": "per_example", "num_examples": m}
        return Reduction(modules, num_batches, num_samples=m, sample_unit="examples", metadata=metadata)
