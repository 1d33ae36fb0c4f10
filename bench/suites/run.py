"""Turn a :class:`~bench.harness.RunSpec` into a real training run through fimlora's Python API.

``run_spec(spec)`` dispatches on the suite: ``decoder`` specs go to :func:`bench.suites.decoder.run_decoder_spec`;
``encoder``/``hf`` specs get their :class:`fimlora.run_config.RunConfig` (:func:`bench.suites.encoder.run_config_for`),
then ``fimlora.recipes.prepare_run`` -> ``train_prepared`` (the same code path as ``fimlora train``). Both
return the harness's ``RunOutcome`` built by :func:`bench.suites.outcome.outcome_of`: metrics, LoRA
parameters, calibration/training seconds, peak memory, device, and details (rank map, uniform LoRA's
parameter count at the same budget, the ratio to it, losses).

Dependencies point one way: this module imports ``compress``, ``decoder``, ``encoder`` and ``outcome``;
none of them imports it. With the override ``compress_fractions``, a classification run also records its
adapter compressed to those fractions and evaluated (``extra.compress``, :mod:`bench.suites.compress`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.harness import RunSpec

from .compress import check_compress_fractions, compress_evaluations
from .decoder import run_decoder_spec
from .encoder import DEFAULTS, run_config_for
from .outcome import outcome_of, uniform_lora_params

__all__ = ["SUITES", "prepare_spec", "run_spec", "train_spec"]

SUITES: tuple[str, ...] = ("encoder", "decoder", "hf")


def prepare_spec(spec: RunSpec) -> Any:
    """``fimlora.recipes.prepare_run`` of a classification spec (suites ``encoder``/``hf``)."""
    from fimlora.recipes import prepare_run

    run = run_config_for(
        spec.suite, spec.task, spec.model, spec.method, spec.budget, spec.seed, spec.overrides
    )
    return prepare_run(run)


def train_spec(spec: RunSpec, prepared: Any | None = None) -> tuple[Any, Any, Callable[..., Any] | None]:
    """Train a classification spec; returns ``(prepared, TrainResult, eval_fn)``."""
    import torch

    from fimlora.recipes import train_prepared

    prepared = prepared if prepared is not None else prepare_spec(spec)
    if prepared.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prepared.device)
    prepared.extra["uniform_lora_params"] = uniform_lora_params(prepared.model, prepared.lora_config)
    result = train_prepared(prepared, desc=spec.run_id)
    return prepared, result, prepared.eval_fn()


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """Run one spec end to end and return its ``RunOutcome`` (the ``run_fn`` of ``run_grid``)."""
    if spec.suite not in SUITES:
        raise ValueError(f"unknown suite {spec.suite!r}; choose one of {SUITES}")
    from fimlora.training import TrainingInterrupted

    try:
        if spec.suite == "decoder":
            return run_decoder_spec(spec)
        prepared, result, eval_fn = train_spec(spec)
    except TrainingInterrupted as stop:
        # SIGINT/SIGTERM stop the sweep (the runner lets KeyboardInterrupt through without writing a
        # record); otherwise the signal would be stored as a failed run and the sweep would go on.
        raise KeyboardInterrupt(str(stop)) from stop
    metrics = result.evals[-1][1] if result.evals else {}
    outcome = outcome_of(spec, prepared, result, dict(metrics))
    fractions = check_compress_fractions(
        spec.overrides.get("compress_fractions", DEFAULTS["compress_fractions"])
    )
    if fractions:  # after the outcome, so that its peak memory and times are the training run's alone
        outcome["extra"]["compress"] = compress_evaluations(result.model, fractions, eval_fn, prepared.device)
    return outcome
