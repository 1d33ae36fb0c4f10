"""Unit tests of the benchmark harness (``bench/harness``): synthetic records only, no torch, fast."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.harness import (
    METHOD_ORDER,
    METHOD_VARIANTS,
    UNKNOWN_COMMIT,
    ExperimentGrid,
    ResultStore,
    RunSpec,
    WinTieLoss,
    aggregate,
    check_methods,
    commit_label,
    known_methods,
    make_record,
    mean_std,
    paired_bootstrap_ci,
    record_provenance,
    run_grid,
    sign_flip_permutation_pvalue,
    to_markdown,
    win_tie_loss,
    write_report,
)
from bench.harness import record as record_module  # noqa: E402
from fimlora.io import git_state

FAKE_GIT = {"commit": "a" * 40, "dirty": False}


@pytest.fixture(autouse=True)
def _fake_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records get a fixed commit: deterministic, and no git subprocess per synthetic record."""
    monkeypatch.setattr(record_module, "git_state", lambda repo=None: dict(FAKE_GIT))


def _spec(
    task: str = "sst2", method: str = "fim", budget: str = "r8", seed: int = 0, **overrides: Any
) -> RunSpec:
    return RunSpec("glue", task, "tiny-bert", method, budget, seed, overrides)


def _record(
    task: str,
    method: str,
    seed: int,
    acc: float,
    params: int = 1000,
    *,
    budget: str = "r8",
    calib: float = 0.0,
    train: float = 10.0,
    status: str = "ok",
    commit: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    record = make_record(
        _spec(task, method, budget, seed, **overrides),
        {"accuracy": acc},
        trainable_params=params,
        calibration_seconds=calib,
        train_seconds=train,
        peak_memory_bytes=None,
        device="cpu",
        status=status,
    )
    if commit is not None:
        record["provenance"]["git"] = {"commit": commit, "dirty": True}
    return record


# ----------------------------------------------------------------------------------------------------
# experiment.py


def test_run_id_is_sha1_of_canonical_json_with_readable_prefix() -> None:
    spec = RunSpec("glue", "sst2", "tiny-bert", "fim", "r8", 1, {"lr": 0.001, "alpha": 16})
    canonical = (
        '{"budget":"r8","method":"fim","model":"tiny-bert","overrides":{"alpha":16,"lr":0.001},'
        '"seed":1,"suite":"glue","task":"sst2"}'
    )
    expected = "sst2-fim-r8-s1-" + hashlib.sha1(canonical.encode()).hexdigest()[:8]
    assert spec.run_id == expected


def test_run_id_ignores_override_order_but_not_values() -> None:
    a = RunSpec("glue", "sst2", "m", "fim", "r8", 0, {"lr": 1e-3, "r_min": 2})
    b = RunSpec("glue", "sst2", "m", "fim", "r8", 0, {"r_min": 2, "lr": 1e-3})
    c = RunSpec("glue", "sst2", "m", "fim", "r8", 0, {"r_min": 4, "lr": 1e-3})
    assert a.run_id == b.run_id
    assert a == b and hash(a) == hash(b)
    assert a.run_id != c.run_id
    assert len({a, b, c}) == 2


def test_run_spec_overrides_are_frozen_and_round_trip() -> None:
    spec = RunSpec("glue", "sst2", "m", "fim", "r8", 0, {"targets": ["q", "v"], "sched": {"warmup": 10}})
    with pytest.raises(TypeError):
        spec.overrides["lr"] = 1.0  # type: ignore[index]
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.to_dict()["overrides"] == {"sched": {"warmup": 10}, "targets": ["q", "v"]}


def test_known_methods_are_fimlora_registry_plus_bench_variants() -> None:
    from fimlora.methods import available_methods

    assert known_methods() == set(available_methods()) | set(METHOD_VARIANTS)
    assert set(METHOD_VARIANTS.values()) <= set(available_methods())
    # The report's display order is a deliberate selection: every name in it must be a real method.
    assert set(METHOD_ORDER) <= known_methods()
    check_methods(["uniform", "fim-variance"], "methods")
    with pytest.raises(ValueError, match=r"`methods` has unknown method\(s\) \['fim_variance'\]"):
        check_methods(["uniform", "fim_variance"], "methods")


def test_record_provenance_keys_are_stable() -> None:
    # Old and new records must aggregate alike: the provenance block keeps its keys.
    prov = record_provenance()
    assert set(prov) == {"timestamp", "python", "platform", "versions", "git"}
    assert prov["git"] == FAKE_GIT  # the autouse fixture's commit, read through fimlora.io.git_state


def test_run_id_is_file_name_safe() -> None:
    run_id = RunSpec("glue", "glue/sst 2", "m", "fim", "r8", 0).run_id
    assert run_id.startswith("glue_sst_2-fim-r8-s0-")
    assert "/" not in run_id and " " not in run_id


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"method": "fim_variance"}, "method"), ({"seed": True}, "seed"), ({"task": ""}, "task")],
)
def test_run_spec_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    base: dict[str, Any] = {
        "suite": "glue",
        "task": "sst2",
        "model": "m",
        "method": "fim",
        "budget": "r8",
        "seed": 0,
    }
    with pytest.raises(ValueError, match=f"`{field}`"):
        RunSpec(**{**base, **kwargs})


