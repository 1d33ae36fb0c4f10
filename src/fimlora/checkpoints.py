"""Resumable training checkpoints and a graceful stop on SIGINT/SIGTERM.

A checkpoint holds the trainable tensors (LoRA and e.g. a classifier head), the LoRA layout (ranks, alphas
and patterns: a training-time method may have resized modules), optimizer, scheduler, RNG states, step,
the method's ``state_dict`` and the loss history. Each is written to a temporary directory and renamed
into place, then a ``latest`` pointer is replaced atomically, so a kill at any instant leaves the last
complete checkpoint.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.errors import UsageError
from fimlora.io import atomic_write_text, staged_directory
from fimlora.peft_glue import lora_layout

__all__ = [
    "CHECKPOINT_FORMAT",
    "graceful_stop",
    "latest_checkpoint",
    "load_checkpoint",
    "load_trainable",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "fimlora.checkpoint/1"
_LATEST = "latest"


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None.

    Follows the ``latest`` pointer; if it is missing or stale, takes the highest ``step-*`` directory
    that holds a ``state.pt`` (a directory only gets its final name once complete).
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    with contextlib.suppress(OSError):
        candidate = root / (root / _LATEST).read_text().strip()
        if (candidate / "state.pt").is_file():
            return candidate
    steps = sorted((p for p in root.glob("step-*") if (p / "state.pt").is_file()), reverse=True)
    return steps[0] if steps else None


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA) and Python RNG states, for a checkpoint."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def save_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, **state: Any) -> Path:
    """Write ``step-<step>/state.pt`` atomically, point ``latest`` at it and delete older checkpoints.

    Args:
        checkpoint_dir: the run's checkpoint directory.
        step: optimizer steps done.
        model: the PEFT model (its trainable tensors and LoRA layout are saved).
        **state: everything else to restore (optimizer, scheduler, method, rng, losses, evals...).

    Returns:
        The checkpoint directory.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "lora_layout": lora_layout(model),
        **state,
    }
    final = checkpoint_dir / f"step-{step:08d}"
    with staged_directory(final) as staging, open(staging / "state.pt", "wb") as f:
        torch.save(record, f)
    atomic_write_text(checkpoint_dir / _LATEST, final.name)
    for old in checkpoint_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        UsageError: the file is not a fimlora checkpoint.
    """
    # Our own files, which also hold Python RNG state and method state: not restricted to weights.
    state: dict[str, Any] = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a fimlora checkpoint; remove it or start without --resume")
    return state


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trainable tensors into ``model`` (give it the checkpoint's LoRA layout first,
    :func:`fimlora.peft_glue.restore_lora_layout`).

    Raises:
        UsageError: the checkpoint holds a parameter the model does not have.
    """
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(
            f"the checkpoint does not match this model (no parameter {missing[0]}); start over with --overwrite"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))


@contextlib.contextmanager
def graceful_stop() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step; a second Ctrl-C aborts."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
