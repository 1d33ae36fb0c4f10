"""Benchmark harness: declarative grids, a crash-safe result store, provenance records, paired statistics.

Typical use::

    grid = ExperimentGrid.from_file("bench/grids/glue_small.yaml")
    store = ResultStore("out/glue_small")
    run_grid(grid.expand(), run_one, store)           # resumable: finished runs are skipped
    write_report(store.records(), "out/glue_small/report")

Nothing here imports torch on import; matplotlib, pyyaml and tqdm are imported lazily where used. Building a
spec or grid checks its method names against fimlora's method registry (:func:`known_methods`), which loads
fimlora's methods. File writes and provenance come from :mod:`fimlora.io`.
"""

from __future__ import annotations

from .aggregate import aggregate
from .experiment import METHOD_VARIANTS, ExperimentGrid, FrozenMapping, RunSpec, check_methods, known_methods
from .record import (
    RECORD_SCHEMA_VERSION,
    REPO_ROOT,
    UNKNOWN_COMMIT,
    commit_label,
    make_record,
    record_provenance,
)
from .report import to_markdown, write_report
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
from .tables import (
    METHOD_ORDER,
    Comparison,
    CostSummary,
    GroupRow,
    MethodSummary,
    ResultTable,
    TableProvenance,
)

__all__ = [
    "METHOD_ORDER",
    "METHOD_VARIANTS",
    "RECORD_SCHEMA_VERSION",
    "REPO_ROOT",
    "UNKNOWN_COMMIT",
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
    "check_methods",
    "classify_paired",
    "commit_label",
    "known_methods",
    "make_record",
    "mean_std",
    "paired_bootstrap_ci",
    "record_provenance",
    "run_grid",
    "sign_flip_permutation_pvalue",
    "to_markdown",
    "win_tie_loss",
    "write_report",
]
