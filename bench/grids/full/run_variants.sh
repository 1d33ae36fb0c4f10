#!/usr/bin/env bash
# Issue 13: run the variant grids (written by `python -m bench.studies.variants grids`) on the dev split with two
# single-thread workers sharing one queue (run claims), seed by seed, in the background. Resumable.
# Logs: out/workers/variants_<n>.log. Report: python -m bench.studies.variants report --store bench/results/full/variants --out docs/results/full
set -euo pipefail
cd "$(dirname "$0")/../../.."
mkdir -p out/workers
grids=()
for g in bench/grids/full/variants/*.yaml; do grids+=(--grid "$g"); done
for worker in 1 2; do
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup .venv/bin/python -m bench.run "${grids[@]}" \
    --store bench/results/full/variants --threads 1 --shared --seed-major >"out/workers/variants_${worker}.log" 2>&1 &
  sleep 10
done
echo "two workers started; logs in out/workers/"
