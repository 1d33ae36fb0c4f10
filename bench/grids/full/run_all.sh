#!/usr/bin/env bash
# The rest of the full-length protocol, unattended: two single-thread workers share one queue. Each runs
# the variant grid (issue 13, dev split); when it finds nothing left to claim it makes the pre-declared
# choice once every variant run exists (the highest pooled dev accuracy, `bench.studies.variants report`), writes
# the chosen variant's test grid (`bench.studies.confirm grid`, which refuses a choice among unfinished variants),
# then runs the test grids, seed by seed. A worker that reaches the test grids before the choice exists
# runs them without the variant and goes round again once it does. Resumable: run it again after an
# interruption. Logs: out/workers/all_<n>.log. Reports: see docs/results/full/README.md.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/../../.."
mkdir -p out/workers
PY=.venv/bin/python
FULL=bench/grids/full
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

DONE=out/workers/choice.done  # exists once the choice is made and its grid (if any) written

choose() {
  # one worker at a time; both may get here, the second finds the choice made (or still refused)
  (
    flock 9
    [[ -f $DONE ]] && exit 0
    # The choice is written under out/ (untracked), not over the committed docs/results/full/variants.*: a
    # modified tracked file would mark every test record "dirty". Same command, same store, same choice:
    # rerun it with --out docs/results/full to publish.
    $PY -m bench.studies.variants report --store bench/results/full/variants --out out/workers/choice
    # refused (exit 2) while a variant run is still going: retried on the next round
    $PY -m bench.studies.confirm grid --choice out/workers/choice/variants.json \
      --selection docs/results/full/lr_selection.json --from $FULL/select_lr_0.001.yaml \
      --out $FULL/test_variant.yaml && touch $DONE
  ) 9>out/workers/choose.lock
}

worker() {
  local variants=()
  for g in "$FULL"/variants/*.yaml; do variants+=(--grid "$g"); done
  while true; do
    # (again after the first pass: a failed variant run is retried before the choice)
    $PY -m bench.run "${variants[@]}" --store bench/results/full/variants --threads 1 --shared --seed-major || true
    choose || true
    local chosen=no grids=(--grid $FULL/test.yaml --grid $FULL/test_low.yaml)
    [[ -f $DONE ]] && chosen=yes
    # the chosen variant's grid and, where it has one, its own shuffle control (test_variant_shuffled.yaml)
    for g in "$FULL"/test_variant*.yaml; do [[ -f $g ]] && grids+=(--grid "$g"); done
    $PY -m bench.run "${grids[@]}" --store bench/results/full/test --threads 1 --shared --seed-major || true
    [[ $chosen == yes ]] && break  # this round ran the test grid with the choice in it
    sleep 60  # the other worker is finishing the last variant run
  done
}

if [[ ${1:-} == --worker ]]; then
  worker
  exit 0
fi
for n in 1 2; do
  nohup bash "$SELF" --worker >"out/workers/all_${n}.log" 2>&1 &
  sleep 10  # the second worker starts after the first has claimed its run
done
echo "two workers started; logs in out/workers/all_<n>.log"
