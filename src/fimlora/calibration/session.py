"""A calibration run: the model's state saved and restored around hooks that read LoRA-B gradients.

Calibration estimates, per LoRA module, the empirical Fisher ``E[g^2]`` and the variance of its B factor's
gradient ``g`` (with B = 0 at init only B carries signal; see :mod:`fimlora.calibration.stats`), over the
batches (``FimConfig(estimator="batch")``) or examples (``"per_example"``) of a few calibration batches.
:func:`fim_calibration` calibrates inside a user's own loop; :func:`estimate_module_scores` owns the loop
over a dataloader. Both drive the accumulator ``FimConfig.estimator`` selects through the
:class:`~fimlora.calibration.base.GradientAccumulator` protocol only.
Under ``torch.distributed`` the raw sums are all-reduced, so T counts the batches of all processes.
A model sharded with FSDP2 (``fully_shard``, also through ``accelerate``) is calibrated with
:class:`~fimlora.calibration.layer_grad.LayerGradientAccumulator`, which forms each B gradient from its
``lora_B`` layer's input and output gradient (full size on every process) instead of the sharded,
process-averaged ``.grad``: the statistics are those of one process on the union of all processes'
micro-batches, each micro-batch one calibration batch, as under DDP.
Calibration is transactional (:func:`calibration_mode`): train/eval modes, ``requires_grad`` flags and
existing ``.grad`` tensors are restored whether it returns or raises.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fimlora.calibration.base import GradientAccumulator
from fimlora.calibration.batch import BatchAccumulator
from fimlora.calibration.layer_grad import LayerGradientAccumulator
from fimlora.calibration.per_example import PerExampleAccumulator
from fimlora.calibration.stats import ModuleStats
from fimlora.config import FimConfig
from fimlora.errors import CalibrationError
from fimlora.peft_glue import data_parallel_inner, is_sharded, lora_factors, lora_modules, module_shapes

__all__ = [
    "FimCalibration",
    "LossFn",
    "calibration_mode",
    "estimate_module_scores",
    "fim_calibration",
    "make_accumulator",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar loss tensor``."""

_ACCUMULATORS: dict[str, Callable[[nn.Module, Mapping[str, nn.Linear]], GradientAccumulator]] = {
    "batch": lambda model, b_layers: BatchAccumulator({n: layer.weight for n, layer in b_layers.items()}),
    "per_example": PerExampleAccumulator,
}


def make_accumulator(
    estimator: str, model: nn.Module, b_layers: Mapping[str, nn.Linear], *, sharded: bool = False
) -> GradientAccumulator:
    """The accumulator of ``FimConfig.estimator`` for ``b_layers`` (module name -> ``lora_B`` layer).

    ``sharded``: the model's parameters are sharded (FSDP2), so B's ``.grad`` holds a process-averaged
    shard; the batch estimator then forms B's gradient from the layer's input and output gradient.

    Raises:
        ValueError: an unknown estimator, or the per-example estimator on a sharded model.
    """
    if estimator not in _ACCUMULATORS:
        raise ValueError(f"`estimator` must be one of {tuple(_ACCUMULATORS)}, got {estimator!r}")
    if sharded:
        if estimator != "batch":
            raise ValueError(
                f"estimator={estimator!r} reads B's full .grad, which a sharded (FSDP2) model does not "
                "have; use estimator='batch' (the default) on sharded models"
            )
        return LayerGradientAccumulator(b_layers)
    return _ACCUMULATORS[estimator](model, b_layers)


@dataclass
class _SavedState:
    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor]]


def _checkpoints(module: nn.Module) -> bool:
    """``module.gradient_checkpointing is True``, without nn.Module's slow ``__getattr__`` miss.

    Hugging Face sets the flag as a plain instance attribute over a class default; reading the instance
    dict, then the class, gives what ``getattr`` gives for such a flag at a fraction of the cost
    (calibration looks at every module of the model on each call).
    """
    own = vars(module)
    if "gradient_checkpointing" in own:
        return own["gradient_checkpointing"] is True
    return getattr(type(module), "gradient_checkpointing", False) is True


