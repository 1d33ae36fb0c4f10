"""The math of compressing a trained LoRA adapter: exact spectra from the factors, and a global choice.

A LoRA module's update is ``dW = s * B @ A`` with ``B`` ``(out, r)``, ``A`` ``(r, in)`` and scale ``s``.
Its singular value decomposition comes from the factors alone, never from the ``out x in`` matrix:

* ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced QR: ``Q_b`` ``(out, p)``, ``Q_a`` ``(in, q)``, ``p, q <= r``);
* ``dW = Q_b (s R_b R_a^T) Q_a^T``, and the core ``C = s R_b R_a^T`` is only ``(p, q)``;
* ``C = U_c diag(S) V_c^T`` gives ``dW = (Q_b U_c) diag(S) (Q_a V_c)^T``, an exact SVD.

Keeping a module's ``k`` largest singular directions is the best rank-``k`` approximation of its update in
Frobenius norm (Eckart-Young); the error is the energy ``sum(S[k:]**2)`` left out. Choosing ``k`` for every
module under one budget is then a choice of single directions, each with a value (its energy ``S_j**2``)
and a cost (a rank of module ``m`` costs ``in_m + out_m`` parameters, or 1 under a rank budget): see
:func:`select_directions` for why the greedy choice is exact for ranks and within one direction of optimal
for parameters. Pure torch (no PEFT): the adapter files are read and written by
:mod:`fimlora.peft_glue.compress_io`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fimlora.allocate import select_within_budget

__all__ = ["FactorSpectrum", "balanced_factors", "factor_svd", "kept_energy", "select_directions"]


@dataclass(frozen=True)
class FactorSpectrum:
    """The exact SVD ``dW = u @ diag(s) @ vh`` of one module's update, in float64.

    Attributes:
        u: Left singular vectors, shape ``(out, n)``, orthonormal columns.
        s: Singular values, shape ``(n,)``, non-increasing and ``>= 0`` (``n <= r``).
        vh: Right singular vectors, shape ``(n, in)``, orthonormal rows.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def energy(self) -> float:
        """Squared Frobenius norm of the update, ``sum(s**2)``."""
        return float((self.s**2).sum())

    @property
    def shape(self) -> tuple[int, int]:
        """``(in, out)`` of the module (the order used for LoRA costs: a rank costs ``in + out``)."""
        return int(self.vh.shape[1]), int(self.u.shape[0])


def factor_svd(a: torch.Tensor, b: torch.Tensor, scale: float) -> FactorSpectrum:
    """The exact SVD of ``scale * b @ a`` from QR decompositions of the factors (float64 throughout).

    Memory is ``O((in + out) * r + r**2)``: the ``out x in`` product is never formed.

    Args:
        a: LoRA-A, shape ``(r, in)``.
        b: LoRA-B, shape ``(out, r)``.
        scale: The module's scale ``s`` (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA, or any other).

    Returns:
        The spectrum; ``n = min(p, q)`` directions, where ``p = min(out, r)`` and ``q = min(in, r)``.

    Raises:
        ValueError: the shapes do not chain (``b.shape[1] != a.shape[0]``) or a factor is not finite.
    """
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"LoRA factors must be B (out, r) and A (r, in), got B {tuple(b.shape)}, A {tuple(a.shape)}"
        )
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise ValueError("LoRA factors hold NaN or infinite values")
    q_b, r_b = torch.linalg.qr(b64, mode="reduced")  # (out, p), (p, r)
    q_a, r_a = torch.linalg.qr(a64.T, mode="reduced")  # (in, q), (q, r)
    core = float(scale) * (r_b @ r_a.T)  # (p, q)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)  # (p, n), (n,), (n, q)
    return FactorSpectrum(u=q_b @ u_c, s=s, vh=vh_c @ q_a.T)


