"""A plain, resumable training loop driven by the rank-method protocol.

The loop (:func:`train_adapter`) is deliberately ordinary: AdamW, linear warmup then linear decay,
gradient clipping, a fixed data order, a per-step loss curve, periodic evaluation. It drives a
:class:`~fimlora.methods.base.RankMethod` exactly as the protocol says::

    prepare -> param_groups -> (penalty -> backward -> step -> on_step_end)* -> finalize

What makes it reproducible and resumable:

* Data order: epoch ``e`` visits the examples in ``randperm(n)`` drawn from a ``torch.Generator``
  seeded with ``(seed, e)``, so the batch of any step is a pure function of (seed, step). Calibration
  methods see the first T batches of that order, i.e. the first T training batches.
* Checkpoints every ``checkpoint_every`` steps (:mod:`fimlora.checkpoints`): a kill at any instant
  leaves the last complete one; ``resume=True`` continues from it, and on CPU the final adapter equals an
  uninterrupted run's.
* SIGINT/SIGTERM finish the current step, write a checkpoint and raise :class:`TrainingInterrupted`.
  A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.checkpoints import (
    graceful_stop,
    latest_checkpoint,
    load_checkpoint,
    load_trainable,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from fimlora.errors import UsageError
from fimlora.methods.base import RankMethod
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes, restore_lora_layout
from fimlora.rankmap import RankMap

__all__ = [
    "BatchPlan",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "linear_schedule",
    "lora_parameter_count",
    "to_device",
    "train_adapter",
]


@dataclass
class TrainConfig:
    """Optimisation settings. Each field's docstring is its --help text."""

    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""

    batch_size: int = 16
    """Examples per optimizer step."""

    eval_batch_size: int = 64
    """Examples per evaluation forward pass."""

    lr: float = 5e-4
    """Peak learning rate of AdamW (reached after warmup, then decayed linearly to 0)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    warmup_ratio: float = 0.06
    """Fraction of the steps spent warming the learning rate up linearly from 0."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (none: no clipping)."""

    eval_every: int | None = None
    """Evaluate every N steps (none: only at the end)."""

    checkpoint_every: int | None = 50
    """Write a resumable checkpoint every N steps (none: never)."""

    keep_checkpoints: bool = False
    """Keep the last checkpoint after a successful run (it holds optimizer state; default: delete it)."""

    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"`{name}` must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"`{name}` must be a positive integer or none, got {value!r}")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | None):
                raise UsageError(f"`{name}` must be a number, got {value!r}")
            if name != "max_grad_norm" and value is None:
                raise UsageError(f"`{name}` must be a number, got None")
        if not self.lr > 0:
            raise UsageError(f"`lr` must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; ``--resume`` continues it."""


@dataclass
class TrainResult:
    """What a finished training run returns."""

    model: nn.Module
    """The finalized PEFT model (plain LoRA; ``save_pretrained`` writes a standard adapter)."""
    rank_map: RankMap
    """Final rank of every LoRA module."""
    losses: list[tuple[int, float]]
    """``(step, training loss)`` after every optimizer step (steps count from 1)."""
    evals: list[tuple[int, dict[str, float]]]
    """``(step, metrics)`` of each periodic and the final evaluation."""
    steps: int
    """Optimizer steps taken in total (over all resumed segments)."""
    train_seconds: float
    """Wall time of the optimisation loop (this segment only when resumed)."""
    prepare_seconds: float
    """Wall time of ``method.prepare`` (adapter creation + calibration for fim)."""
    trainable_params: int
    """Parameters that were trained (LoRA factors plus e.g. a classifier head)."""
    lora_params: int
    """LoRA parameters only: sum of r_i * (in_i + out_i)."""
    resumed_from: int | None = None
    """Step of the checkpoint this run resumed from, if any."""


# ---- data order ---------------------------------------------------------------------------------------


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class BatchPlan:
    """The examples of every step, a pure function of (seed, step).

    Epoch ``e`` visits the ``n`` examples in ``randperm(n)`` drawn from a generator seeded with
    ``(seed, e)``; step ``s`` takes the next ``batch_size`` of them (the last batch of an epoch may be short).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = math.ceil(n / batch_size)
        self._cache: dict[int, list[int]] = {}

    def indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: _epoch_order(self.n, self.seed, epoch)}
        return self._cache[epoch][i * self.batch_size : (i + 1) * self.batch_size]

    def batches(
        self,
        rows: Sequence[dict[str, Any]],
        collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
        steps: int,
        device: torch.device | str,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The collated batches of steps ``0 .. steps-1`` on ``device``, lazily (calibration's batches)."""
        for step in range(steps):
            yield to_device(collate([rows[i] for i in self.indices(step)]), torch.device(device))


# ---- the loop -----------------------------------------------------------------------------------------


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor of step ``s``: linear warmup over ``warmup`` steps to 1, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch moved to ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lora_parameter_count(model: nn.Module) -> int:
    """sum_i r_i * (in_i + out_i) over the LoRA modules of the default adapter."""
    shapes = module_shapes(lora_modules(model))
    return sum(r * sum(shapes[n]) for n, r in current_ranks(model).items())


def train_adapter(
    base_model: nn.Module,
    lora_config: Any,
    method: RankMethod,
    train_rows: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
    config: TrainConfig,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Wrap ``base_model`` with ``method``, train it and return the finalized adapter.

    Args:
        base_model: the model to adapt (moved to ``device``).
        lora_config: ``peft.LoraConfig`` every method starts from.
        method: a rank method (``fimlora.methods.get_method(name, ...)``).
        train_rows: encoded examples (see :func:`fimlora.tasks.encode_examples`).
        collate: rows -> a batch dict of ``(batch, seq)`` tensors with ``labels``.
        config: optimisation settings.
        seed: seeds the LoRA init, the data order and dropout. Seed the global RNG with it before
            creating ``base_model`` too, so that a new head is initialised identically across methods.
        device: where to train (default: the model's device).
        eval_fn: ``eval_fn(model) -> metrics``, called every ``eval_every`` steps and at the end.
        checkpoint_dir: where checkpoints go (none: no checkpoints, no resume).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
        loss_fn: ``loss_fn(model, batch) -> loss`` for models whose output has no ``.loss``.
        desc: progress-bar label.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint of the last finished step was written.
    """
    if not train_rows:
        raise UsageError("no training examples; check --data")
    dev = torch.device(device) if device is not None else next(base_model.parameters()).device
    base_model.to(dev)
    plan = BatchPlan(len(train_rows), config.batch_size, seed)
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        return collate([train_rows[i] for i in plan.indices(step)])

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = method.prepare(
        base_model,
        lora_config,
        calibration_batches=plan.batches(train_rows, collate, total_steps, dev),  # in training order
        total_steps=total_steps,
        loss_fn=loss_fn,
    )
    model.to(dev)
    prepare_seconds = time.perf_counter() - t0

    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = None
    if resume and ckpt_root is not None:
        found = latest_checkpoint(ckpt_root)
        state = load_checkpoint(found) if found is not None else None
    if state is not None:
        method.load_state_dict(state["method"])
        restore_lora_layout(model, state["lora_layout"])
        model.to(dev)
        load_trainable(model, state["trainable"])

    optimizer = torch.optim.AdamW(method.param_groups(model, lr=config.lr, weight_decay=config.weight_decay))
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total_steps))
    losses: list[tuple[int, float]] = []
    evals: list[tuple[int, dict[str, float]]] = []
    start = 0
    torch.manual_seed(seed + 1)  # dropout stream, identical for every method
    random.seed(seed)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        losses, evals, start = list(state["losses"]), list(state["evals"]), int(state["step"])

    def checkpoint(root: Path, done: int) -> Path:
        return save_checkpoint(
            root,
            done,
            model,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            method=method.state_dict(),
            rng=rng_state(),
            losses=losses,
            evals=evals,
        )

    model.train()
    t1 = time.perf_counter()
    bar = _progress(config.progress, total_steps, start, desc)
    with graceful_stop() as stop:
        for step in range(start, total_steps):
            batch = to_device(batch_at(step), dev)
            loss = _loss(model, batch, loss_fn)
            penalty = method.penalty(model)
            (loss if penalty is None else loss + penalty).backward()
            if config.max_grad_norm is not None:
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.on_step_end(model, step, optimizer)
            done = step + 1
            losses.append((done, float(loss.detach())))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", refresh=False)
            if (
                eval_fn is not None
                and config.eval_every
                and done % config.eval_every == 0
                and done < total_steps
            ):
                evals.append((done, eval_fn(model)))
                model.train()
            if stop["signal"] is not None:
                if ckpt_root is None:
                    raise TrainingInterrupted(
                        f"stopped at step {done}/{total_steps}; no checkpoint directory, nothing saved"
                    )
                path = checkpoint(ckpt_root, done)
                raise TrainingInterrupted(
                    f"stopped at step {done}/{total_steps}; checkpoint in {path}; rerun with --resume to continue"
                )
            if (
                ckpt_root is not None
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
                and done < total_steps
            ):
                checkpoint(ckpt_root, done)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t1
    model, rank_map = method.finalize(model)
    if eval_fn is not None:
        evals.append((total_steps, eval_fn(model)))
    if ckpt_root is not None and not config.keep_checkpoints:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    return TrainResult(
        model=model,
        rank_map=rank_map,
        losses=losses,
        evals=evals,
        steps=total_steps,
        train_seconds=train_seconds,
        prepare_seconds=prepare_seconds,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        lora_params=lora_parameter_count(model),
        resumed_from=int(state["step"]) if state is not None else None,
    )


def _loss(
    model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None
) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    loss = model(**batch).loss
    if loss is None:
        raise UsageError("the model returned no loss; the batches need `labels` (or pass loss_fn)")
    return loss


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