def _enter_calibration(model: nn.Module, trainable: Iterable[torch.Tensor]) -> _SavedState:
    """Put the model in calibration state (eval mode, only ``trainable`` needs grad, no .grad).

    One pass over the modules and one over the parameters: on a model with a thousand modules each pass
    costs about a millisecond, a visible part of calibrating a small model.
    """
    modules = list(model.modules())
    params = list(model.parameters())
    saved = _SavedState(
        training=[(m, m.training) for m in modules],
        requires_grad=[(p, p.requires_grad) for p in params],
        grads=[(p, p.grad) for p in params if p.grad is not None],
    )
    for p, _ in saved.grads:
        p.grad = None
    keep = {id(p) for p in trainable}
    for p in params:
        wanted = id(p) in keep
        if p.requires_grad != wanted:
            p.requires_grad_(wanted)
    # eval(): no dropout, so the statistics depend on the data and the seed of LoRA-A only.
    model.eval()
    # ...except for the layers (transformers >= 4.35) or models (older) that gradient-checkpoint: they
    # checkpoint only while `training` is True, so eval() would silently keep every activation and push
    # calibration's peak memory above a checkpointed training step's. Only that module's own flag is set;
    # its children (dropout included) stay in eval mode.
    for m in modules:
        if _checkpoints(m):
            m.training = True
    return saved


def _exit_calibration(saved: _SavedState) -> None:
    for m, mode in saved.training:
        m.training = mode
    for p, flag in saved.requires_grad:
        if p.grad is not None:  # left by calibration (A's, when it was trainable)
            p.grad = None
        if p.requires_grad != flag:
            p.requires_grad_(flag)
    for p, g in saved.grads:
        p.grad = g


@contextlib.contextmanager
def calibration_mode(model: nn.Module, trainable: Iterable[torch.Tensor]) -> Iterator[nn.Module]:
    """The model in calibration state inside the block, restored exactly on exit (also on error).

    Inside: eval mode (modules that gradient-checkpoint keep ``training=True`` so that they still do),
    only ``trainable`` requires grad, no ``.grad`` tensors. On exit: modes, ``requires_grad`` flags and
    the ``.grad`` tensors from before; gradients left inside the block are dropped.
    """
    saved = _enter_calibration(model, trainable)
    try:
        yield model
    finally:
        _exit_calibration(saved)


class FimCalibration:
    """State of one calibration run; use through :func:`fim_calibration` or :func:`estimate_module_scores`.

    Args:
        model: a PEFT model with LoRA layers for ``adapter_name``.
        fim_config: calibration settings (``estimator`` picks the accumulator).
        adapter_name: which adapter to calibrate.
        own_loop: the caller runs the backward passes and calls :meth:`collect_backward` after each.
    """

    def __init__(
        self,
        model: nn.Module,
        fim_config: FimConfig | None = None,
        *,
        adapter_name: str = "default",
        own_loop: bool = False,
    ):
        self.model = model
        self.config = fim_config or FimConfig()
        self.adapter_name = adapter_name
        mods = lora_modules(model, adapter_name)  # validates model and adapter before touching anything
        self._shapes = module_shapes(mods, adapter_name)
        factors = {n: lora_factors(m, adapter_name) for n, m in mods.items()}
        b_layers = {n: b for n, (_, b) in factors.items()}
        trainable = [b.weight for b in b_layers.values()]
        if not self.config.freeze_lora_A:
            trainable += [a.weight for a, _ in factors.values()]
        self._acc = make_accumulator(self.config.estimator, model, b_layers, sharded=is_sharded(model))
        self._trainable = trainable
        self._own_loop = own_loop
        self._saved: _SavedState | None = None
        self._t0 = 0.0
        self._result: ModuleStats | None = None

    def __enter__(self) -> FimCalibration:
        self._saved = _enter_calibration(self.model, self._trainable)
        self._acc.attach(own_loop=self._own_loop)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._acc.detach()
            if exc_type is None:
                self._result = self._finish()
        finally:
            assert self._saved is not None
            _exit_calibration(self._saved)

    def _finish(self) -> ModuleStats:
        self._acc.finish()
        world = self._acc.all_reduce()
        reduced = self._acc.reduce(self._shapes)
        if reduced.num_batches == 0:
            raise CalibrationError(
                "no LoRA-B gradient was seen during calibration: run loss.backward() inside the block, "
                "and make sure the loss depends on the adapted modules"
            )
        metadata: dict[str, Any] = {"score": self.config.score, "aggregation": self.config.aggregation}
        metadata.update(reduced.metadata)
        if self.config.score == "variance" and reduced.num_samples < 2:
            warnings.warn(
                f"the variance score needs >= 2 calibration {reduced.sample_unit}; with 1 it is zero",
                stacklevel=3,
            )
        return ModuleStats(
            modules=reduced.modules,
            num_batches=reduced.num_batches,
            seconds=time.perf_counter() - self._t0,
            world_size=world,
            metadata=metadata,
        )

    def collect_backward(self) -> None:
        """Called after each backward by a loop that built the session with ``own_loop=True``."""
        if self._own_loop:
            self._acc.after_backward()

    @property
    def scores(self) -> ModuleStats:
        """The statistics, available after the ``with`` block has exited without error."""
        if self._result is None:
            raise RuntimeError("calibration statistics are available only after the `with` block ends")
        return self._result


