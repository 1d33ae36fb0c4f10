"""Benchmark harness: declarative grids, a crash-safe result store, provenance records, paired statistics.

Typical use::

    grid = ExperimentGrid.from_file("bench/grids/glue_small.yaml")
    store = ResultStore("out/glue_small")
    run_grid(grid.expand(), run_one, store)           # resumable: finished runs are skipped
    write_report(store.records(), "out/glue_small/report")

Nothing here imports torch; matplotlib, pyyaml and tqdm are imported lazily where used.
"""

from __future__ import annotations

from .aggregate import (
    Comparison,
    CostSummary,
    GroupRow,
    MethodSummary,
    ResultTable,
    TableProvenance,
    aggregate,
    to_markdown,
    write_report,
)
from .experiment import KNOWN_METHODS, ExperimentGrid, FrozenMapping, RunSpec
from .record import git_info, make_record, package_versions
from .runner import GridSummary, RunOutcome, run_grid
from .stats import (
    WinTieLoss,
    classify_paired,
    mean_std,
    paired_bootstrap_ci,
    sign_flip_permutation_pvalue,
    win_tie_loss,
)
from .store import ResultStore

__all__ = [
    "KNOWN_METHODS",
    "Comparison",
    "CostSummary",
    "ExperimentGrid",
    "FrozenMapping",
    "GridSummary",
    "GroupRow",
    "MethodSummary",
    "ResultStore",
    "ResultTable",
    "RunOutcome",
    "RunSpec",
    "TableProvenance",
    "WinTieLoss",
    "aggregate",
    "classify_paired",
    "git_info",
    "make_record",
    "mean_std",
    "package_versions",
    "paired_bootstrap_ci",
    "run_grid",
    "sign_flip_permutation_pvalue",
    "to_markdown",
    "win_tie_loss",
    "write_report",
]
