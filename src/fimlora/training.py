"""A plain, resumable training loop driven by the rank-method protocol, and the train/allocate recipes.

The loop (:func:`train_adapter`) is deliberately ordinary: AdamW, linear warmup then linear decay,
gradient clipping, a fixed data order, a per-step loss curve, periodic evaluation. It drives a
:class:`~fimlora.methods.base.RankMethod` exactly as the protocol says::

    prepare -> param_groups -> (penalty -> backward -> step -> on_step_end)* -> finalize

What makes it reproducible and resumable:

* Data order: epoch ``e`` visits the examples in ``randperm(n)`` drawn from a ``torch.Generator``
  seeded with ``(seed, e)``, so the batch of any step is a pure function of (seed, step). Calibration
  methods see the first T batches of that order, i.e. the first T training batches.
* Checkpoints every ``checkpoint_every`` steps hold the trainable tensors (LoRA and e.g. a classifier
  head), the LoRA ranks and alphas, optimizer, scheduler, RNG states, step, method ``state_dict`` and the
  loss history. Each is written to a temporary directory and renamed into place (``os.replace``), then a
  ``latest`` pointer is replaced atomically, so a kill at any instant leaves the last complete
  checkpoint. ``resume=True`` continues from it; on CPU the final adapter equals an uninterrupted run's.
* SIGINT/SIGTERM finish the current step, write a checkpoint and raise :class:`TrainingInterrupted`.
  A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.methods.base import RankMethod, get_method
from fimlora.rankmap import RankMap
from fimlora.run_config import RunConfig, UsageError

__all__ = [
    "PreparedRun",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "allocate",
    "build_lora_config",
    "finetune",
    "latest_checkpoint",
    "lora_parameter_count",
    "make_method",
    "prepare_run",
    "save_training_outputs",
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


class _BatchPlan:
    """The examples of every step, a pure function of (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = math.ceil(n / batch_size)
        self._cache: dict[int, list[int]] = {}

    def indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: _epoch_order(self.n, self.seed, epoch)}
        return self._cache[epoch][i * self.batch_size : (i + 1) * self.batch_size]


# ---- checkpoints --------------------------------------------------------------------------------------

_LATEST = "latest"


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory, or None.

    Follows the ``latest`` pointer; if it is missing or stale, takes the highest ``step-*`` directory
    that holds a ``state.pt`` (a directory only gets its final name once complete).
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    pointer = root / _LATEST
    with contextlib.suppress(OSError):
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.pt").is_file():
            return candidate
    steps = sorted((p for p in root.glob("step-*") if (p / "state.pt").is_file()), reverse=True)
    return steps[0] if steps else None


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _lora_layout(model: nn.Module) -> dict[str, Any]:
    from fimlora.peft_glue import lora_config, lora_modules

    mods = lora_modules(model)
    cfg = lora_config(model)
    return {
        "ranks": {n: int(m.r["default"]) for n, m in mods.items()},
        "alphas": {n: m.lora_alpha["default"] for n, m in mods.items()},
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
    }


def _save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    method: RankMethod,
    losses: list[tuple[int, float]],
    evals: list[tuple[int, dict[str, float]]],
) -> Path:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "fimlora.checkpoint/1",
        "step": step,
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "lora_layout": _lora_layout(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "method": method.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
        },
        "losses": losses,
        "evals": evals,
    }
    final = checkpoint_dir / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(dir=checkpoint_dir, prefix=f".tmp-step-{step:08d}-"))
    try:
        with open(staging / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write_text(checkpoint_dir / _LATEST, final.name)
    for old in checkpoint_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path) -> dict[str, Any]:
    # Our own files, which also hold Python RNG state and method state: not restricted to weights.
    state: dict[str, Any] = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state.get("format") != "fimlora.checkpoint/1":
        raise UsageError(f"{path} is not a fimlora checkpoint; remove it or start without --resume")
    return state


def _restore_layout(model: nn.Module, layout: dict[str, Any]) -> None:
    """Give the model the checkpoint's LoRA ranks (a method may have resized modules during training)."""
    from fimlora.peft_glue import lora_config, resize_lora_modules

    current = _lora_layout(model)
    changed = {n: r for n, r in layout["ranks"].items() if current["ranks"].get(n) != r}
    if changed:
        resize_lora_modules(model, changed, alphas={n: layout["alphas"][n] for n in changed})
    cfg = lora_config(model)
    cfg.rank_pattern = dict(layout["rank_pattern"])
    cfg.alpha_pattern = dict(layout["alpha_pattern"])