def fim_calibration(
    model: nn.Module, fim_config: FimConfig | None = None, *, adapter_name: str = "default"
) -> FimCalibration:
    """Context manager for calibrating inside your own loop.

    Example::

        with fim_calibration(model, FimConfig()) as cal:
            for batch in batches[:8]:
                model(**batch).loss.backward()     # no optimizer step
        initialize_lora_fim_ranks(model, scores=cal.scores)

    Every ``backward()`` inside the block counts as one calibration batch. On exit the model's modes,
    ``requires_grad`` flags and ``.grad`` tensors are restored as they were.

    Args:
        model: a PEFT model with LoRA layers for ``adapter_name`` (B = 0, as freshly initialised).
        fim_config: calibration settings (``estimator`` picks what is squared: batch or example gradients).
        adapter_name: which adapter to calibrate.

    Returns:
        The session; its ``scores`` (:class:`ModuleStats`, sums over B's ``(out, r)`` elements of E[g^2]
        and Var[g] per module) are available after the block exits without error.
    """
    return FimCalibration(model, fim_config, adapter_name=adapter_name)


def estimate_module_scores(
    model: nn.Module,
    dataloader: Iterable[Any],
    fim_config: FimConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
) -> ModuleStats:
    """Run ``calibration_batches`` forward/backward passes and return per-module LoRA-B statistics.

    Args:
        model: a PEFT model with LoRA layers for ``adapter_name`` (B = 0, as freshly initialised). A
            ``DistributedDataParallel`` or ``DataParallel`` wrapper is unwrapped: the model inside is run,
            so that its backward does not average gradients over processes. A model sharded with FSDP2
            (``fully_shard``) is run as it is; every process must then run the same number of batches
            (FSDP's own collectives need it).
        dataloader: yields batches: dicts of tensors (Hugging Face convention; the model output's
            ``.loss`` is used) or anything ``loss_fn`` understands.
        fim_config: calibration settings (``calibration_batches`` is T).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, for batches without labels or custom losses.
        adapter_name: which adapter to calibrate.

    Returns:
        :class:`ModuleStats` with, per module, sums over B's ``(out, r)`` elements of E[g^2] and Var[g].

    Raises:
        CalibrationError: no batches, a batch without a loss, or a non-finite gradient (the message names
            the batch index). The model is left exactly as it was.
    """
    cfg = fim_config or FimConfig()
    # A DDP / DataParallel wrapper would average gradients over processes in backward; this loop is ours,
    # so it runs the model inside (the statistics are all-reduced here instead).
    inner = data_parallel_inner(model)
    if inner is not None:
        model = inner
    session = FimCalibration(model, cfg, adapter_name=adapter_name, own_loop=True)
    device = _model_device(model)
    with session:
        seen = 0
        loss_flags: list[torch.Tensor] = []
        for i, batch in enumerate(
            _progress(itertools.islice(iter(dataloader), cfg.calibration_batches), cfg)
        ):
            loss = batch_loss(model, batch_to_device(batch, device), loss_fn, i)
            loss.backward()
            session.collect_backward()
            # Read after the loop: a per-batch read would stall the device once per batch.
            loss_flags.append(~torch.isfinite(loss.detach()))
            seen += 1
        if loss_flags:
            bad = torch.stack([f.to(loss_flags[0].device) for f in loss_flags]).nonzero().flatten().tolist()
            if bad:
                raise CalibrationError(
                    f"calibration batch {bad[0]} has a non-finite loss; check its inputs and labels"
                )
        if seen == 0:
            raise CalibrationError(
                "the calibration dataloader yielded no batches: pass a non-empty dataloader"
            )
        if seen < cfg.calibration_batches:
            warnings.warn(
                f"the dataloader gave only {seen} of the {cfg.calibration_batches} calibration batches "
                "requested; using those",
                stacklevel=2,
            )
    return session.scores


