"""Smoke test of the performance benchmarks: each script runs at the tiny shape and prints valid JSON.

No timing is asserted (timings at this size are noise); only that every script runs end to end and its
record carries the keys ``docs/performance.md`` reads. The torchrun and ``accelerate launch`` cases also
check that two gloo processes reproduce single-process statistics, through the commands the docs give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--shape", "tiny", "--repeats", "1", "--warmup", "0", "--batches", "2", "--threads", "1"]

CASES = {
    "calibration_overhead": [
        "ratio_calibration_vs_plain",
        "ratio_calibration_trainable_a_vs_plain",
        "ratio_peak_calibration_vs_train_step",
        "timings",
        "memory",
        "peak_gib",
    ],
    "stats_memory": [
        "base_params",
        "lora_b_numel",
        "ratio_full_fisher_vs_b_fisher",
        "ratio_full_fisher_vs_implemented_state",
    ],
    "vs_eva": ["eva_seconds", "fim_seconds", "ratio_eva_vs_fim", "timings"],
    "step_time": [
        "step_seconds",
        "trainable_params",
        "ratio_uniform_vs_fim",
        "ratio_adalora_vs_uniform",
        "end_to_end_extrapolated",
    ],
}


def _run(cmd: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, done.stdout[-2000:]
    return json.loads(lines[0])


@pytest.mark.parametrize("script", sorted(CASES))
def test_perf_script_prints_one_json_record(script: str, tmp_path: Path) -> None:
    jsonl = tmp_path / "out.jsonl"
    record = _run([sys.executable, "-m", f"bench.perf.{script}", *FAST, "--jsonl", str(jsonl)], tmp_path)
    assert record["benchmark"] == script
    assert record["shape"]["hidden"] == 64
    for key in CASES[script]:
        assert key in record["results"], key
    prov = record["provenance"]
    assert {"versions", "git", "python", "cpu_count"} <= set(prov)
    assert prov["versions"]["torch"]
    # --jsonl appends the very record printed on stdout.
    assert [json.loads(ln) for ln in jsonl.read_text().splitlines()] == [record]


def test_script_runs_as_a_file_too(tmp_path: Path) -> None:
    record = _run([sys.executable, str(ROOT / "bench/perf/stats_memory.py"), "--shape", "1.5b"], tmp_path)
    assert round(record["results"]["ratio_full_fisher_vs_b_fisher"]) == 497


CHECK = ["-m", "bench.perf.distributed_calibration", "--device", "cpu", "--shape", "tiny", "--threads", "1"]
CHECK += ["--check"]
LAUNCHERS = {
    # `python -m torch.distributed.run` is `torchrun`, without relying on PATH
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's --cpu launcher runs one process (several need MPI); its multi-process launcher is
    # torchrun underneath and, with --device cpu, the processes use gloo on a machine without a GPU
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes_match_single_process(launcher: str, tmp_path: Path) -> None:
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    record = _run([*LAUNCHERS[launcher], *CHECK], tmp_path)
    res = record["results"]
    assert res["world_size"] == 2 and res["num_batches"] == 8 and res["backend"] == "gloo"
    assert res["max_relative_difference"] <= 1e-6
    assert res["rank_maps_identical"] is True
