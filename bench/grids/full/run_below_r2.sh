#!/usr/bin/env bash
# Issue 13 below r2 (dev split): bench/grids/full/below_r2.yaml with two single-thread workers sharing one
# queue, in the background. Needs rank 0 (r_min = 0), so it runs on this checkout's code, not on the test
# grid's pin: pause or stop the pinned test workers first, so that the two have the cores to themselves.
# Resumable. Logs: out/workers/below_r2_<n>.log. Report:
#   .venv/bin/python -m bench.studies.below_r2 --store bench/results/full/below_r2 --variants bench/results/full/variants --out docs/results/full
set -euo pipefail
cd "$(dirname "$0")/../../.."
mkdir -p out/workers
for worker in 1 2; do
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup .venv/bin/python -m bench.run --grid bench/grids/full/below_r2.yaml \
    --store bench/results/full/below_r2 --threads 1 --shared --seed-major >"out/workers/below_r2_${worker}.log" 2>&1 &
  sleep 10  # the second worker starts after the first has claimed its run
done
echo "two workers started; logs in out/workers/below_r2_<n>.log"