def _load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(
            f"the checkpoint does not match this model (no parameter {missing[0]}); start over with --overwrite"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))


# ---- signals ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _graceful_stop() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step."""
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


# ---- the loop -----------------------------------------------------------------------------------------


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lora_parameter_count(model: nn.Module) -> int:
    """sum_i r_i * (in_i + out_i) over the LoRA modules of the default adapter."""
    from fimlora.peft_glue import lora_modules, module_shapes

    mods = lora_modules(model)
    shapes = module_shapes(mods)
    return sum(int(m.r["default"]) * sum(shapes[n]) for n, m in mods.items())


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
    plan = _BatchPlan(len(train_rows), config.batch_size, seed)
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        return collate([train_rows[i] for i in plan.indices(step)])

    def calibration_batches() -> Iterator[dict[str, torch.Tensor]]:
        for step in range(total_steps):  # the first T training batches, in training order
            yield _to_device(batch_at(step), dev)

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = method.prepare(
        base_model,
        lora_config,
        calibration_batches=calibration_batches(),
        total_steps=total_steps,
        loss_fn=loss_fn,
    )
    model.to(dev)
    prepare_seconds = time.perf_counter() - t0

    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = None
    if resume and ckpt_root is not None:
        found = latest_checkpoint(ckpt_root)
        state = _load_checkpoint(found) if found is not None else None
    if state is not None:
        method.load_state_dict(state["method"])
        _restore_layout(model, state["lora_layout"])
        model.to(dev)
        _load_trainable(model, state["trainable"])

    optimizer = torch.optim.AdamW(method.param_groups(model, lr=config.lr, weight_decay=config.weight_decay))
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup, total_steps))
    losses: list[tuple[int, float]] = []
    evals: list[tuple[int, dict[str, float]]] = []
    start = 0
    torch.manual_seed(seed + 1)  # dropout stream, identical for every method
    random.seed(seed)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        losses, evals, start = list(state["losses"]), list(state["evals"]), int(state["step"])

    model.train()
    t1 = time.perf_counter()
    bar = _progress(config.progress, total_steps, start, desc)
    with _graceful_stop() as stop:
        for step in range(start, total_steps):
            batch = _to_device(batch_at(step), dev)
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
                path = _save_checkpoint(ckpt_root, done, model, optimizer, scheduler, method, losses, evals)
                raise TrainingInterrupted(
                    f"stopped at step {done}/{total_steps}; checkpoint in {path}; rerun with --resume to continue"
                )
            if (
                ckpt_root is not None
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
                and done < total_steps
            ):
                _save_checkpoint(ckpt_root, done, model, optimizer, scheduler, method, losses, evals)
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


# ---- recipes: what `fimlora train` / `fimlora allocate` run -------------------------------------------


def build_lora_config(run: RunConfig) -> Any:
    """The ``peft.LoraConfig`` of a run (task type SEQ_CLS/CAUSAL_LM, so PEFT handles the head)."""
    from peft import LoraConfig

    task_type = "SEQ_CLS" if run.task == "classification" else "CAUSAL_LM"
    targets = run.lora.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t for t in targets.replace(",", " ").split() if t]
    return LoraConfig(
        r=run.lora.r,
        lora_alpha=run.lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int, accepts float
        lora_dropout=run.lora.dropout,
        target_modules=targets,
        use_rslora=run.lora.use_rslora,
        task_type=task_type,
    )


@dataclass
class PreparedRun:
    """Everything a run needs, validated and loaded; nothing written yet."""

    run: RunConfig
    model: nn.Module
    tokenizer: Any
    data: Any
    """:class:`fimlora.tasks.TaskData`."""
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    lora_config: Any
    train_config: TrainConfig
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)

    def make_method(self) -> RankMethod:
        """A fresh instance of the run's method (``fim`` gets the run's FimConfig)."""
        return make_method(self.run)

    def eval_fn(self) -> Callable[[nn.Module], dict[str, float]] | None:
        """Evaluation on the run's eval split: accuracy (classification) or completion loss (sft)."""
        from fimlora.tasks import collator_for, evaluate_classification, evaluate_lm_loss

        if not self.eval_rows:
            return None
        collate = collator_for(self.run.task, self.tokenizer)
        rows, bs, progress = self.eval_rows, self.train_config.eval_batch_size, self.train_config.progress
        if self.run.task == "classification":
            return lambda model: evaluate_classification(
                model, rows, collate, batch_size=bs, progress=progress
            )
        return lambda model: evaluate_lm_loss(model, rows, collate, batch_size=bs, progress=progress)