def balanced_factors(
    spectrum: FactorSpectrum, k: int, out_scale: float, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """New factors of rank ``k`` whose scaled product is the best rank-``k`` approximation of the update.

    ``out_scale * B' @ A' = u[:, :k] diag(s[:k]) vh[:k]`` with ``B' = u_k sqrt(s_k / out_scale)`` and
    ``A' = sqrt(s_k / out_scale) vh_k``: both factors carry half of the spectrum, so neither is tiny or huge
    (the balanced form a LoRA factor pair has after training).

    Args:
        spectrum: The module's :func:`factor_svd`.
        k: Rank to keep, ``1 <= k <= len(spectrum.s)``.
        out_scale: The scale PEFT will apply to the new factors (``> 0``).
        dtype: dtype of the returned factors.

    Returns:
        ``(A', B')`` with shapes ``(k, in)`` and ``(out, k)``.
    """
    n = int(spectrum.s.shape[0])
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be in [1, {n}], got {k}")
    if not (math.isfinite(out_scale) and out_scale > 0):
        raise ValueError(f"`out_scale` must be a positive number, got {out_scale}")
    root = torch.sqrt(spectrum.s[:k] / out_scale)  # (k,)
    a_new = root[:, None] * spectrum.vh[:k]  # (k, in)
    b_new = spectrum.u[:, :k] * root[None, :]  # (out, k)
    return a_new.to(dtype).contiguous(), b_new.to(dtype).contiguous()


def kept_energy(singular_values: Sequence[float] | torch.Tensor, k: int) -> tuple[float, float]:
    """``(kept, total)`` energy (sum of squared singular values) when the first ``k`` are kept."""
    values = [float(v) ** 2 for v in singular_values]
    return math.fsum(values[:k]), math.fsum(values)


def select_directions(
    singular_values: Mapping[str, Sequence[float]],
    costs: Mapping[str, int],
    *,
    budget_params: int | None = None,
    budget_ranks: int | None = None,
    min_rank: int = 0,
) -> dict[str, int]:
    """How many leading singular directions each module keeps under one global budget.

    Every direction ``j`` of module ``m`` is an item of value ``S_mj**2`` (the energy it keeps) and cost
    ``c_m`` (``in_m + out_m`` parameters under ``budget_params``; 1 under ``budget_ranks``). Items are taken
    in decreasing value per unit cost, ``S_mj**2 / c_m``, and the scan goes on past an item that does not fit
    (:func:`fimlora.allocate.select_within_budget`, the exact allocator's selection step). Because a module's
    values are non-increasing and its cost is constant, the kept items of a module are always its leading
    ones, so the choice is a rank per module. Why this rule:

    * rank budget: all costs are 1, so this keeps the ``R`` largest ``S**2`` over the whole adapter, which
      maximises the kept energy exactly (per module by Eckart-Young, across modules by exchange), and
      ``sum_m k_m == R`` exactly;
    * parameter budget: a knapsack whose fractional relaxation this greedy order solves; the integer choice
      is within the value of one direction of optimal, and the slack (budget minus cost kept) is smaller
      than the cost of every direction left out (so below one rank of the cheapest module that could grow).
      The proportional water-filling of :func:`fimlora.allocate.allocate_ranks` does not apply: the value of
      a rank here is known exactly and differs from rank to rank.

    The kept energy is non-decreasing in the budget (the greedy order is fixed; a larger budget either takes
    the same first item or one that the smaller budget could not afford, whose value exceeds everything the
    smaller budget kept). Ties keep the lower direction index first, then the earlier module, so equal
    values are spread over the modules (module 1's and module 2's second directions before either's third)
    rather than all given to the first module; deterministic.

    Args:
        singular_values: module -> its singular values, non-increasing (e.g. ``FactorSpectrum.s``).
        costs: module -> parameters per rank (``in + out``); only read with ``budget_params``.
        budget_params: total parameters ``sum_m k_m (in_m + out_m)`` allowed.
        budget_ranks: total rank ``sum_m k_m`` to keep exactly.
        min_rank: every module keeps at least ``min(min_rank, n_m)`` directions (0: a module may be dropped).

    Returns:
        module -> kept rank ``k_m`` (0 when dropped), in the order of ``singular_values``.

    Raises:
        ValueError: not exactly one budget, a negative budget or ``min_rank``, a missing or non-positive
            cost, increasing or negative singular values, or a budget below what ``min_rank`` needs (or a
            rank budget above the adapter's directions); the message gives the feasible range.
    """
    if (budget_params is None) == (budget_ranks is None):
        raise ValueError("give exactly one of `budget_params` and `budget_ranks`")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise ValueError(f"`min_rank` must be an integer >= 0, got {min_rank!r}")
    names = list(singular_values)
    if not names:
        raise ValueError("no modules to compress")
    by_rank = budget_ranks is not None
    budget = int(budget_ranks if by_rank else budget_params)  # type: ignore[arg-type]
    if budget < 0:
        raise ValueError(f"the budget must be >= 0, got {budget}")
    item_scores: list[float] = []
    item_costs: list[int] = []
    owner: list[str] = []
    forced_cost = 0
    total_cost = 0
    for name in names:
        values = [float(v) for v in singular_values[name]]
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"singular values of module {name!r} must be finite and >= 0")
        if any(later > earlier for earlier, later in zip(values, values[1:], strict=False)):
            raise ValueError(f"singular values of module {name!r} must be non-increasing")
        if by_rank:
            cost = 1
        else:
            if name not in costs:
                raise ValueError(f"`costs` has no entry for module {name!r}")
            cost = int(costs[name])
            if cost < 1:
                raise ValueError(f"cost of module {name!r} must be a positive integer, got {costs[name]!r}")
        for j, v in enumerate(values):
            forced = j < min_rank
            # Forced directions come first (infinite score); the others by energy per unit cost.
            item_scores.append(math.inf if forced else v * v / cost)
            item_costs.append(cost)
            owner.append(name)
            forced_cost += cost if forced else 0
            total_cost += cost
    unit = "budget_ranks" if by_rank else "budget_params"
    if budget < forced_cost or (by_rank and budget > total_cost):
        feasible = f"[{forced_cost}, {total_cost}]" if by_rank else f"at least {forced_cost}"
        raise ValueError(
            f"{unit}={budget} is infeasible: min_rank={min_rank} needs {forced_cost} and the adapter has "
            f"{total_cost} in all; the feasible budget is {feasible}"
        )
    # Items in (direction index, module) order: select_within_budget keeps ties in this order.
    index = [j for name in names for j in range(len(singular_values[name]))]
    order = sorted(range(len(owner)), key=lambda i: index[i])  # stable: module order within an index
    keep = select_within_budget([item_scores[i] for i in order], [item_costs[i] for i in order], budget)
    ranks = dict.fromkeys(names, 0)
    for i, kept in zip(order, keep, strict=True):
        ranks[owner[i]] += int(kept)
    return ranks
