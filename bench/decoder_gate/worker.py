"""The gate's one resumable worker: learning-rate runs first, then the gate runs, records in one store.

Every run is a :class:`bench.harness.RunSpec` in :data:`DEFAULT_STORE` (``bench.harness.ResultStore``):
finished runs are skipped, failed ones retried, and a run killed mid-way resumes from its last checkpoint
(every 50 steps, under ``out/decoder_gate_checkpoints``). The order is fixed by
:mod:`bench.decoder_gate.protocol`: phase ``lr`` (with at most one extension rate per rank whose winner
is at the grid's edge), then phase ``gate`` at the chosen rates.
"""

from __future__ import annotations

from typing import Any

from bench.harness import REPO_ROOT, GridSummary, ResultStore, RunSpec, run_grid

from .protocol import RANKS, choose_lr, extension_rate, gate_specs, lr_specs, make_spec
from .sft_run import GateRunner

__all__ = ["CHECKPOINT_ROOT", "DEFAULT_STORE", "chosen_rates", "run_gate", "timing_spec"]

DEFAULT_STORE = REPO_ROOT / "bench" / "results" / "decoder_gate_store"
CHECKPOINT_ROOT = REPO_ROOT / "out" / "decoder_gate_checkpoints"


def chosen_rates(store: ResultStore) -> tuple[dict[int, float], dict[int, dict[float, float]]]:
    """Each rank's chosen rate so far and its dev losses by rate (ranks without records left out)."""
    records = store.records()
    chosen: dict[int, float] = {}
    losses: dict[int, dict[float, float]] = {}
    for r in RANKS:
        best, by_rate = choose_lr(records, r)
        if best is not None:
            chosen[r], losses[r] = best, by_rate
    return chosen, losses


def run_gate(
    runner: GateRunner, store: ResultStore, *, phases: tuple[str, ...] = ("lr", "gate")
) -> dict[str, Any]:
    """Run the gate's phases in order; returns the summaries and the chosen rates.

    Raises:
        RuntimeError: the gate phase is asked for while a rank has no finished learning-rate run.
    """
    summaries: dict[str, GridSummary] = {}
    if "lr" in phases:
        summaries["lr"] = run_grid(lr_specs(), runner, store, progress=True, shared=True)
        _, losses = chosen_rates(store)
        extra = {r: (rate,) for r, by_rate in losses.items() if (rate := extension_rate(by_rate)) is not None}
        if extra:
            summaries["lr-extension"] = run_grid(lr_specs(extra), runner, store, progress=True, shared=True)
    chosen, losses = chosen_rates(store)
    if "gate" in phases:
        missing = [r for r in RANKS if r not in chosen]
        if missing:
            raise RuntimeError(f"no finished learning-rate run for rank(s) {missing}: run phase lr first")
        summaries["gate"] = run_grid(gate_specs(chosen), runner, store, progress=True, shared=True)
    return {"summaries": summaries, "chosen": chosen, "dev_losses": losses}


def timing_spec(steps: int, rank: int = 32) -> RunSpec:
    """A short run of the gate's set-up to measure seconds per step (recorded, never part of the gate)."""
    return make_spec("uniform", rank, 0, {"phase": "timing", "steps": steps, "lr": 1e-3, "map": "uniform"})
