"""Grid progress: finished runs counted per seed and task, and the estimate of what is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import ResultStore, RunSpec
from bench.progress import estimate_seconds, format_progress, grid_progress, main


def _spec(task: str, method: str = "fim", budget: str = "r8", seed: int = 0) -> RunSpec:
    return RunSpec(suite="encoder", task=task, model="minilm", method=method, budget=budget, seed=seed)


def _record(spec: RunSpec, wall: float, status: str = "ok") -> dict:
    return {"run_id": spec.run_id, "status": status, "spec": spec.to_dict(), "extra": {"wall_seconds": wall}}


def test_estimate_takes_the_most_alike_finished_runs() -> None:
    done = [
        (_spec("a", "fim", "r8"), 100.0),
        (_spec("a", "fim", "r2"), 50.0),
        (_spec("a", "uniform", "r8"), 10.0),
        (_spec("b", "uniform", "r8"), 1000.0),
    ]
    assert estimate_seconds(_spec("a", "fim", "r8", seed=1), done) == 100.0  # task, method, budget
    assert estimate_seconds(_spec("a", "fim", "r4"), done) == 75.0  # task and method: median of 100, 50
    assert estimate_seconds(_spec("a", "eva", "r8"), done) == 50.0  # task: median of 100, 50, 10
    assert estimate_seconds(_spec("c", "eva", "r8"), done) == 75.0  # anything: median of all four
    assert estimate_seconds(_spec("c"), []) is None


def test_counts_per_seed_and_task_and_a_failed_run_is_pending() -> None:
    specs = [_spec(t, m, seed=s) for s in (0, 1) for t in ("a", "b") for m in ("fim", "uniform")]
    records = [
        _record(specs[0], 100.0),  # a fim s0
        _record(specs[1], 300.0),  # a uniform s0
        _record(specs[2], 40.0, status="failed"),  # b fim s0: retried, so pending
        _record(_spec("z"), 5.0),  # another grid's run in the same store: not counted, not timed
    ]
    p = grid_progress(specs + specs[:1], records)  # a repeated spec is one run
    assert (p.total, p.finished) == (8, 2)
    assert p.per_seed == {0: (2, 4), 1: (0, 4)}
    assert p.per_task["a"] == (2, 4, 200.0)
    assert p.per_task["b"] == (0, 4, None)
    assert set(p.pending_seconds) == {s.run_id for s in specs[2:]}
    assert p.pending_seconds[specs[4].run_id] == 100.0  # a fim s1, like a fim s0
    assert p.pending_seconds[specs[3].run_id] == 200.0  # b uniform s0: no b run done, median of all
    assert p.left_seconds == pytest.approx(200 + 200 + 100 + 300 + 200 + 200)
    assert p.seed_left_seconds == {0: 400.0, 1: 800.0}


def test_the_report_divides_by_workers_and_says_when_it_cannot_estimate() -> None:
    specs = [_spec("a", seed=s) for s in (0, 1, 2)]
    text = format_progress(grid_progress(specs, [_record(specs[0], 3600.0)]), workers=2)
    assert "3 runs: 1 finished, 2 pending" in text
    assert "seeds: 0: 1/1, 1: 0/1, 2: 0/1" in text
    assert "about 2.0 core-hours, 1.0 h on 2 worker(s)" in text
    assert "seed 1's: about 0.5 h on 2 worker(s)" in text
    assert "no estimate" in format_progress(grid_progress(specs, []))
    assert "nothing left" in format_progress(grid_progress(specs[:1], [_record(specs[0], 1.0)]))
    with pytest.raises(ValueError, match="workers"):
        format_progress(grid_progress(specs, []), workers=0)


def test_main_reads_grid_files_and_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(
        "suite: encoder\nmodels: [minilm]\ntasks: [a, b]\nmethods: [uniform]\nbudgets: [r8]\nseeds: [0, 1]\n"
    )
    store = ResultStore(tmp_path / "store")
    store.put(_record(_spec("a", "uniform"), 360.0))
    assert main(["--grid", str(grid), "--store", str(store.root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 1 finished, 3 pending" in out
    assert "about 0.3 core-hours" in out  # 3 runs x 360 s
    with pytest.raises(SystemExit) as exc:
        main(["--grid", str(grid), "--store", str(store.root), "--workers", "0"])
    assert exc.value.code == 2
