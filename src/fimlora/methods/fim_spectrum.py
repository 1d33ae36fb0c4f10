"""FIM-spectrum: ranks from how many gradient directions a module needs, not from how large its gradient is.

FIM-LoRA gives a module rank in proportion to the size of its LoRA-B gradient, which puts most rank next to
the classifier head, where gradients are largest. A large gradient says a module needs a large step, not
necessarily many directions. This method calibrates with a *wider* adapter (rank ``r_cal``, default the
largest rank a module may get). At init, B = 0 and A is random, so each batch's LoRA-B gradient

    G_t = dL_t/dB = s * (dL_t/dW) A^T                                   (out, r_cal)

is a random sketch of the full weight gradient's row space. Over T batches the second moment
``S = sum_t G_t^T G_t`` (r_cal x r_cal; its eigenvalues are the squared singular values of the stacked
sketches) says how the gradient's energy spreads over directions. Each module's eigenvalues are turned into
*shares* of its own energy, ``p_j = lambda_j / sum_i lambda_i`` (``normalize=True``), so a module whose
gradient lives in a few directions (one large share, then small ones) gets few ranks and one whose energy
is spread over many gets many, whatever its gradient's size. The directions of all modules then compete
for the budget in decreasing share per unit cost (:func:`fimlora.compress.spectrum.select_directions`,
the exact global selection also used by ``fimlora compress``), each module within ``[r_min, r_max]``.
``normalize=False`` ranks directions by raw energy instead (size matters again, as in FIM-LoRA).

The adapter is then rebuilt from the base model at the LoRA config's rank with the chosen ranks (A from
LoRA's init, B = 0): a plain PEFT LoRA adapter with ``rank_pattern``/``alpha_pattern``. The statistics
need ``r_cal^2`` numbers per module (plus one gradient of B at a time).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fimlora.calibration import gradient_passes
from fimlora.errors import CalibrationError
from fimlora.initialize import plan_rank_map
from fimlora.methods.base import LossFn, StaticRanksMethod, register_method
from fimlora.methods.budget import BudgetBoundsOptions, budget_metadata, check_int
from fimlora.peft_glue import apply_rank_map, lora_factors, lora_modules, module_shapes
from fimlora.rankmap import RankMap

__all__ = [
    "FimSpectrumMethod",
    "SpectrumOptions",
    "direction_shares",
    "gradient_spectra",
    "plan_spectrum_ranks",
]


@dataclass
class SpectrumOptions(BudgetBoundsOptions):
    """Calibration, budget and bounds of ``fim-spectrum``. Each field's docstring is its help text."""

    calibration_batches: int = 8
    """Batches whose LoRA-B gradients form the second moment (T)."""

    calibration_rank: int | None = None
    """Rank r_cal of the wide calibration adapter (the sketch size). Default: r_max, capped at min(in, out)."""

    normalize: bool = True
    """Rank directions by their share of their module's gradient energy (True) or by raw energy (False)."""

    def __post_init__(self) -> None:
        check_int("calibration_batches", self.calibration_batches, minimum=1)
        if self.calibration_rank is not None:
            check_int("calibration_rank", self.calibration_rank, minimum=1)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"`normalize` must be true or false, got {self.normalize!r}")
        self.check_budget_bounds()


# ---- the math (pure: plain numbers in and out) -----------------------------------------------------------


def direction_shares(eigenvalues: Sequence[float], *, normalize: bool = True) -> list[float]:
    """A module's gradient-energy eigenvalues, largest first, as shares of their sum (``normalize``) or raw.

    Tiny negative eigenvalues from rounding are clipped to 0; an all-zero spectrum gives all-zero shares.
    """
    values = sorted((max(0.0, float(v)) for v in eigenvalues), reverse=True)
    if not normalize:
        return values
    total = math.fsum(values)
    return [v / total if total > 0 else 0.0 for v in values]


def plan_spectrum_ranks(
    spectra: Mapping[str, Sequence[float]],
    shapes: Mapping[str, tuple[int, int]],
    options: SpectrumOptions,
    *,
    r: int,
) -> dict[str, int]:
    """Ranks from the directions' shares under the budget (default: uniform LoRA at ``r`` in the options'
    unit), each module within ``[r_min, min(r_max, min(in, out), len(spectrum))]``.

    Raises:
        ValueError: bounds or budget infeasible (the message gives the feasible range).
    """
    from fimlora.compress.spectrum import select_directions

    low, high = options.bounds(r)
    costs = {n: int(shapes[n][0] + shapes[n][1]) for n in spectra}
    shares = {}
    for name, eig in spectra.items():
        cap = min(high, min(shapes[name]))
        values = direction_shares(eig, normalize=options.normalize)[:cap]
        if len(values) < low:
            raise ValueError(
                f"module {name!r} has {len(values)} directions, fewer than r_min={low}: raise calibration_rank"
            )
        shares[name] = [math.sqrt(v) for v in values]  # select_directions values a direction by its square
    if options.budget_ranks is not None or (options.budget_params is None and options.budget_unit == "ranks"):
        budget = options.budget_ranks if options.budget_ranks is not None else r * len(spectra)
        return select_directions(shares, costs, budget_ranks=budget, min_rank=low)
    budget = options.budget_params if options.budget_params is not None else r * sum(costs.values())
    return select_directions(shares, costs, budget_params=budget, min_rank=low)


