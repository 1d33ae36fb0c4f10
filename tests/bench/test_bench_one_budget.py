"""bench.studies.one_budget: the table's cell for a refused budget is the one-line error, and the footer names the
fimlora source and versions that made it."""

from __future__ import annotations

from pathlib import Path

from bench.studies import one_budget


def test_a_refused_budget_is_reported_with_its_error_and_provenance(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    assert one_budget.main(["--methods", "uniform", "--out", str(out)]) == 0  # refused before loading: fast
    text = out.read_text()
    assert "| uniform | exit 2: fimlora: error: method 'uniform' does not use --budget-ranks" in text
    assert "does not use --budget-params" in text
    assert '"commit"' in text and '"peft"' in text and "python -m bench.studies.one_budget" in text