def _grid_dict() -> dict[str, Any]:
    return {
        "suite": "glue",
        "models": ["tiny-bert"],
        "tasks": ["sst2", "rte"],
        "methods": ["uniform", "fim"],
        "budgets": ["r2", "r8"],
        "seeds": [0, 1, 2],
        "overrides": {"lr": 0.001},
        "method_overrides": {"fim": {"r_min": 2}},
    }


def test_grid_expand_is_cartesian_deterministic_and_method_innermost() -> None:
    specs = ExperimentGrid.from_dict(_grid_dict()).expand()
    assert len(specs) == 1 * 2 * 2 * 2 * 3
    assert len({s.run_id for s in specs}) == len(specs)
    assert [(s.task, s.budget, s.seed, s.method) for s in specs[:4]] == [
        ("sst2", "r2", 0, "uniform"),
        ("sst2", "r2", 0, "fim"),
        ("sst2", "r2", 1, "uniform"),
        ("sst2", "r2", 1, "fim"),
    ]
    assert specs[0].overrides == {"lr": 0.001}
    assert specs[1].overrides == {"lr": 0.001, "r_min": 2}
    assert [s.run_id for s in ExperimentGrid.from_dict(_grid_dict()).expand()] == [s.run_id for s in specs]


def test_grid_from_yaml_and_json_files_agree(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(_grid_dict()))
    (tmp_path / "g.json").write_text(json.dumps(_grid_dict()))
    from_yaml = ExperimentGrid.from_file(tmp_path / "g.yaml").expand()
    from_json = ExperimentGrid.from_file(tmp_path / "g.json").expand()
    assert [s.run_id for s in from_yaml] == [s.run_id for s in from_json]
    assert len(from_yaml) == 24


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"seeds": ["0"]}, "`seeds`"),
        ({"seeds": []}, "`seeds`"),
        ({"tasks": ["sst2", "sst2"]}, "`tasks`"),
        ({"methods": ["uniform", "fim_variance"]}, "`methods`"),
        ({"bogus": 1}, "bogus"),
        ({"method_overrides": {"eva": {"x": 1}}}, "`method_overrides`"),
    ],
)
def test_grid_validation_names_the_field(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ExperimentGrid.from_dict({**_grid_dict(), **change})


def test_grid_missing_field_is_named(tmp_path: Path) -> None:
    data = _grid_dict()
    del data["budgets"]
    (tmp_path / "g.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="budgets"):
        ExperimentGrid.from_file(tmp_path / "g.json")


# ----------------------------------------------------------------------------------------------------
# store.py


def test_store_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    record = _record("sst2", "fim", 0, 88.0)
    path = store.put(record)
    assert path == tmp_path / "runs" / f"{record['run_id']}.json"
    assert store.has(record["run_id"])
    assert store.get(record["run_id"]) == record
    assert store.records() == [record]
    with pytest.raises(KeyError):
        store.get("missing")


def test_store_crash_during_replace_leaves_no_visible_or_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ResultStore(tmp_path)
    kept = _record("sst2", "uniform", 0, 80.0)
    store.put(kept)
    before = sorted(p.name for p in store.runs_dir.iterdir())

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    new = _record("sst2", "fim", 0, 88.0)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(new)
    # Overwriting an existing record must also leave the old version intact.
    changed = {**kept, "metrics": {"accuracy": 1.0}}
    with pytest.raises(OSError, match="simulated crash"):
        store.put(changed)
    monkeypatch.undo()

    assert not store.has(new["run_id"])
    assert sorted(p.name for p in store.runs_dir.iterdir()) == before  # no temp file left either
    assert store.records() == [kept]


def test_store_skips_corrupt_file_with_warning_and_reruns_it(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    good = _record("sst2", "uniform", 0, 80.0)
    store.put(good)
    broken_spec = _spec("sst2", "fim", seed=0)
    (store.runs_dir / f"{broken_spec.run_id}.json").write_text('{"run_id": "trunc')
    (store.runs_dir / "list.json").write_text("[1, 2]")
    with pytest.warns(UserWarning) as caught:
        records = store.records()
    assert records == [good]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert broken_spec.run_id in messages[1] and "list.json" in messages[0]
    assert store.pending([broken_spec, _spec("sst2", "uniform", seed=0)]) == [broken_spec]


def test_pending_treats_failed_as_unfinished_and_dedupes(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    done, failed, new = _spec(seed=0), _spec(seed=1), _spec(seed=2)
    store.put(_record("sst2", "fim", 0, 80.0))
    store.put(_record("sst2", "fim", 1, 0.0, status="failed"))
    assert store.pending([done, failed, new, new]) == [failed, new]


# ----------------------------------------------------------------------------------------------------
# record.py


def test_make_record_carries_spec_and_provenance() -> None:
    spec = _spec(seed=3, lr=0.01)
    record = make_record(
        spec,
        {"accuracy": 91.5},
        trainable_params=1234,
        calibration_seconds=1.5,
        train_seconds=60.0,
        peak_memory_bytes=2**30,
        device="cpu",
        extra={"note": "x"},
    )
    assert record["run_id"] == spec.run_id
    assert record["spec"] == spec.to_dict()
    assert record["status"] == "ok" and record["error"] is None
    prov = record["provenance"]
    assert prov["git"] == FAKE_GIT
    assert prov["versions"]["numpy"] == np.__version__
    assert {"torch", "transformers", "peft"} <= set(prov["versions"])
    assert prov["timestamp"].endswith("+00:00")
    assert prov["python"] == sys.version.split()[0]
    json.dumps(record)  # must be serialisable as-is


def test_harness_never_imports_torch() -> None:
    import subprocess

    code = "import sys; import bench.harness as h; h.make_record; print('torch' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"trainable_params": -1}, "trainable_params"),
        ({"train_seconds": -0.1}, "train_seconds"),
        ({"status": "done"}, "status"),
        ({"metrics": {"accuracy": math.nan}}, "metrics.accuracy"),
    ],
)
def test_make_record_validation_names_the_argument(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "metrics": {"accuracy": 1.0},
        "trainable_params": 1,
        "calibration_seconds": 0.0,
        "train_seconds": 0.0,
        "peak_memory_bytes": None,
        "device": "cpu",
    }
    args.update(kwargs)
    metrics = args.pop("metrics")
    with pytest.raises(ValueError, match=f"`{field}`"):
        make_record(_spec(), metrics, **args)


def test_git_state_outside_a_repository_is_unknown(tmp_path: Path) -> None:
    # The autouse fixture patched the module attribute; the real function is still what we imported.
    # fimlora.io writes an unreadable commit as None (bench's own copy wrote "unknown").
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_git_state_prefers_the_recorded_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy of the tree sent to another machine may have no .git, or a stale one; remote_prepare.sh
    # records the commit, and it wins over whatever git says there.
    monkeypatch.setenv("FIMLORA_GIT_COMMIT", "abc123")
    monkeypatch.setenv("FIMLORA_GIT_DIRTY", "0")
    assert git_state() == {"commit": "abc123", "dirty": False}
    monkeypatch.setenv("FIMLORA_GIT_DIRTY", "1")
    assert git_state(tmp_path) == {"commit": "abc123", "dirty": True}
    monkeypatch.setenv("FIMLORA_GIT_DIRTY", "maybe")
    assert git_state(tmp_path) == {"commit": "abc123", "dirty": None}


# ----------------------------------------------------------------------------------------------------
# runner.py


def _outcome(acc: float) -> dict[str, Any]:
    return {"metrics": {"accuracy": acc}, "trainable_params": 100, "device": "cpu", "train_seconds": 1.0}


def test_run_grid_resumes_and_retries_failures(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    specs = [_spec(seed=s) for s in range(4)]
    calls: list[int] = []

    def flaky(spec: RunSpec) -> dict[str, Any]:
        calls.append(spec.seed)
        if spec.seed == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return _outcome(80.0 + spec.seed)

    summary = run_grid(specs, flaky, store, progress=False)
    assert calls == [0, 1, 2, 3]
    assert summary.failed == [specs[2].run_id]
    assert len(summary.completed) == 3
    failed = store.get(specs[2].run_id)
    assert failed["status"] == "failed"
    assert "CUDA out of memory (simulated)" in failed["error"]
    assert "Traceback" in failed["error"]
    assert store.get(specs[3].run_id)["metrics"] == {"accuracy": 83.0}

    calls.clear()
    summary = run_grid(specs, flaky, store, progress=False)
    assert calls == [2]  # only the failed run is retried
    assert sorted(summary.skipped) == sorted(s.run_id for s in specs if s.seed != 2)

    def fixed(spec: RunSpec) -> dict[str, Any]:
        calls.append(spec.seed)
        return _outcome(1.0)

    calls.clear()
    run_grid(specs, fixed, store, progress=False)
    assert calls == [2]
    assert store.get(specs[2].run_id)["status"] == "ok"  # the retry replaced the failed record
    calls.clear()
    run_grid(specs, fixed, store, progress=False)
    assert calls == []  # everything finished: zero calls


def test_run_grid_with_progress_bar_records_every_run(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    specs = [_spec(seed=s) for s in range(3)]
    summary = run_grid(specs, lambda spec: _outcome(50.0), store, progress=True)
    assert summary.completed == [s.run_id for s in specs]
    assert [r["metrics"]["accuracy"] for r in store.records()] == [50.0, 50.0, 50.0]


def test_run_grid_stop_on_error_reraises_after_recording(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    specs = [_spec(seed=0), _spec(seed=1)]

    def boom(spec: RunSpec) -> dict[str, Any]:
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        run_grid(specs, boom, store, stop_on_error=True, progress=False)
    assert store.get(specs[0].run_id)["status"] == "failed"
    assert not store.has(specs[1].run_id)


def test_run_grid_malformed_outcome_is_a_failed_run(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    spec = _spec()
    run_grid([spec], lambda s: {"metrics": {"accuracy": 1.0}}, store, progress=False)
    record = store.get(spec.run_id)
    assert record["status"] == "failed"
    assert "trainable_params" in record["error"]


def test_keyboard_interrupt_propagates_without_record(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    specs = [_spec(seed=0), _spec(seed=1)]

    def interrupted(spec: RunSpec) -> dict[str, Any]:
        if spec.seed == 1:
            raise KeyboardInterrupt
        return _outcome(80.0)

    with pytest.raises(KeyboardInterrupt):
        run_grid(specs, interrupted, store, progress=False)
    assert store.get(specs[0].run_id)["status"] == "ok"
    assert not store.has(specs[1].run_id)
    assert [p.name for p in store.runs_dir.iterdir()] == [f"{specs[0].run_id}.json"]


def test_claims_exclude_a_live_holder_and_are_taken_over_when_stale(tmp_path: Path) -> None:
    import subprocess

    store = ResultStore(tmp_path)
    assert store.claim("run-a") is True
    assert store.claim("run-a") is False  # held by a live process (this one)
    store.release("run-a")
    assert store.claim("run-a") is True
    store.release("run-a")
    claims = tmp_path / "claims"
    # a live process of this host holds it: not ours to take, and not ours to release
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from bench.harness.store import _process_identity

        (claims / "run-b.json").write_text(json.dumps(_process_identity(child.pid)))
        assert store.claim("run-b") is False
        store.release("run-b")
        assert (claims / "run-b.json").exists()
    finally:
        child.kill()
        child.wait()
    assert store.claim("run-b") is True  # its holder is gone: stale, taken over
    # made on another host (an earlier session's machine), or unreadable: stale
    (claims / "run-c.json").write_text(json.dumps({"host": "elsewhere", "pid": os.getpid(), "start": 0}))
    assert store.claim("run-c") is True
    (claims / "run-d.json").write_text("{half")
    assert store.claim("run-d") is True


def _finish_elsewhere(store: ResultStore, spec: RunSpec) -> None:
    """Another worker stores ``spec``'s record (accuracy 9.0)."""
    store.put(
        make_record(
            spec,
            {"accuracy": 9.0},
            trainable_params=1,
            calibration_seconds=0,
            train_seconds=0,
            peak_memory_bytes=None,
            device="cpu",
        )
    )


def test_shared_run_grid_skips_runs_claimed_or_finished_by_another_worker(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    specs = [_spec(seed=s) for s in range(4)]
    calls: list[int] = []

    def run(spec: RunSpec) -> dict[str, Any]:
        calls.append(spec.seed)
        if spec.seed == 1:  # meanwhile another worker finishes seed 2, after our pending() read
            _finish_elsewhere(store, specs[2])
        return _outcome(80.0)

    assert store.claim(specs[0].run_id)  # a live worker (here: this process) holds seed 0
    summary = run_grid(specs, run, store, progress=False, shared=True)
    assert calls == [1, 3]
    assert sorted(summary.skipped) == sorted([specs[0].run_id, specs[2].run_id])
    assert not store.has(specs[0].run_id) and store.get(specs[2].run_id)["metrics"] == {"accuracy": 9.0}
    store.release(specs[0].run_id)
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == []  # every claim released


def test_shared_progress_counts_only_this_workers_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without tqdm the runner prints one line per run; a run another worker holds or has finished leaves
    # the total instead of counting as done (else the rate and time left would count other workers' runs).
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the printed fallback
    store = ResultStore(tmp_path)
    specs = [_spec(seed=s) for s in range(4)]

    def run(spec: RunSpec) -> dict[str, Any]:
        if spec.seed == 1:  # another worker finishes seed 2 meanwhile
            _finish_elsewhere(store, specs[2])
        return _outcome(80.0)

    assert store.claim(specs[0].run_id)  # held by a live worker
    run_grid(specs, run, store, progress=True, shared=True)
    store.release(specs[0].run_id)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[1/3] {specs[1].run_id}", f"[2/2] {specs[3].run_id}"]


def test_progress_bar_total_shrinks_with_skipped_runs() -> None:
    pytest.importorskip("tqdm")
    from bench.harness.runner import _Progress

    reporter = _Progress(4, enabled=True)
    reporter.start("a")
    reporter.finish()
    reporter.skip()
    assert (reporter._bar.n, reporter._bar.total) == (1, 3)
    reporter.close()


# ----------------------------------------------------------------------------------------------------
# stats.py


def test_mean_std_uses_sample_std_and_nan_for_one_value() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5.0 / 3.0))  # sum sq dev = 5, ddof = 1
    mean, std = mean_std([7.0])
    assert mean == 7.0 and math.isnan(std)
    with pytest.raises(ValueError, match="`values`"):
        mean_std([])


def test_bootstrap_ci_covers_true_difference_and_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    b = rng.normal(80.0, 5.0, size=8)  # baseline noise is shared by the pair and cancels
    true_diff = 2.0
    a = b + true_diff + rng.normal(0.0, 0.2, size=8)
    mean_diff, low, high = paired_bootstrap_ci(a, b, n_boot=5000, seed=0)
    assert mean_diff == pytest.approx(float(np.mean(a - b)))
    assert low < true_diff < high
    assert low > 0.0
    # Unpaired noise of 5 points would swamp a 2-point effect; pairing is what makes the CI narrow.
    assert high - low < 1.0


def test_bootstrap_ci_straddles_zero_for_symmetric_differences() -> None:
    a = np.array([1.0, -1.0, 2.0, -2.0, 0.5, -0.5])
    mean_diff, low, high = paired_bootstrap_ci(a, np.zeros(6), seed=0)
    assert mean_diff == 0.0
    assert low < 0.0 < high


def test_bootstrap_ci_undefined_for_one_pair() -> None:
    mean_diff, low, high = paired_bootstrap_ci([3.0], [1.0])
    assert mean_diff == 2.0 and math.isnan(low) and math.isnan(high)


def test_bootstrap_ci_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        # Sums of the 8 sign patterns of (1, 2, 3): 6, 4, 2, 0, 0, -2, -4, -6.
        ([1.0, 2.0, 3.0], 2 / 8),  # |sum| >= 6: the observed pattern and its mirror
        ([1.0, -2.0, 3.0], 6 / 8),  # |sum| >= 2: all but the two zero sums
        ([0.0, 0.0], 1.0),
        ([1.0, 1.0, 1.0, 1.0], 2 / 16),
    ],
)
def test_sign_flip_pvalue_is_exact_for_small_n(diffs: list[float], expected: float) -> None:
    b = [10.0] * len(diffs)
    a = [10.0 + d for d in diffs]
    assert sign_flip_permutation_pvalue(a, b) == pytest.approx(expected, abs=1e-12)


def test_sign_flip_pvalue_monte_carlo_for_large_n() -> None:
    a = np.full(20, 1.0)
    p = sign_flip_permutation_pvalue(a, np.zeros(20), n_perm=2000, seed=0)
    # Exact p is 2 / 2^20; Monte Carlo can only say it is at most about 1 / (1 + n_perm).
    assert 1 / 2001 <= p <= 3 / 2001
    noisy = np.random.default_rng(0).normal(size=20)
    p_noise = sign_flip_permutation_pvalue(noisy - noisy.mean(), np.zeros(20), n_perm=2000, seed=0)
    assert p_noise > 0.9  # mean exactly zero: nearly every flip is at least as extreme


def test_win_tie_loss_counts() -> None:
    baseline = {"win": [80.0, 81.0, 82.0], "loss": [80.0, 81.0, 82.0], "tie": [80.0, 81.0, 82.0]}
    baseline["single"] = [80.0]
    method = {
        "win": [83.0, 84.1, 84.9],
        "loss": [77.0, 78.2, 78.9],
        "tie": [81.0, 80.0, 82.5],
        "single": [99.0],  # one seed cannot support a verdict
    }
    assert win_tie_loss(method, baseline) == WinTieLoss(wins=1, ties=2, losses=1)
    # A margin wider than the 'win' effect (~3 points) turns it into a tie.
    assert win_tie_loss(method, baseline, tol=5.0) == WinTieLoss(0, 4, 0)
    with pytest.raises(ValueError, match="same tasks"):
        win_tie_loss({"a": [1.0]}, {"b": [1.0]})


def test_win_tie_loss_direction_swaps_wins_and_losses() -> None:
    baseline = {"t1": [1.0, 1.1, 1.2], "t2": [1.0, 1.1, 1.2], "t3": [1.0, 1.1, 1.2]}
    method = {"t1": [0.5, 0.6, 0.7], "t2": [0.4, 0.6, 0.7], "t3": [2.0, 2.1, 2.3]}
    assert win_tie_loss(method, baseline) == WinTieLoss(1, 0, 2)
    assert win_tie_loss(method, baseline, higher_is_better=False) == WinTieLoss(2, 0, 1)


# ----------------------------------------------------------------------------------------------------
# aggregate.py


def _synthetic_records() -> list[dict[str, Any]]:
    """One task, budget r8, three seeds; hand-computed statistics are in the tests below."""
    records = []
    for seed, (u, f, l1) in enumerate([(80.0, 83.0, 79.0), (82.0, 84.0, 80.0), (84.0, 88.0, 82.0)]):
        records.append(_record("sst2", "uniform", seed, u, 1000, calib=0.0, train=10.0))
        records.append(_record("sst2", "fim", seed, f, 1010, calib=2.0 + seed, train=12.0))
        records.append(_record("sst2", "l1ra", seed, l1, 1100, train=15.0, commit="b" * 40))
    records.append(_record("sst2", "fim", 0, 70.0, 1000, r_min=2))  # an ablation: its own row
    records.append(_record("sst2", "fim", 5, 0.0, status="failed"))
    return records


def test_aggregate_group_rows_match_hand_computation() -> None:
    table = aggregate(_synthetic_records())
    rows = {row.method: row for row in table.rows}
    assert [row.method for row in table.rows] == ["uniform", "fim", "fim[r_min=2]", "l1ra"]

    uniform, fim, l1ra = rows["uniform"], rows["fim"], rows["l1ra"]
    assert uniform.seeds == (0, 1, 2) and uniform.n == 3
    assert uniform.mean == pytest.approx(82.0)
    assert uniform.std == pytest.approx(2.0)  # deviations -2, 0, 2: sqrt(8 / 2)
    assert fim.mean == pytest.approx(85.0)
    assert fim.std == pytest.approx(math.sqrt(7.0))  # deviations -2, -1, 3: sqrt(14 / 2)
    assert fim.params_mean == 1010.0
    assert fim.param_ratio == pytest.approx(1.01) and not fim.param_flag
    assert l1ra.param_ratio == pytest.approx(1.10) and l1ra.param_flag
    assert uniform.param_ratio == 1.0 and not uniform.param_flag
    assert fim.calibration_seconds == pytest.approx(3.0)  # (2 + 3 + 4) / 3
    assert fim.train_seconds == pytest.approx(12.0)
    assert rows["fim[r_min=2]"].n == 1 and math.isnan(rows["fim[r_min=2]"].std)


def test_aggregate_comparisons_and_summary() -> None:
    table = aggregate(_synthetic_records())
    comps = {c.method: c for c in table.comparisons}
    assert set(comps) == {"fim", "fim[r_min=2]", "l1ra"}
    fim = comps["fim"]
    assert fim.baseline == "uniform" and fim.n_pairs == 3
    assert fim.mean_diff == pytest.approx(3.0)  # diffs 3, 2, 4
    assert 2.0 <= fim.ci_low <= fim.mean_diff <= fim.ci_high <= 4.0
    assert fim.p_value == pytest.approx(2 / 8)  # all three positive: exact two-sided p
    assert fim.verdict == "win"
    assert comps["l1ra"].mean_diff == pytest.approx(-5.0 / 3.0)  # diffs -1, -2, -2
    assert comps["l1ra"].verdict == "loss"
    # One pair: difference and CI are reported, but no verdict, and it is not counted.
    assert comps["fim[r_min=2]"].n_pairs == 1 and comps["fim[r_min=2]"].verdict == "n/a"
    summary = {(s.method, s.wins, s.ties, s.losses) for s in table.summary}
    assert summary == {("fim", 1, 0, 0), ("fim[r_min=2]", 0, 0, 0), ("l1ra", 0, 0, 1)}


def test_pooled_comparison_pairs_every_task_and_seed() -> None:
    records = _synthetic_records()
    # A second task where fim loses by 1 on seeds 0 and 1 (seed 2 of fim missing: not paired).
    for seed, (u, f) in enumerate([(70.0, 69.0), (71.0, 70.0), (72.0, None)]):
        records.append(_record("mnli", "uniform", seed, u))
        if f is not None:
            records.append(_record("mnli", "fim", seed, f))
    records.append(_record("mnli", "uniform", 0, 90.0, budget="r2"))  # another budget: pooled apart
    records.append(_record("mnli", "fim", 0, 91.0, budget="r2"))
    table = aggregate(records)
    pooled = {(c.budget, c.method): c for c in table.pooled}
    fim = pooled[("r8", "fim")]
    assert (fim.n_tasks, fim.n_pairs, fim.baseline) == (2, 5, "uniform")
    assert fim.mean_diff == pytest.approx((3 + 2 + 4 - 1 - 1) / 5)
    assert fim.ci_low <= fim.mean_diff <= fim.ci_high
    # 5 pairs, |d| = 3, 2, 4, 1, 1 (total 11), observed sum 7: a sign pattern reaches |sum| >= 7 when the
    # magnitudes it flips add up to <= 2 ({}, {1}, {1'}, {1, 1'}, {2}) or >= 9 (their complements): 10 of 32.
    assert fim.p_value == pytest.approx(10 / 32)
    assert pooled[("r2", "fim")].n_pairs == 1 and pooled[("r2", "fim")].mean_diff == pytest.approx(1.0)
    assert ("r8", "fim[r_min=2]") in pooled and pooled[("r8", "l1ra")].n_tasks == 1


def test_labels_show_only_settings_that_differ_from_the_usual_one() -> None:
    # Every record sets calibration_batches; an ablation changes it for fim on one task. Only the
    # ablation's label shows it, and it is compared with the (unlabelled) uniform baseline.
    records = [
        _record("sst2", method, seed, acc, calibration_batches=8)
        for seed in range(3)
        for method, acc in (("uniform", 80.0 + seed), ("fim", 81.0 + seed))
    ]
    records += [_record("sst2", "fim", seed, 79.0 + seed, calibration_batches=32) for seed in range(3)]
    table = aggregate(records)
    assert [row.method for row in table.rows] == ["uniform", "fim", "fim[calibration_batches=32]"]
    comps = {c.method: c for c in table.comparisons}
    assert comps["fim[calibration_batches=32]"].baseline == "uniform"
    assert comps["fim[calibration_batches=32]"].mean_diff == pytest.approx(-1.0)


def test_ablation_rows_sort_numerically() -> None:
    records = [
        _record("sst2", "fim", seed, 80.0, calibration_batches=t) for seed in range(2) for t in (16, 1, 8, 2)
    ]
    records += [_record("sst2", "uniform", seed, 80.0, calibration_batches=8) for seed in range(2)]
    assert [row.method for row in aggregate(records).rows] == [
        "uniform",
        "fim",  # T = 8, the usual value, is unlabelled
        "fim[calibration_batches=1]",
        "fim[calibration_batches=2]",
        "fim[calibration_batches=16]",
    ]


def test_costs_pool_tasks_and_compare_on_the_same_tasks() -> None:
    records = []
    for seed in range(3):
        for task, train in (("a", 10.0), ("b", 20.0)):
            records.append(
                _record(task, "uniform", seed, 80.0, calib=0.0, train=train, calibration_batches=8)
            )
            records.append(_record(task, "fim", seed, 80.0, calib=1.0, train=train, calibration_batches=8))
        # an ablation run on task a only, and a method on a task the baseline never ran
        records.append(_record("a", "fim", seed, 80.0, calib=4.0, train=10.0, calibration_batches=32))
        records.append(_record("c", "eva", seed, 80.0, calib=2.0, train=5.0, calibration_batches=8))
    table = aggregate(records)
    costs = {c.method: c for c in table.costs}
    assert list(costs) == ["uniform", "fim", "fim[calibration_batches=32]", "eva"]
    assert (costs["fim"].n_tasks, costs["fim"].n_runs) == (2, 6)
    assert costs["fim"].calibration_seconds == pytest.approx(1.0)
    assert costs["fim"].train_seconds == pytest.approx(15.0)
    assert costs["fim"].total_ratio == pytest.approx(16.0 / 15.0)
    assert costs["uniform"].total_ratio == pytest.approx(1.0)
    # compared with uniform on task a (10 s), not on both tasks (15 s)
    assert costs["fim[calibration_batches=32]"].total_ratio == pytest.approx(14.0 / 10.0)
    assert costs["eva"].total_ratio is None
    markdown = to_markdown(table)
    assert "## Cost pooled over tasks" in markdown
    assert "| glue | tiny-bert | r8 | fim | 2 | 6 | 1.00 | 15.00 | 16.00 | 1.07 |" in markdown


def test_aggregate_gives_no_verdict_below_min_pairs() -> None:
    # fim beats uniform on all 3 seeds: a win with 3 pairs, no verdict when 4 are required.
    assert {c.method: c.verdict for c in aggregate(_synthetic_records(), min_pairs=3).comparisons}[
        "fim"
    ] == "win"
    table = aggregate(_synthetic_records(), min_pairs=4)
    assert {c.method: c.verdict for c in table.comparisons}["fim"] == "n/a"
    assert all(s.wins + s.ties + s.losses == 0 for s in table.summary)
    with pytest.raises(ValueError, match="min_pairs"):
        aggregate(_synthetic_records(), min_pairs=0)


def test_aggregate_provenance_counts_records_and_commits() -> None:
    table = aggregate(_synthetic_records())
    assert table.provenance.n_records == 10
    assert table.provenance.n_skipped == 1  # the failed run
    assert table.provenance.git_commits == ("a" * 40, "b" * 40 + "+dirty")


def test_commit_label_reads_old_and_new_missing_commits_alike() -> None:
    # Records written by bench's own git helper said "unknown"; fimlora.io.git_state says None.
    assert commit_label({"commit": None, "dirty": None}) == UNKNOWN_COMMIT == "unknown"
    assert commit_label({"commit": "unknown", "dirty": None}) == UNKNOWN_COMMIT
    assert commit_label(None) == commit_label({}) == UNKNOWN_COMMIT
    assert commit_label({"commit": None, "dirty": True}) == "unknown+dirty"
    assert commit_label({"commit": "c" * 40, "dirty": True}, short=True) == "c" * 12 + "+dirty"
    assert commit_label({"commit": "c" * 40, "dirty": False}) == "c" * 40


def test_old_and_new_records_without_a_commit_aggregate_to_the_same_report() -> None:
    def with_commit(commit: str | None) -> list[dict[str, Any]]:
        records = _synthetic_records()
        for record in records:
            record["provenance"]["git"] = {"commit": commit, "dirty": False}
        return records

    old, new = aggregate(with_commit("unknown")), aggregate(with_commit(None))
    assert old.provenance.git_commits == new.provenance.git_commits == ("unknown",)
    assert to_markdown(old) == to_markdown(new)


def test_aggregate_lower_is_better_flips_verdicts() -> None:
    table = aggregate(_synthetic_records(), higher_is_better=False)
    verdicts = {c.method: c.verdict for c in table.comparisons}
    assert verdicts["fim"] == "loss" and verdicts["l1ra"] == "win"


def test_aggregate_skips_records_without_the_metric() -> None:
    records = _synthetic_records()
    with pytest.warns(UserWarning, match="f1"):
        table = aggregate(records[:1], metric="f1")
    assert table.rows == () and table.provenance.n_skipped == 1


def test_aggregate_rejects_duplicate_seed_in_a_group() -> None:
    records = _synthetic_records()
    dup = json.loads(json.dumps(records[0]))
    dup["run_id"] = "copy"
    with pytest.raises(ValueError, match="copy"):
        aggregate([*records, dup])


def test_markdown_has_formatted_cells_flags_and_provenance() -> None:
    md = to_markdown(aggregate(_synthetic_records()))
    assert "| glue | tiny-bert | sst2 | r8 | uniform | 3 | 82.00 ± 2.00 | 1,000 | 1.000 |" in md
    assert "| fim | 3 | 85.00 ± 2.65 | 1,010 | 1.010 | 3.0 | 12.0 |" in md
    assert "| l1ra | 3 | 80.33 ± 1.53 | 1,100 | 1.100 ⚠ off-budget |" in md
    assert "| fim[r_min=2] | 1 | 70.00 | 1,000 | 1.000 |" in md  # one seed: no ± part
    assert "| fim | 3 | +3.00 | [+2." in md
    assert "| 0.25 | win |" in md
    assert "| fim | 1 | 0 | 0 |" in md
    assert "| l1ra | 0 | 0 | 1 |" in md
    assert md.count("_Built from 10 records (1 skipped") == 5  # one provenance line per table (5 tables)
    assert "## Pooled over tasks vs `uniform`" in md
    assert "| glue | tiny-bert | r8 | fim | 1 | 3 | +3.00 |" in md
    assert f"`{'a' * 12}`" in md and f"`{'b' * 12}+dirty`" in md
    scaled = to_markdown(aggregate(_synthetic_records()), scale=0.01, digits=4)
    assert "0.8200 ± 0.0200" in scaled


def test_write_report_writes_markdown_and_one_chart_per_budget(tmp_path: Path) -> None:
    records = _synthetic_records()
    records += [_record("sst2", m, s, 70.0 + s, budget="r2") for m in ("uniform", "fim") for s in range(2)]
    paths = write_report(records, tmp_path / "report")
    names = [p.name for p in paths]
    assert names[0] == "results.md"
    assert "85.00 ± 2.65" in paths[0].read_text(encoding="utf-8")
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert names[1:] == ["results_r2.png", "results_r8.png"]
        for path in paths[1:]:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_worker_stamps_records_with_the_commit_it_started_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records name the code the worker imported, not the HEAD of the moment each record is written."""
    import bench.run as bench_run
    import fimlora.io as fimlora_io
    from bench.harness.record import record_provenance

    monkeypatch.setenv("FIMLORA_GIT_COMMIT", "")  # unset for the worker; restored after the test
    monkeypatch.setenv("FIMLORA_GIT_DIRTY", "")
    monkeypatch.setattr(bench_run, "git_state", lambda repo=None, **_: {"commit": "a" * 40, "dirty": False})
    bench_run.pin_code_version()
    monkeypatch.setattr(fimlora_io, "_git", lambda *args: "b" * 40)  # HEAD moves on while the worker runs
    assert record_provenance()["git"] == {"commit": "a" * 40, "dirty": False}


def test_the_pinned_dirty_flag_is_about_code_not_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report rewritten in the working tree while a grid runs does not mark its records dirty; code does."""
    import subprocess

    import bench.run as bench_run
    from fimlora.io import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    for name in ("src/a.py", "docs/r.md", "bench/b.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.delenv("FIMLORA_GIT_COMMIT", raising=False)
    (tmp_path / "docs/r.md").write_text("rewritten\n")
    (tmp_path / "src/new_untracked.py").write_text("y\n")
    assert git_state(tmp_path)["dirty"] is True  # the whole tree: the report counts
    assert git_state(tmp_path, paths=bench_run.CODE_PATHS)["dirty"] is False
    (tmp_path / "bench/b.py").write_text("changed\n")
    assert git_state(tmp_path, paths=bench_run.CODE_PATHS)["dirty"] is True
