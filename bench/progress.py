"""How far a grid has come in its store, and how long what is left should take.

A long grid (the full-length test grid runs for many sessions on two CPU workers) needs a progress line that
a command prints, not one counted by hand::

    python -m bench.progress --store bench/results/full/test --workers 2 \\
        --grid bench/grids/full/test.yaml --grid bench/grids/full/test_low.yaml ...

It prints the finished and pending runs per seed and per task, the median wall time of the finished runs
(``extra.wall_seconds`` of each record), and an estimate of the time left: each pending run is given the
median wall time of the finished runs most like it (same task, method and budget; else same task and
method; else same task; else all), and the sum is divided by the number of workers. The estimate assumes
the workers stay busy and that the runs to come take as long as those already done; it says nothing where
no run has finished. Torch-free.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.harness import ExperimentGrid, ResultStore, RunSpec

__all__ = ["GridProgress", "estimate_seconds", "format_progress", "grid_progress", "main"]


@dataclass(frozen=True)
class GridProgress:
    """Finished and pending runs of a set of specs, with wall times.

    Attributes:
        total: distinct runs in the grids.
        finished: runs with a finished record.
        per_seed: seed -> (finished, total).
        per_task: task -> (finished, total, median wall seconds of its finished runs or None).
        pending_seconds: run_id -> estimated wall seconds of each pending run (None where nothing is known).
        seed_left_seconds: seed -> estimated wall seconds of that seed's pending runs (known ones only).
    """

    total: int
    finished: int
    per_seed: dict[int, tuple[int, int]] = field(default_factory=dict)
    per_task: dict[str, tuple[int, int, float | None]] = field(default_factory=dict)
    pending_seconds: dict[str, float | None] = field(default_factory=dict)
    seed_left_seconds: dict[int, float] = field(default_factory=dict)

    @property
    def left_seconds(self) -> float:
        """Estimated wall seconds of all pending runs on one worker (runs with no estimate count 0)."""
        return sum(s for s in self.pending_seconds.values() if s is not None)

    @property
    def unknown(self) -> int:
        """Pending runs with no estimate (no finished run to compare them with)."""
        return sum(s is None for s in self.pending_seconds.values())


def _wall(record: Mapping[str, Any]) -> float | None:
    value = (record.get("extra") or {}).get("wall_seconds")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def estimate_seconds(spec: RunSpec, finished: Iterable[tuple[RunSpec, float]]) -> float | None:
    """Median wall seconds of the finished runs most like ``spec``; None if there are none.

    Likeness, tried in order: same task, method and budget; same task and method; same task; any run.
    """
    done = list(finished)
    keys = (
        lambda s: (s.task, s.method, s.budget),
        lambda s: (s.task, s.method),
        lambda s: (s.task,),
        lambda s: (),
    )
    for key in keys:
        times = [t for s, t in done if key(s) == key(spec)]
        if times:
            return float(statistics.median(times))
    return None


def grid_progress(specs: Sequence[RunSpec], records: Iterable[Mapping[str, Any]]) -> GridProgress:
    """Count finished runs of ``specs`` in ``records`` (the store's) and estimate the pending ones.

    A run is finished when a record with its ``run_id`` has ``"status": "ok"``. Wall times come from the
    finished records of these specs only, so other grids sharing the store do not skew the estimate.
    """
    unique: dict[str, RunSpec] = {}
    for spec in specs:
        unique.setdefault(spec.run_id, spec)
    ok = {r["run_id"]: r for r in records if r.get("status") == "ok" and r.get("run_id") in unique}
    finished = [(unique[i], w) for i, r in ok.items() if (w := _wall(r)) is not None]
    seeds: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    tasks: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    pending: dict[str, float | None] = {}
    seed_left: dict[int, float] = defaultdict(float)
    for run_id, spec in unique.items():
        done = run_id in ok
        seeds[spec.seed][1] += 1
        tasks[spec.task][1] += 1
        if done:
            seeds[spec.seed][0] += 1
            tasks[spec.task][0] += 1
        else:
            est = estimate_seconds(spec, finished)
            pending[run_id] = est
            seed_left[spec.seed] += est or 0.0
    task_walls: dict[str, list[float]] = defaultdict(list)
    for spec, w in finished:
        task_walls[spec.task].append(w)
    return GridProgress(
        total=len(unique),
        finished=len(ok),
        per_seed={s: (d, t) for s, (d, t) in sorted(seeds.items())},
        per_task={
            k: (d, t, float(statistics.median(task_walls[k])) if task_walls[k] else None)
            for k, (d, t) in tasks.items()
        },
        pending_seconds=pending,
        seed_left_seconds=dict(sorted(seed_left.items())),  # only seeds with a pending run have a key
    )


def format_progress(progress: GridProgress, *, workers: int = 1) -> str:
    """The report :func:`main` prints: totals, per seed, per task, and the estimate on ``workers``."""
    if workers < 1:
        raise ValueError(f"`workers` must be >= 1, got {workers}")
    p = progress
    lines = [f"{p.total} runs: {p.finished} finished, {p.total - p.finished} pending"]
    lines.append("seeds: " + ", ".join(f"{s}: {d}/{t}" for s, (d, t) in p.per_seed.items()))
    lines.append(f"{'task':<20} {'finished':>12} {'median wall (s)':>16}")
    for task, (d, t, med) in p.per_task.items():
        lines.append(f"{task:<20} {f'{d}/{t}':>12} {'-' if med is None else f'{med:.0f}':>16}")
    left = p.total - p.finished
    if not left:
        lines.append("nothing left to run")
        return "\n".join(lines)
    if p.unknown == left:
        lines.append(f"no estimate: no finished run to compare the {left} pending runs with")
        return "\n".join(lines)
    hours = p.left_seconds / 3600
    lines.append(
        f"left: {left} runs, about {hours:.1f} core-hours, {hours / workers:.1f} h on {workers} worker(s)"
        + (f" ({p.unknown} runs with no estimate not counted)" if p.unknown else "")
    )
    if p.seed_left_seconds:  # seeds run in order (--seed-major): the lowest unfinished seed completes next
        seed, seconds = next(iter(p.seed_left_seconds.items()))
        lines.append(
            f"  of which seed {seed}'s: about {seconds / 3600 / workers:.1f} h on {workers} worker(s)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the progress of ``--grid``(s) in ``--store``."""
    parser = argparse.ArgumentParser(prog="python -m bench.progress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", action="append", required=True, help="grid file(s) (.yaml/.json)")
    parser.add_argument("--store", required=True, help="result store directory")
    parser.add_argument("--workers", type=int, default=1, help="workers sharing the queue (default 1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    specs = [spec for path in args.grid for spec in ExperimentGrid.from_file(path).expand()]
    print(format_progress(grid_progress(specs, ResultStore(args.store).records()), workers=args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
