"""Run a benchmark grid into a result store, and/or write the report from a store.

Examples::

    # the reduced CPU grid (resumable: rerun the same command after a crash, finished runs are skipped)
    python -m bench.run --grid bench/grids/cpu.yaml --store bench/results/store
    # tables + figures from whatever the store holds
    python -m bench.run --store bench/results/store --report docs/results/
    # the full grid on a GPU
    python -m bench.run --grid bench/grids/gpu.yaml --store bench/results/gpu --report docs/results/gpu

``--only KEY=VALUE`` (repeatable) restricts the grid, e.g. ``--only task=trec6 --only method=fim,uniform``.
``--threads N`` sets torch's CPU threads.

Several workers on one store (e.g. two single-thread processes on a 2-core machine): start the same command
twice with ``--shared``; each claims a run before starting it, so they share one queue without splitting
the grid by hand. ``--seed-major`` runs the grids' specs together, seed by seed (all runs of seed 0 on
every grid first), so an interrupted sweep leaves whole seeds, which pair.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness import ExperimentGrid, ResultStore, RunSpec, run_grid, write_report
from bench.harness.record import REPO_ROOT
from fimlora.io import git_state

__all__ = ["main", "select"]


def select(specs: Sequence[RunSpec], only: Sequence[str]) -> list[RunSpec]:
    """Keep the specs whose fields match every ``KEY=VALUE`` (values compared as strings; ``KEY=a,b`` matches
    either value)."""
    filters = []
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or key not in ("suite", "task", "model", "method", "budget", "seed"):
            raise SystemExit(
                f"--only expects FIELD=VALUE with FIELD in suite/task/model/method/budget/seed, got {item!r}"
            )
        filters.append((key, set(value.split(","))))
    return [s for s in specs if all(str(getattr(s, k)) in values for k, values in filters)]


CODE_PATHS: tuple[str, ...] = ("src", "bench", "pyproject.toml")
"""What a record's "dirty" flag is about: code, not the reports and notes edited while a grid runs (a
published table rewritten in the working tree says nothing about the code that trained a run)."""


def pin_code_version() -> None:
    """Name the code this process runs in every record it writes: the checkout's commit and dirty flag (of
    :data:`CODE_PATHS`) now,
    at start, exported as ``$FIMLORA_GIT_COMMIT`` / ``$FIMLORA_GIT_DIRTY`` (which :func:`fimlora.io.git_state`
    reads first). Without it a worker that runs for hours would stamp each record with whatever HEAD is when
    the record is written, not the commit whose code it imported. An existing ``$FIMLORA_GIT_COMMIT`` wins."""
    if not os.environ.get("FIMLORA_GIT_COMMIT"):
        state = git_state(REPO_ROOT, paths=CODE_PATHS)
        if state["commit"]:
            os.environ["FIMLORA_GIT_COMMIT"] = str(state["commit"])
            if state["dirty"] is not None:
                os.environ["FIMLORA_GIT_DIRTY"] = "1" if state["dirty"] else "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 if any run failed)."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", action="append", default=[], help="grid file(s) (.yaml/.json) to run")
    parser.add_argument("--store", required=True, help="result store directory (one JSON per run)")
    parser.add_argument("--report", help="write results.md and figures from the store into this folder")
    parser.add_argument(
        "--only", action="append", default=[], help="FIELD=VALUE[,VALUE...] filter (repeatable)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    parser.add_argument("--dry-run", action="store_true", help="list pending runs and exit")
    parser.add_argument(
        "--shared", action="store_true", help="other workers run the same grids on this store: claim each run"
    )
    parser.add_argument(
        "--seed-major", action="store_true", help="run all grids together, seed by seed (whole seeds first)"
    )
    args = parser.parse_args(argv)
    pin_code_version()
    store = ResultStore(args.store)
    failed = 0
    batches = [(path, select(ExperimentGrid.from_file(path).expand(), args.only)) for path in args.grid]
    if args.seed_major and batches:
        combined = [spec for _, specs in batches for spec in specs]
        batches = [(" + ".join(args.grid), sorted(combined, key=lambda s: s.seed))]  # stable: grid order kept
    for grid_path, specs in batches:
        pending = store.pending(specs)
        print(f"{grid_path}: {len(specs)} runs, {len(pending)} pending", flush=True)
        if args.dry_run:
            for spec in pending:
                print("  ", spec.run_id)
            continue
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        from bench.suites import run_spec

        summary = run_grid(specs, run_spec, store, stop_on_error=args.stop_on_error, shared=args.shared)
        failed += len(summary.failed)
        print(
            f"{grid_path}: {len(summary.completed)} completed, {len(summary.failed)} failed, "
            f"{len(summary.skipped)} skipped",
            flush=True,
        )
        for run_id in summary.failed:
            error = (store.get(run_id).get("error") or "").strip().splitlines()
            print(f"  FAILED {run_id}: {error[-1] if error else '?'}", file=sys.stderr)
    if args.report:
        records = store.records()
        written = write_report(records, Path(args.report), scale=100.0, digits=1)
        for path in written:
            print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
