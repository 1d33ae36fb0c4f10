"""Run records with provenance, so every published number can be traced to how it was made.

A record is a plain JSON-serialisable dict: the spec, the metrics, cost figures (trainable parameters,
calibration/training seconds, peak memory) and provenance (UTC time, Python, platform, package versions,
git commit and whether the tree was dirty). Versions and the commit come from :mod:`fimlora.io`
(``package_versions``, ``git_state``): read from package metadata and git, torch is never imported, so
records can be made and read on machines without it.

A commit that could not be read is ``None`` in records written since fimlora.io; older records say
``"unknown"``. :func:`commit_label` reads both alike.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fimlora.io import git_state, package_versions

from .experiment import RunSpec

__all__ = [
    "RECORD_SCHEMA_VERSION",
    "REPO_ROOT",
    "UNKNOWN_COMMIT",
    "commit_label",
    "make_record",
    "record_provenance",
]

# Bump when a field changes meaning; aggregation can then refuse or convert old records.
RECORD_SCHEMA_VERSION = 1

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout ``bench`` runs from; records name its commit (``$FIMLORA_GIT_COMMIT`` wins, see
:func:`fimlora.io.git_state`)."""

UNKNOWN_COMMIT = "unknown"
"""How reports print a commit that could not be read (``None``, or ``"unknown"`` in older records)."""

_STATUSES = ("ok", "failed")


def commit_label(git: Mapping[str, Any] | None, *, short: bool = False) -> str:
    """``sha`` or ``sha+dirty`` of a provenance ``git`` block; :data:`UNKNOWN_COMMIT` when there is none.

    Args:
        git: ``{"commit": sha | None | "unknown", "dirty": bool | None}`` (a record's ``provenance.git``).
        short: Keep the first 12 characters of the sha.
    """
    git = git or {}
    commit = str(git.get("commit") or UNKNOWN_COMMIT)
    if short:
        commit = commit[:12]
    return f"{commit}+dirty" if git.get("dirty") else commit


def record_provenance() -> dict[str, Any]:
    """The ``provenance`` of a record: ``timestamp`` (UTC), ``python``, ``platform``, ``versions``, ``git``."""
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_state(REPO_ROOT),
    }


def make_record(
    spec: RunSpec,
    metrics: Mapping[str, float],
    *,
    trainable_params: int,
    calibration_seconds: float,
    train_seconds: float,
    peak_memory_bytes: int | None,
    device: str,
    extra: Mapping[str, Any] | None = None,
    status: str = "ok",
    error: str | None = None,
) -> dict[str, Any]:
    """Build the record of one run.

    Args:
        spec: The run.
        metrics: Evaluation metrics, e.g. ``{"accuracy": 88.6}``; numbers only.
        trainable_params: Trainable LoRA parameters after rank allocation (the budget actually spent).
        calibration_seconds: Wall time of score estimation/allocation (0 for ``uniform``).
        train_seconds: Wall time of training.
        peak_memory_bytes: Peak accelerator memory, ``None`` if not measured.
        device: Human-readable device, e.g. ``"cuda:NVIDIA H100"`` or ``"cpu"``.
        extra: Any further JSON-serialisable details (rank map summary, wall time...).
        status: ``"ok"`` or ``"failed"``; only ``"ok"`` counts as finished.
        error: Traceback text of a failed run.

    Returns:
        A JSON-serialisable dict with ``run_id``, ``status``, ``spec``, ``metrics``, the cost fields,
        ``extra``, ``error`` and ``provenance``.

    Raises:
        ValueError: On an unknown status or a negative/non-numeric cost, naming the argument.
    """
    if status not in _STATUSES:
        raise ValueError(f"`status` must be one of {_STATUSES}, got {status!r}")
    _check_metrics(metrics)
    if not isinstance(trainable_params, int) or isinstance(trainable_params, bool) or trainable_params < 0:
        raise ValueError(f"`trainable_params` must be an int >= 0, got {trainable_params!r}")
    for name, seconds in (("calibration_seconds", calibration_seconds), ("train_seconds", train_seconds)):
        if not isinstance(seconds, int | float) or not seconds >= 0:
            raise ValueError(f"`{name}` must be a number >= 0, got {seconds!r}")
    if peak_memory_bytes is not None and (not isinstance(peak_memory_bytes, int) or peak_memory_bytes < 0):
        raise ValueError(f"`peak_memory_bytes` must be an int >= 0 or None, got {peak_memory_bytes!r}")
    return {
        "schema_version": RECORD_SCHEMA_VERSION,
        "run_id": spec.run_id,
        "status": status,
        "spec": spec.to_dict(),
        "metrics": {key: float(value) for key, value in metrics.items()},
        "trainable_params": trainable_params,
        "calibration_seconds": float(calibration_seconds),
        "train_seconds": float(train_seconds),
        "peak_memory_bytes": peak_memory_bytes,
        "device": device,
        "extra": dict(extra or {}),
        "error": error,
        "provenance": record_provenance(),
    }


def _check_metrics(metrics: Mapping[str, float]) -> None:
    if not isinstance(metrics, Mapping):
        raise ValueError(f"`metrics` must be a mapping, got {type(metrics).__name__}")
    for key, value in metrics.items():
        if not isinstance(key, str) or not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"`metrics` must map names to numbers, got {key!r}: {value!r}")
        # A NaN mean would silently poison every aggregate it enters; fail at the source instead.
        if not math.isfinite(value):
            raise ValueError(f"`metrics.{key}` must be finite, got {value!r}")
