"""Command line of the planted-rank suite: run a grid into a resumable store, or write its report.

    python -m bench.planted run --store bench/results/planted_store [--patterns ...] [--budgets r1 r2 r4]
        [--seeds 0 1 2 3 4] [--methods ...] [--strength sparse=0.3 ...] [--set eval_split=dev ...]
        [--threads 1] [--dry-run]
    python -m bench.planted report --store bench/results/planted_store --out docs/results/planted

``run`` skips finished cells (``bench.harness.run_grid``), so an interrupted sweep resumes where it stopped;
``--dry-run`` prints the number of cells and how many are still to run. Methods default to every registered
method and the oracle.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from bench.harness import ResultStore, run_grid

from .patterns import PATTERNS
from .report import write_report
from .suite import DEFAULT_STRENGTHS, planted_specs, run_planted_spec

__all__ = ["main"]


def _pairs(items: list[str], kind: type) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = kind(value) if kind is not str else _scalar(value)
    return out


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.planted", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the grid's unfinished cells into the store")
    run.add_argument("--store", type=Path, required=True)
    run.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    run.add_argument("--budgets", nargs="+", default=["r1", "r2", "r4"])
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    run.add_argument("--methods", nargs="+", default=None, help="default: every registered method and oracle")
    run.add_argument("--strength", nargs="*", default=[], help=f"PATTERN=VALUE (default {DEFAULT_STRENGTHS})")
    run.add_argument("--set", nargs="*", default=[], dest="settings", help="cell setting KEY=VALUE")
    run.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: default 1)")
    run.add_argument("--dry-run", action="store_true", help="print the cell counts and stop")
    report = sub.add_parser("report", help="write results.md and ranks.png")
    report.add_argument("--store", type=Path, required=True)
    report.add_argument("--out", type=Path, required=True)
    report.add_argument(
        "--plot", nargs=3, default=["sparse", "r4", "0"], metavar=("PATTERN", "BUDGET", "SEED")
    )
    args = parser.parse_args(argv)
    command = "python -m bench.planted " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    store = ResultStore(args.store)
    if args.command == "report":
        path = write_report(
            store.records(),
            args.out,
            command=command,
            plot=(args.plot[0], args.plot[1], int(args.plot[2])),
            split=args.split,
        )
        print(path)
        return 0
    specs = planted_specs(
        patterns=args.patterns,
        budgets=args.budgets,
        seeds=args.seeds,
        methods=args.methods,
        strengths=_pairs(args.strength, float),
        settings=_pairs(args.settings, str),
    )
    pending = store.pending(specs)
    print(f"{len(specs)} cells, {len(pending)} to run", flush=True)
    if args.dry_run:
        return 0
    import torch

    from .cell import load_cell_data

    torch.set_num_threads(args.threads)
    data = load_cell_data()
    summary = run_grid(specs, lambda spec: run_planted_spec(spec, data), store, progress=True)
    print(f"completed {len(summary.completed)}, failed {len(summary.failed)}, skipped {len(summary.skipped)}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
