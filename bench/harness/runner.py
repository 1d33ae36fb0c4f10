"""Run a list of specs against a store: skip finished runs, record failures, resume after crashes.

``run_fn`` does the actual work (load model, allocate ranks, train, evaluate) and returns a
:class:`RunOutcome` dict; the runner turns it into a provenance record and writes it atomically. A run
that raises is stored with ``"status": "failed"`` and its traceback, so the failure is visible in the
store yet retried by the next sweep. ``KeyboardInterrupt`` propagates immediately and writes nothing for
the interrupted run.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from .experiment import RunSpec
from .record import make_record
from .store import ResultStore

__all__ = ["GridSummary", "RunOutcome", "run_grid"]


class _RunOutcomeRequired(TypedDict):
    metrics: dict[str, float]
    trainable_params: int


class RunOutcome(_RunOutcomeRequired, total=False):
    """What ``run_fn`` returns. ``metrics`` and ``trainable_params`` are required.

    Optional keys default to: ``calibration_seconds`` 0.0, ``train_seconds`` 0.0,
    ``peak_memory_bytes`` None, ``device`` "unknown", ``extra`` {}.
    """

    calibration_seconds: float
    train_seconds: float
    peak_memory_bytes: int | None
    device: str
    extra: dict[str, Any]


@dataclass
class GridSummary:
    """Run ids by what happened to them in one :func:`run_grid` call."""

    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run_grid(
    specs: Iterable[RunSpec],
    run_fn: Callable[[RunSpec], Mapping[str, Any]],
    store: ResultStore,
    *,
    stop_on_error: bool = False,
    progress: bool = True,
    shared: bool = False,
) -> GridSummary:
    """Run every unfinished spec and store its record.

    Args:
        specs: Runs to do; duplicates (same ``run_id``) run once.
        run_fn: Does one run and returns a :class:`RunOutcome`-shaped mapping.
        store: Where records go; finished (``"ok"``) runs in it are skipped.
        stop_on_error: Re-raise the first failure (after storing its failed record).
        progress: Show a tqdm bar if tqdm is installed, else one printed line per run.
        shared: Other workers use the same store at the same time: claim each run before starting it
            (:meth:`ResultStore.claim`) and skip runs another live worker holds or has finished meanwhile.

    Returns:
        A :class:`GridSummary` of completed, failed and skipped run ids.
    """
    specs = list(specs)
    todo = store.pending(specs)
    todo_ids = {spec.run_id for spec in todo}
    summary = GridSummary(skipped=sorted({s.run_id for s in specs} - todo_ids))
    reporter = _Progress(len(todo), enabled=progress)
    try:
        for spec in todo:
            if shared:
                if not store.claim(spec.run_id):
                    summary.skipped.append(spec.run_id)
                    reporter.skip()
                    continue
                if store.is_finished(spec.run_id):  # another worker finished it after our pending() read
                    store.release(spec.run_id)
                    summary.skipped.append(spec.run_id)
                    reporter.skip()
                    continue
            reporter.start(spec.run_id)
            try:
                _run_one(spec, run_fn, store, summary, stop_on_error)
            finally:
                if shared:
                    store.release(spec.run_id)
            reporter.finish()
    finally:
        reporter.close()
    return summary


def _run_one(
    spec: RunSpec,
    run_fn: Callable[[RunSpec], Mapping[str, Any]],
    store: ResultStore,
    summary: GridSummary,
    stop_on_error: bool,
) -> None:
    started = time.perf_counter()
    try:
        outcome = run_fn(spec)
        # Inside the try: a malformed outcome is a bug in run_fn and is recorded like any failure.
        record = _ok_record(spec, outcome, wall_seconds=time.perf_counter() - started)
    except Exception as exc:  # KeyboardInterrupt/SystemExit are BaseException: they propagate.
        store.put(_failed_record(spec, exc, wall_seconds=time.perf_counter() - started))
        summary.failed.append(spec.run_id)
        if stop_on_error:
            raise
        return
    store.put(record)
    summary.completed.append(spec.run_id)


def _ok_record(spec: RunSpec, outcome: Mapping[str, Any], *, wall_seconds: float) -> dict[str, Any]:
    if not isinstance(outcome, Mapping):
        raise TypeError(f"run_fn must return a mapping, got {type(outcome).__name__}")
    missing = [key for key in ("metrics", "trainable_params") if key not in outcome]
    if missing:
        raise ValueError(f"run_fn outcome is missing {missing}")
    return make_record(
        spec,
        outcome["metrics"],
        trainable_params=outcome["trainable_params"],
        calibration_seconds=outcome.get("calibration_seconds", 0.0),
        train_seconds=outcome.get("train_seconds", 0.0),
        peak_memory_bytes=outcome.get("peak_memory_bytes"),
        device=outcome.get("device", "unknown"),
        extra={**dict(outcome.get("extra") or {}), "wall_seconds": wall_seconds},
    )


def _failed_record(spec: RunSpec, exc: BaseException, *, wall_seconds: float) -> dict[str, Any]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return make_record(
        spec,
        {},
        trainable_params=0,
        calibration_seconds=0.0,
        train_seconds=0.0,
        peak_memory_bytes=None,
        device="unknown",
        extra={"wall_seconds": wall_seconds, "exception": type(exc).__name__},
        status="failed",
        error=text,
    )


class _Progress:
    """Progress over the runs this worker does, via tqdm when it is installed, else one line per run.

    A run that another worker holds or has finished (``shared``) leaves the total rather than counting as
    done, so the bar's rate and time left describe this worker's own runs.
    """

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total = total
        self.started = 0
        self._enabled = enabled
        self._bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm  # lazy: optional for the harness
            except ImportError:
                return
            self._bar = tqdm(total=total, desc="runs", unit="run")

    def start(self, run_id: str) -> None:
        self.started += 1
        if self._bar is not None:
            self._bar.set_postfix_str(run_id)
        elif self._enabled:
            print(f"[{self.started}/{self.total}] {run_id}", flush=True)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def skip(self) -> None:
        self.total -= 1
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
