"""The teacher: a copy of the base model with low-rank updates planted in chosen linear modules.

For a module ``W`` (``out x in``, an ``nn.Linear``) planted at rank ``k`` the teacher holds
``W + sigma * U V^T`` with orthonormal ``U`` (``out x k``, Gaussian then QR) and ``V`` (``in x k``), and every
planted direction of equal weight ``sigma = strength * ||W||_2`` (``strength``: the dial, a fraction of the
module's largest singular value). Equal singular values make all ``k`` directions matter alike, so the
module needs rank ``k`` to be matched.

The input side is drawn from the data: ``V`` spans random mixtures of the module's *centred* input
activations on real text (``V = qr(X_c^T G)``, ``G`` Gaussian ``tokens x k``), so a planted update lies in
directions the data excites, weighted by how strongly it excites them, and does not vanish on held-out
text as a random direction orthogonal to the data would. Centring keeps the activations' large common
offset (a near-constant direction that acts like a bias) from taking one of the ``k`` directions.

Each seed draws new directions (and, for ``sparse``, new modules): every seed is a new planting.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["collect_inputs", "plant_updates"]


def collect_inputs(
    model: nn.Module, names: Iterable[str], batches: Iterable[Mapping[str, torch.Tensor]], *, max_rows: int
) -> dict[str, torch.Tensor]:
    """The input activations of the named linear modules on ``batches``, padding tokens left out.

    Args:
        model: the base model (not wrapped); ``names`` are its ``named_modules`` names.
        names: linear modules to record.
        batches: dicts of model inputs with ``attention_mask`` of shape (batch, seq).
        max_rows: keep at most this many token rows per module (the first ones).

    Returns:
        name -> float32 tensor of shape (rows, in_features), on the CPU.
    """
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202 - a forward pre-hook
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            keep = current["mask"].reshape(-1).bool()
            rows[name].append(x.reshape(-1, x.shape[-1])[keep].float().cpu())

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"]
                model(**batch)
                if all(sum(t.shape[0] for t in r) >= max_rows for r in rows.values()):
                    break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {n: torch.cat(r)[:max_rows] for n, r in rows.items()}


def plant_updates(
    base: nn.Module,
    ranks: Mapping[str, int],
    inputs: Mapping[str, torch.Tensor],
    *,
    strength: float,
    seed: int,
) -> tuple[nn.Module, dict[str, float]]:
    """A teacher: a deep copy of ``base`` with a rank-``ranks[m]`` update planted in every module ``m``.

    Args:
        base: the base model; left unchanged.
        ranks: module -> planted rank (0: untouched).
        inputs: module -> its input activations, shape (rows, in) (:func:`collect_inputs`); rows >= rank.
        strength: every planted singular value as a fraction of the module's largest one (> 0).
        seed: seeds the directions (a new planting per seed).

    Returns:
        ``(teacher, relative_norms)``: the teacher in eval mode with gradients off, and per planted module
        ``||Delta W||_F / ||W||_F``.

    Raises:
        ValueError: a non-positive strength, a module that is not an ``nn.Linear``, or too few input rows.
    """
    if not strength > 0:
        raise ValueError(f"`strength` must be > 0, got {strength}")
    teacher = copy.deepcopy(base).eval()
    teacher.requires_grad_(False)
    modules = dict(teacher.named_modules())
    generator = torch.Generator().manual_seed(int(seed))
    relative: dict[str, float] = {}
    for name in sorted(ranks):
        k = int(ranks[name])
        if k <= 0:
            continue
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear")
        x = inputs[name].double()
        if x.shape[0] < k:
            raise ValueError(f"module {name!r}: {x.shape[0]} input rows, fewer than the planted rank {k}")
        weight = module.weight.data.double()  # (out, in)
        x = x - x.mean(dim=0, keepdim=True)
        mix = torch.randn(x.shape[0], k, generator=generator, dtype=torch.float64)
        v, _ = torch.linalg.qr(x.T @ mix)  # (in, k), orthonormal, in the span of the data
        u, _ = torch.linalg.qr(torch.randn(weight.shape[0], k, generator=generator, dtype=torch.float64))
        sigma = float(strength) * float(torch.linalg.matrix_norm(weight, ord=2))
        delta = sigma * (u @ v.T)
        module.weight.data += delta.to(module.weight.dtype)
        relative[name] = float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(weight))
    return teacher, relative
