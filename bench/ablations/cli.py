"""The command line of the ablations: ``python -m bench.ablations {stability,contribution,per-example} ...``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .module_contribution import contribution
from .per_example import per_example_stability
from .rank_stability import stability

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.ablations {stability,contribution,per-example} ...``."""
    parser = argparse.ArgumentParser(prog="python -m bench.ablations")
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stability", help="rank-map stability vs T; score type / aggregation agreement")
    st.add_argument("--task", default="trec6")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    st.add_argument("--out", type=Path, default=Path("docs/results/ablations"))
    co = sub.add_parser("contribution", help="score vs accuracy drop when a module's adapter is removed")
    co.add_argument("--task", default="trec6")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--out", type=Path, default=Path("docs/results/ablations"))
    pe = sub.add_parser(
        "per-example", help="batch vs per-example estimator: disjoint-set rank-map stability and time"
    )
    pe.add_argument("--tasks", nargs="+", default=["trec6", "sms_spam"])
    pe.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    pe.add_argument("--out", type=Path, default=Path("docs/results/ablations"))
    for p in (st, co, pe):
        p.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.cmd == "stability":
        stability(args.task, args.seeds, args.out)
    elif args.cmd == "per-example":
        per_example_stability(args.tasks, args.seeds, args.out)
    else:
        contribution(args.task, args.seed, args.out)
    return 0
