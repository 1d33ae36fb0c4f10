"""Exact per-example squared gradient norms of a linear layer's weight, without per-example gradients.

For a bias-free linear layer ``y = h W^T`` (LoRA's B factor: ``h`` is ``A x`` of width r, ``W`` is
``(out, r)``) applied to example n at positions t, the example's weight gradient is

    G_n = sum_t D[n, t]^T H[n, t]            (out x r)

with ``H`` the layer's input and ``D`` the gradient of the loss w.r.t. its output. Its squared Frobenius
norm follows from two Gram matrices over positions (the "ghost norm" of Goodfellow, 2015, "Efficient
per-example gradient computations", and Li et al., 2022, "Large language models can be strong
differentially private learners"):

    ||G_n||^2 = sum_{t, t'} (H_t . H_t') (D_t . D_t')

which costs ``T^2 (r + out)`` per example and never forms ``G_n``; with one position (2-D inputs) it is
``||D_n||^2 ||H_n||^2``. Forming ``G_n`` costs ``T r out`` instead, which is cheaper once ``T`` exceeds
about ``r`` (LoRA's B is thin, so its per-example gradient is small); ``method="auto"`` picks the cheaper
of the two by this count, as the "mixed ghost norm" of Bu et al. (2022) does. Either way examples are
processed in chunks so that the temporary stays below ``max_chunk_elements``.

Positions whose output gradient is zero (padding that no loss term sees) add nothing to the sum, so no
attention mask is needed. Pure torch: no PEFT, no transformers.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["NormMethod", "per_example_sq_norms"]

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