# ---- the statistics (torch) ------------------------------------------------------------------------------


def gradient_spectra(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
) -> tuple[dict[str, list[float]], int]:
    """Eigenvalues (largest first) of ``sum_t G_t^T G_t`` per LoRA module, ``G_t`` = batch t's LoRA-B gradient.

    Inside :func:`fimlora.calibration.calibration_mode` (eval mode, only the B factors need grad: A is
    frozen, so G_t is the sketch of the full gradient; flags, modes and ``.grad`` restored on exit). A hook
    folds each B gradient into its module's fp64 ``(r, r)`` moment as soon as it is accumulated.

    Returns:
        ``({module: eigenvalues}, batches seen)``.

    Raises:
        CalibrationError: no batches, a batch without a loss, or a non-finite gradient.
    """
    mods = lora_modules(model, adapter_name)
    bs = {n: lora_factors(m, adapter_name)[1].weight for n, m in mods.items()}
    moments = {
        n: torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64, device=b.device) for n, b in bs.items()
    }

    def collect(name: str, grad: torch.Tensor) -> None:
        g = grad.detach().double()  # (out, r)
        moments[name].add_(g.T @ g)

    seen = gradient_passes(model, bs, batches, num_batches, loss_fn, collect, "fim-spectrum")
    bad = [n for n, s in moments.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise CalibrationError(f"non-finite LoRA-B gradient in module {bad[0]!r}; check the batches' inputs")
    return {n: torch.linalg.eigvalsh(s).flip(0).tolist() for n, s in moments.items()}, seen


# ---- the method ----------------------------------------------------------------------------------------


@register_method("fim-spectrum")
class FimSpectrumMethod(StaticRanksMethod):
    """Ranks from how widely each module's gradient spreads over directions, then plain LoRA (ranks fixed).

    The spread is the spectrum of a wide calibration adapter's LoRA-B gradients (see the module docstring).
    """

    name = "fim-spectrum"
    options_class = SpectrumOptions
    supports_dora = False
    options: SpectrumOptions

    def check_budget(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """See :meth:`fimlora.methods.base.MethodBase.check_budget`."""
        plan_rank_map(dict.fromkeys(shapes, 1.0), shapes, self.options.allocation_config(), r=r)

    def set_ranks(
        self, base_model: nn.Module, lora_config: Any, batches: Iterable[Any] | None, loss_fn: LossFn | None
    ) -> tuple[nn.Module, RankMap]:
        """Calibrate a wide adapter, choose the ranks, rebuild the adapter at them from the base model.

        Raises:
            ValueError: infeasible bounds or budget.
            CalibrationError: the batches give no loss or a non-finite gradient.
        """
        from peft import get_peft_model

        assert batches is not None  # checked by prepare
        o = self.options
        r = int(lora_config.r)
        low, high = o.bounds(r)
        wide = copy.deepcopy(lora_config)
        wide.r = o.calibration_rank if o.calibration_rank is not None else high
        if wide.r < low:
            raise ValueError(f"`calibration_rank` ({wide.r}) must be >= r_min ({low})")
        t0 = time.perf_counter()
        calibrated = get_peft_model(base_model, wide)
        shapes = module_shapes(lora_modules(calibrated))
        spectra, seen = gradient_spectra(calibrated, batches, o.calibration_batches, loss_fn=loss_fn)
        ranks = plan_spectrum_ranks(spectra, shapes, o, r=r)
        seconds = time.perf_counter() - t0
        model = get_peft_model(calibrated.unload(), copy.deepcopy(lora_config))  # back to the base model
        apply_rank_map(model, ranks, adjust_scaling_factors=o.adjust_scaling_factors, seed=o.seed)
        meta: dict[str, Any] = {
            "config": asdict(o),
            "calibration_rank": int(wide.r),
            "calibration_batches": seen,
            "calibration_seconds": seconds,
            "shares": {n: direction_shares(v, normalize=o.normalize)[:high] for n, v in spectra.items()},
            "r_min": low,
            "r_max": high,
        }
        meta.update(budget_metadata("fim-spectrum", ranks, shapes, r))
        return model, RankMap(ranks, metadata=meta)