def fim_config_of(run: RunConfig) -> Any:
    """The run's :class:`fimlora.FimConfig` (errors name the bad field)."""
    from fimlora.config import FimConfig

    try:
        # The calibration bar follows the run's --progress unless the fim section sets it.
        return FimConfig(**{"show_progress": run.train.get("progress", True), **run.fim})
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid FIM option: {e}") from None


def make_method(run: RunConfig) -> RankMethod:
    """Instantiate the run's method by name from the registry."""
    from fimlora.methods.base import available_methods

    names = available_methods()
    if run.method not in names:
        raise UsageError(f"unknown method {run.method!r}; choose one of {', '.join(names)}")
    options = dict(run.method_options)
    if run.method == "fim":
        options.setdefault("fim_config", fim_config_of(run))
    try:
        return get_method(run.method, **options)
    except TypeError as e:
        raise UsageError(f"invalid options for method {run.method!r}: {e}") from None


def prepare_run(run: RunConfig, *, need_train: bool = True) -> PreparedRun:
    """Validate and load a run's data, model and tokenizer; encode the examples. Writes nothing.

    Raises:
        UsageError / DataError: anything the user must fix, before any output is written.
    """
    from fimlora.models import load_model_and_tokenizer, resolve_device
    from fimlora.tasks import encode_examples, load_task_data

    try:
        train_config = TrainConfig(**run.train)
    except TypeError as e:
        raise UsageError(f"invalid training option: {e}") from None
    if run.method == "fim":
        fim_config_of(run)
    device = resolve_device(run.device)
    data = load_task_data(run.task, run.data, seed=run.seed, need_train=need_train)
    num_labels = len(data.label_names) if data.label_names else None
    model, tokenizer = load_model_and_tokenizer(
        run.model,
        task=run.task,
        num_labels=num_labels,
        label_names=data.label_names,
        gguf_file=run.gguf_file,
        seed=run.seed,
    )
    train_rows = encode_examples(run.task, data.train, tokenizer, run.data.max_length)
    eval_rows = encode_examples(run.task, data.eval, tokenizer, run.data.max_length)
    return PreparedRun(
        run=run,
        model=model,
        tokenizer=tokenizer,
        data=data,
        train_rows=train_rows,
        eval_rows=eval_rows,
        lora_config=build_lora_config(run),
        train_config=train_config,
        device=device,
    )


def save_training_outputs(out: Path, prepared: PreparedRun, result: TrainResult) -> dict[str, Any]:
    """Write adapter/, rank_map.json (+ heatmap), history.json, metrics.json, task.json and curves."""
    result.model.save_pretrained(out / "adapter")  # type: ignore[operator]
    prepared.tokenizer.save_pretrained(out / "adapter")
    result.rank_map.save_json(out / "rank_map.json")
    task_info = {
        "task": prepared.run.task,
        "label_names": list(prepared.data.label_names) if prepared.data.label_names else None,
        "max_length": prepared.run.data.max_length,
        "model": prepared.run.model,
        "gguf_file": prepared.run.gguf_file,
    }
    (out / "task.json").write_text(json.dumps(task_info, indent=2) + "\n")
    final_eval = result.evals[-1][1] if result.evals else {}
    metrics = {
        "method": prepared.run.method,
        "seed": prepared.run.seed,
        "eval": final_eval,
        "steps": result.steps,
        "trainable_params": result.trainable_params,
        "lora_params": result.lora_params,
        "prepare_seconds": result.prepare_seconds,
        "calibration_seconds": result.rank_map.metadata.get("calibration_seconds"),
        "train_seconds": result.train_seconds,
        "resumed_from": result.resumed_from,
        "train_examples": len(prepared.train_rows),
        "eval_examples": len(prepared.eval_rows),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps({"losses": result.losses, "evals": result.evals}) + "\n")
    with contextlib.suppress(ImportError):
        from fimlora.plot import plot_training_curves

        result.rank_map.plot_heatmap(out / "rank_map.png", title=f"{prepared.run.method} ranks")
        plot_training_curves(
            {prepared.run.method: smooth(result.losses)}, out / "curves.png", title="training loss"
        )
    return metrics


