"""Reports of runs that compare methods: one renderer for ``fimlora demo`` and ``fimlora compare``.

* :mod:`~fimlora.report.document`: :class:`Report`, blocks rendered as ``report.md`` and a
  self-contained, responsive ``report.html``.
* :mod:`~fimlora.report.runs`: :func:`load_run` (a ``fimlora train`` directory as a :class:`RunRecord`)
  and :func:`compare_accuracy` (two methods paired by seed: the difference, its uncertainty and whether
  it is distinguishable from noise, as an :class:`AccuracyComparison` with a plain-language sentence).
* :mod:`~fimlora.report.sections`: :func:`write_comparison_report`, the page both commands write:
  conclusion first, then per-seed rows, what was run, rank maps, curves, timings and the command.
* :mod:`~fimlora.report.commands`: ``fimlora compare`` (:func:`compare_runs`) and ``fimlora plot``.
"""

from __future__ import annotations

from fimlora.report.commands import compare_runs, plot_outputs
from fimlora.report.document import Report, format_mean_std, markdown_table
from fimlora.report.runs import AccuracyComparison, RunRecord, compare_accuracy, load_run, method_label
from fimlora.report.sections import write_comparison_report

__all__ = [
    "AccuracyComparison",
    "Report",
    "RunRecord",
    "compare_accuracy",
    "compare_runs",
    "format_mean_std",
    "load_run",
    "markdown_table",
    "method_label",
    "plot_outputs",
    "write_comparison_report",
]
