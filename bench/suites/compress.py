"""Compression after training (issue 14), as an option of a classification run: ``compress_fractions``.

After a run's final evaluation its trained adapter is compressed with :func:`fimlora.compress_adapter` to
each fraction of its own LoRA parameters, every compressed adapter is loaded by vanilla PEFT onto the
trained base (classifier head included, unchanged) and evaluated on the same eval split. The record's
``extra.compress`` holds, per fraction, the metrics and what the compression kept::

    {"0.5": {"accuracy": ..., "lora_params": ..., "source_lora_params": ..., "kept_energy_fraction": ...,
             "total_rank": ..., "modules_dropped": ..., "rank_map": {...}, "compress_seconds": ...}, ...}

so that a trained adapter compressed to 50 % / 25 % can be compared at equal parameters with training at
those budgets directly (uniform ``r8`` compressed to 0.5 against ``r4``). The adapter goes through the
same files a user gets (saved, compressed, reloaded), not an in-memory shortcut.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_compress_fractions", "compress_evaluations"]


def check_compress_fractions(value: Any) -> tuple[float, ...]:
    """The ``compress_fractions`` override as a tuple of floats in (0, 1] (empty: no compression).

    Raises:
        ValueError: not a list of numbers in (0, 1], or a fraction listed twice.
    """
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"`compress_fractions` must be a list of numbers in (0, 1], got {value!r}")
    out = []
    for f in value:
        if isinstance(f, bool) or not isinstance(f, int | float) or not (math.isfinite(f) and 0 < f <= 1):
            raise ValueError(f"`compress_fractions` must hold numbers in (0, 1], got {f!r}")
        out.append(float(f))
    if len(set(out)) != len(out):
        raise ValueError(f"`compress_fractions` lists a fraction twice: {list(value)}")
    return tuple(out)


def compress_evaluations(
    model: Any,
    fractions: Sequence[float],
    eval_fn: Callable[[Any], dict[str, float]] | None,
    device: Any,
) -> dict[str, dict[str, Any]]:
    """Compress ``model``'s adapter to each fraction of its LoRA parameters and evaluate each copy.

    Args:
        model: The trained PEFT model (left unchanged: the copies are built on a deep copy of its base).
        fractions: Fractions of the adapter's LoRA parameters, each in (0, 1].
        eval_fn: The run's evaluation (model -> metrics); None: record the compression only.
        device: Where the evaluated copies run.

    Returns:
        ``{str(fraction): {**metrics, "lora_params", "source_lora_params", "param_fraction",
        "kept_energy_fraction", "total_rank", "modules_dropped", "rank_map", "compress_seconds"}}``.
    """
    from peft import PeftModel

    from fimlora import compress_adapter

    results: dict[str, dict[str, Any]] = {}
    if not fractions:
        return results
    with tempfile.TemporaryDirectory(prefix="fimlora-compress-") as tmp:
        source = Path(tmp) / "source"
        model.save_pretrained(source)
        base = copy.deepcopy(model).unload()  # the trained base: modules_to_save copies in place
        for fraction in fractions:
            report = compress_adapter(source, Path(tmp) / f"f{fraction}", fraction=fraction, plot=False)
            summary = report.summary()
            entry: dict[str, Any] = {}
            if eval_fn is not None:
                compressed = PeftModel.from_pretrained(copy.deepcopy(base), str(report.adapter_dir)).to(
                    device
                )
                entry.update(
                    {k: float(v) for k, v in eval_fn(compressed).items() if isinstance(v, int | float)}
                )
                del compressed
            entry.update(
                lora_params=report.lora_params,
                source_lora_params=report.source_lora_params,
                param_fraction=summary["param_fraction"],
                kept_energy_fraction=report.kept_energy_fraction,
                total_rank=summary["total_rank"],
                modules_dropped=len(summary["modules_dropped"]),
                rank_map=report.ranks,
                compress_seconds=report.seconds,
            )
            results[str(fraction)] = entry
    return results
