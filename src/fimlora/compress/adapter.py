"""``compress_adapter``: shrink a trained LoRA adapter to a budget, each module's rank from its own spectrum.

For every module the exact SVD of its update ``s * B @ A`` is computed from the factors
(:func:`~fimlora.compress.spectrum.factor_svd`), one global choice of singular directions is made under the
budget (:func:`~fimlora.compress.spectrum.select_directions`), and each kept module gets new balanced
factors at its rank. The output is a plain PEFT LoRA adapter (``rank_pattern``/``alpha_pattern``, exact-match
keys) that vanilla PEFT reloads; modules that keep nothing are dropped from ``target_modules``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.compress.report import CompressionReport, ModuleCompression, plot_compression
from fimlora.compress.spectrum import balanced_factors, factor_svd, kept_energy, select_directions
from fimlora.errors import UsageError
from fimlora.io import OutputDir, write_provenance
from fimlora.peft_glue.compress_io import (
    AdapterFactors,
    check_compressible_config,
    module_alpha,
    module_scale,
    read_adapter_factors,
    write_lora_adapter,
)

__all__ = ["compress_adapter", "resolve_adapter_dir"]


def resolve_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """The adapter directory of ``path``: ``path/adapter`` for a ``fimlora train`` output, else ``path``."""
    p = Path(path)
    return p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else p


def check_budget(
    fraction: float | None, budget_params: int | None, budget_ranks: int | None, min_rank: int
) -> None:
    """Refuse a missing, doubled or out-of-range budget (before anything is read).

    Raises:
        UsageError: not exactly one budget, ``fraction`` outside ``(0, 1]``, a budget that is not a
            positive integer, or a negative ``min_rank``.
    """
    given = [k for k, v in (("fraction", fraction), ("budget_params", budget_params), ("budget_ranks", budget_ranks)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise UsageError(
            "give exactly one budget: fraction (of the adapter's LoRA parameters), budget_params or "
            f"budget_ranks{f'; got {given}' if given else ''}"
        )
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise UsageError(f"`fraction` must be in (0, 1], got {fraction!r}")
    for name, value in (("budget_params", budget_params), ("budget_ranks", budget_ranks)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"`{name}` must be a positive integer, got {value!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise UsageError(f"`min_rank` must be an integer >= 0, got {min_rank!r}")


def compress_adapter(
    adapter_dir_or_model: str | os.PathLike[str] | nn.Module,
    out_dir: str | os.PathLike[str] | None,
    *,
    fraction: float | None = None,
    budget_params: int | None = None,
    budget_ranks: int | None = None,
    min_rank: int = 0,
    adapter_name: str = "default",
    overwrite: bool = False,
    plot: bool = True,
) -> CompressionReport:
    """Compress a LoRA adapter to a budget, choosing every module's rank from the spectrum of its update.

    Works on any PEFT LoRA adapter directory (vanilla PEFT, TRL, axolotl, fimlora: rsLoRA, existing
    ``rank_pattern``/``alpha_pattern``, GPT-2's Conv1D, ``modules_to_save`` carried over unchanged) and on
    AdaLoRA adapters (converted to LoRA first). A compressed module keeps its scale convention: its alpha
    becomes ``alpha * k / r`` (rsLoRA: ``alpha * sqrt(k / r)``), and the factors carry the rest.

    Writes ``out_dir/adapter/`` (the PEFT adapter, plus the source directory's other files such as the
    tokenizer), ``compression.json``, ``compression.md``, ``compression.png`` (with matplotlib),
    ``config.json`` and ``run.json`` (provenance), and ``task.json`` when the source is a ``fimlora train``
    output. The directory appears only when complete.

    Args:
        adapter_dir_or_model: an adapter directory (``save_pretrained`` output), a ``fimlora train`` output
            directory, or a PEFT model (its adapter ``adapter_name`` is saved to a temporary directory first).
        out_dir: output directory; must not exist (or be empty) unless ``overwrite``. None: compute the
            report only, write nothing.
        fraction: keep this fraction of the adapter's LoRA parameters, ``sum_m r_m (in_m + out_m)``; in (0, 1].
        budget_params: keep at most this many LoRA parameters (slack below one rank of any module left out).
        budget_ranks: keep exactly this total rank (the largest singular values of the whole adapter).
        min_rank: every module keeps at least this many directions (default 0: modules may be dropped).
        adapter_name: which adapter of a model to compress.
        overwrite: replace an existing ``out_dir``.
        plot: draw ``compression.png`` (skipped silently when matplotlib is missing).

    Returns:
        The :class:`~fimlora.compress.report.CompressionReport` (also in ``compression.json``).

    Raises:
        UsageError: a bad budget, an output that exists, a directory that is not an adapter, an adapter
            compression cannot represent exactly (DoRA and other variants, ``lora_bias``, other PEFT types,
            inits that rewrite the base weights), or a budget below what ``min_rank`` needs.
    """
    check_budget(fraction, budget_params, budget_ranks, min_rank)
    output = None
    if out_dir is not None:
        out = Path(out_dir)
        empty = out.is_dir() and not any(out.iterdir())
        output = OutputDir(out, overwrite=overwrite or empty)
    with contextlib.ExitStack() as stack:
        if isinstance(adapter_dir_or_model, nn.Module):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            adapter_dir_or_model.save_pretrained(  # type: ignore[operator]
                tmp, selected_adapters=[adapter_name]
            )
            source_dir = tmp / adapter_name if adapter_name != "default" else tmp
            label = "<model>"
            run_dir = None
        else:
            if not Path(adapter_dir_or_model).is_dir():
                raise UsageError(f"{adapter_dir_or_model} is not a directory; pass an adapter directory")
            source_dir = resolve_adapter_dir(adapter_dir_or_model)
            label = str(adapter_dir_or_model)
            run_dir = source_dir.parent if source_dir != Path(adapter_dir_or_model) else None
        try:
            check_compressible_config(source_dir)
            start = time.perf_counter()
            source = read_adapter_factors(source_dir)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(" ".join(str(e).split())) from None
        report, factors = _compress(
            source, fraction, budget_params, budget_ranks, min_rank, label, start, out_dir
        )
        if output is None:
            return report
        with output as staging:
            adapter_out = staging / "adapter"
            adapter_out.mkdir()
            try:
                write_lora_adapter(adapter_out, source, factors)
            except ValueError as e:
                raise UsageError(str(e)) from None
            if run_dir is not None and (run_dir / "task.json").is_file():
                shutil.copy2(run_dir / "task.json", staging / "task.json")
            report.save_json(staging / "compression.json")
            (staging / "compression.md").write_text(report.format_table() + "\n")
            if plot:
                with contextlib.suppress(ImportError):
                    plot_compression(report, staging / "compression.png", title=f"compress {label}")
            config = {"source": label, "adapter_name": adapter_name, **report.budget}
            write_provenance(staging, config, extra={"kind": "compress"})
    return report


def _compress(
    source: AdapterFactors,
    fraction: float | None,
    budget_params: int | None,
    budget_ranks: int | None,
    min_rank: int,
    label: str,
    start: float,
    out_dir: str | os.PathLike[str] | None,
) -> tuple[CompressionReport, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Spectra, the global choice and the new factors. Two passes over the modules, so that only one
    module's float64 decomposition is alive at a time: the first keeps singular values only, the second
    decomposes again the modules that keep something and builds their factors."""
    singular: dict[str, list[float]] = {}
    costs: dict[str, int] = {}
    for name, m in source.modules.items():
        singular[name] = factor_svd(m.a, m.b, m.scale).s.tolist()
        costs[name] = sum(m.shape)
    source_params = sum(m.rank * costs[n] for n, m in source.modules.items())
    budget: dict[str, Any] = {"min_rank": min_rank}
    if budget_ranks is not None:
        budget.update(budget_ranks=budget_ranks, ranks=budget_ranks)
    else:
        params = budget_params if budget_params is not None else math.floor(float(fraction) * source_params)  # type: ignore[arg-type]
        budget.update({"fraction": fraction} if fraction is not None else {"budget_params": budget_params})
        budget["params"] = params
    try:
        ranks = select_directions(
            singular,
            costs,
            budget_params=budget.get("params") if budget_ranks is None else None,
            budget_ranks=budget_ranks,
            min_rank=min_rank,
        )
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    modules: dict[str, ModuleCompression] = {}
    for name, m in source.modules.items():
        k = ranks[name]
        if k > 0:
            alpha = module_alpha(m, k, use_rslora=source.use_rslora)
            dtype = m.a.dtype if m.a.is_floating_point() else torch.float32
            spectrum = factor_svd(m.a, m.b, m.scale)
            a, b = balanced_factors(
                spectrum, k, module_scale(alpha, k, use_rslora=source.use_rslora), dtype=dtype
            )
            factors[name] = (a, b, alpha)
        kept, total = kept_energy(singular[name], k)
        modules[name] = ModuleCompression(
            in_features=m.shape[0],
            out_features=m.shape[1],
            source_rank=m.rank,
            rank=k,
            energy=total,
            kept_energy=kept,
            singular_values=singular[name],
        )
    report = CompressionReport(
        modules=modules,
        budget=budget,
        source={"adapter": label, "peft_type": source.peft_type, "use_rslora": source.use_rslora},
        seconds=time.perf_counter() - start,
        out_dir=str(out_dir) if out_dir is not None else None,
    )
    return report, factors
