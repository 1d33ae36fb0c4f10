#!/usr/bin/env bash
# Full-length protocol, step 3: run the test grids (written by `python -m bench.studies.selection test-grid`) with two
# single-thread workers that share one queue (run claims) and go seed by seed, in the background.
# Resumable: run it again after an interruption; finished runs are skipped, a killed worker's claim is stale.
# Logs: out/workers/test_<n>.log. Report: python -m bench.studies.full_report --store bench/results/full/test --out docs/results/full --grid bench/grids/full/test*.yaml
set -euo pipefail
cd "$(dirname "$0")/../../.."
mkdir -p out/workers
grids=(--grid bench/grids/full/test.yaml --grid bench/grids/full/test_low.yaml)
# Issue 13's chosen variant (python -m bench.studies.confirm grid ...), once it has been chosen.
for g in bench/grids/full/test_variant*.yaml; do [[ -f $g ]] && grids+=(--grid "$g"); done
for worker in 1 2; do
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup .venv/bin/python -m bench.run "${grids[@]}" \
    --store bench/results/full/test --threads 1 --shared --seed-major >"out/workers/test_${worker}.log" 2>&1 &
  sleep 10  # the second worker starts after the first has claimed its run
done
echo "two workers started; logs in out/workers/"
