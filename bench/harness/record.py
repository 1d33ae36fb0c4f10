"""Run records with provenance, so every published number can be traced to how it was made.

A record is a plain JSON-serialisable dict: the spec, the metrics, cost figures (trainable parameters,
calibration/training seconds, peak memory) and provenance (UTC time, Python, platform, package versions,
git commit and whether the tree was dirty). Versions are read from package metadata; torch is never
imported, so records can be made and read on machines without it.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .experiment import RunSpec

__all__ = ["RECORD_SCHEMA_VERSION", "git_info", "make_record", "package_versions"]

# Bump when a field changes meaning; aggregation can then refuse or convert old records.
RECORD_SCHEMA_VERSION = 1

_TRACKED_PACKAGES = ("fimlora", "torch", "transformers", "peft", "accelerate", "numpy")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_STATUSES = ("ok", "failed")


def package_versions(names: tuple[str, ...] = _TRACKED_PACKAGES) -> dict[str, str | None]:
    """Return installed versions from package metadata (``None`` when not installed); imports nothing."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_info(repo: str | Path = _REPO_ROOT) -> dict[str, Any]:
    """Return ``{"commit": sha | "unknown", "dirty": bool | None}`` for the repository at ``repo``.

    Tolerates a missing git binary, a directory that is not a repository and a hung git (timeout): all
    give ``"unknown"``/``None`` rather than an exception, since provenance must never abort a run. A copy
    of the tree sent to another machine says where it came from with ``$FIMLORA_GIT_COMMIT`` and
    ``$FIMLORA_GIT_DIRTY`` ("1"/"0"), which ``scripts/remote_prepare.sh`` records; when set, they win over
    git (such a machine may hold a stale ``.git`` of its own: seen on a lent GPU machine).
    """
    env_commit = os.environ.get("FIMLORA_GIT_COMMIT")
    if env_commit:
        env_dirty = os.environ.get("FIMLORA_GIT_DIRTY")
        return {"commit": env_commit, "dirty": None if env_dirty not in ("0", "1") else env_dirty == "1"}
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": None}
    status = _git(repo, "status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _git(repo: str | Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


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
        "provenance": _provenance(),
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


def _provenance() -> dict[str, Any]:
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_info(),
    }