def _progress(it: Iterator[Any], cfg: FimConfig) -> Iterator[Any]:
    if not cfg.show_progress:
        return it
    from tqdm.auto import tqdm

    return iter(tqdm(it, total=cfg.calibration_batches, desc="FIM calibration", leave=False))


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batch_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: batch_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return (
            type(batch)(batch_to_device(v, device) for v in batch)
            if isinstance(batch, list)
            else tuple(batch_to_device(v, device) for v in batch)
        )
    return batch


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None, index: int) -> torch.Tensor:
    """The scalar loss of calibration batch ``index``: ``loss_fn(model, batch)``, else ``model(**batch).loss``.

    Every calibration (FIM-LoRA's, GoRA's, fim-spectrum's) reads its batches through this, so they share
    one convention and one set of errors.

    Raises:
        CalibrationError: a batch that is not a dict without ``loss_fn``, no loss, a non-scalar loss, or a
            loss with no gradient.
    """
    loss: Any
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    elif isinstance(batch, Mapping):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
    else:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}, not a dict: pass "
            "`loss_fn=lambda model, batch: ...` that returns a scalar loss"
        )
    if loss is None:
        raise CalibrationError(
            f"calibration batch {index} produced no loss: include `labels` in the batch or pass `loss_fn`"
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise CalibrationError(
            f"the loss of calibration batch {index} must be a scalar tensor, got "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; reduce it "
            "(e.g. .mean()) in `loss_fn`"
        )
    if not loss.requires_grad:
        raise CalibrationError(
            f"the loss of calibration batch {index} does not depend on the calibrated weights (no gradient); "
            "check that the adapter is active and that the adapted modules are used in the forward pass"
        )
    return loss


def gradient_passes(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    num_batches: int,
    loss_fn: LossFn | None,
    on_grad: Callable[[str, torch.Tensor], None],
    method: str,
) -> int:
    """Backward passes over the first ``num_batches`` batches, only ``params`` trainable
    (:func:`calibration_mode`); each one's gradient goes to ``on_grad(name, grad)`` as soon as it is
    accumulated, then is freed (no full set of ``.grad`` tensors at once). GoRA's and fim-spectrum's
    calibrations read their batches through this.

    Returns:
        the number of batches seen.

    Raises:
        CalibrationError: no batch (the message names ``method``), or what :func:`batch_loss` refuses.
    """

    def hook_for(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            assert param.grad is not None
            on_grad(name, param.grad)
            param.grad = None

        return hook

    device = next(model.parameters()).device  # where the inputs go (the embeddings' device, as a rule)
    seen = 0
    with calibration_mode(model, params.values()):
        handles = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in params.items()]
        try:
            for i, batch in enumerate(itertools.islice(iter(batches), num_batches)):
                batch_loss(model, batch_to_device(batch, device), loss_fn, i).backward()
                seen += 1
        finally:
            for h in handles:
                h.remove()
    if seen == 0:
        raise CalibrationError(f"the calibration batches are empty: {method} needs at least one batch")
    return seen