def smooth(points: Sequence[tuple[int, float]], window: int = 10) -> list[tuple[int, float]]:
    """Trailing moving average of a loss curve (for plots; the raw curve stays in history.json)."""
    out, acc = [], 0.0
    for i, (step, value) in enumerate(points):
        acc += value
        if i >= window:
            acc -= points[i - window][1]
        out.append((step, acc / min(i + 1, window)))
    return out


def finetune(
    run: RunConfig, out_dir: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """``fimlora train``: prepare, train with the run's method, save the adapter, metrics and provenance.

    Checkpoints live in ``<parent>/.<name>.partial/checkpoints`` while training, so a killed run is
    resumed with ``resume=True``; the directory becomes ``out_dir`` only when the run succeeds.

    Returns:
        The metrics written to ``metrics.json``.
    """
    from fimlora.io import OutputDir, write_provenance

    output = OutputDir(out_dir, overwrite=overwrite, resume=resume)
    prepared = prepare_run(run)
    method = prepared.make_method()
    with output as staging:
        if not (staging / "checkpoints").is_dir() and resume:
            print(f"fimlora: no checkpoint in {staging}; starting from step 0", flush=True)
        result = train_adapter(
            prepared.model,
            prepared.lora_config,
            method,
            prepared.train_rows,
            _collate_of(prepared),
            prepared.train_config,
            seed=run.seed,
            device=prepared.device,
            eval_fn=prepared.eval_fn(),
            checkpoint_dir=staging / "checkpoints",
            resume=resume,
            desc=f"train {run.method}",
        )
        metrics = save_training_outputs(staging, prepared, result)
        write_provenance(staging, run.to_dict(), seed=run.seed, extra={"kind": "train"})
    return metrics


def _collate_of(prepared: PreparedRun) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
    from fimlora.tasks import collator_for

    return collator_for(prepared.run.task, prepared.tokenizer)


def allocate(
    run: RunConfig, out_dir: str | os.PathLike[str] | None = None, *, overwrite: bool = False
) -> RankMap:
    """``fimlora allocate``: calibrate on the first T training batches and compute the FIM rank map.

    Writes ``rank_map.json``, ``rank_map.png`` (ranks and scores side by side), ``scores.json`` and the
    provenance files to ``out_dir`` when given. Nothing is trained.
    """
    from fimlora.initialize import plan_rank_map
    from fimlora.io import OutputDir, write_provenance
    from fimlora.peft_glue import lora_modules, module_shapes
    from fimlora.scores import estimate_module_scores

    output = OutputDir(out_dir, overwrite=overwrite) if out_dir is not None else None
    prepared = prepare_run(run)
    fim_config = fim_config_of(run)
    from peft import get_peft_model

    torch.manual_seed(run.seed)
    model = get_peft_model(prepared.model.to(prepared.device), prepared.lora_config)
    collate = _collate_of(prepared)
    plan = _BatchPlan(len(prepared.train_rows), prepared.train_config.batch_size, run.seed)
    batches = (
        _to_device(collate([prepared.train_rows[i] for i in plan.indices(s)]), prepared.device)
        for s in range(fim_config.calibration_batches)
    )
    stats = estimate_module_scores(model, batches, fim_config)
    scores = stats.scores(fim_config.score, fim_config.aggregation)
    shapes = module_shapes(lora_modules(model))
    extra = dict(fim_config.extra, calibration_batches=stats.num_batches, calibration_seconds=stats.seconds)
    rank_map = plan_rank_map(scores, shapes, fim_config, r=prepared.lora_config.r, metadata=extra)
    if output is not None:
        with output as staging:
            rank_map.save_json(staging / "rank_map.json")
            stats.save_json(staging / "scores.json")
            with contextlib.suppress(ImportError):
                rank_map.plot_heatmap(staging / "rank_map.png", title="FIM-LoRA ranks", scores=scores)
            write_provenance(staging, run.to_dict(), seed=run.seed, extra={"kind": "allocate"})
    return rank_map


def run_config_with(run: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``run`` with top-level fields replaced (sections deep-copied)."""
    return dataclasses.replace(RunConfig.from_dict(run.to_dict()), **changes)
