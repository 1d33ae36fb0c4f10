#!/usr/bin/env bash
# The GPU checks of issues 5 and 6 as one prepared run for a short GPU lease (a machine with torch and
# transformers but no registry access). Prepare here first: `bash scripts/remote_prepare.sh` (fills
# .remote/), then run this there from the repository root with .remote carried. Each step has its own
# time limit and appends to files under $OUT, so a step that fails or runs long costs only itself:
#   $OUT/log.txt               everything printed, with each step's exit code and the elapsed time
#   $OUT/perf.jsonl            one record per bench/perf run (issue 6)
#   $OUT/gpu_reduced_store.tgz bench/grids/gpu_reduced.yaml records (issue 5), in seed order per worker
# FIMLORA_REMOTE_SECONDS (default 570) is the whole run's budget; the grid gets what the perf steps leave.
# FIMLORA_REMOTE_PLAN=remaining runs only the GPU measurements issue 6 still lacks (then the grid).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/remote}"
mkdir -p "$OUT"
budget="${FIMLORA_REMOTE_SECONDS:-570}"
start=$(date +%s)
log="$OUT/log.txt"
elapsed() { echo $(($(date +%s) - start)); }

mkdir -p .remote/site && tar xzf .remote/data.tar.gz -C .remote/site
export PYTHONPATH="$PWD/.remote/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FIMLORA_BENCH_CACHE=/tmp/fimlora-bench HF_HUB_OFFLINE=1
set -a && . .remote/git.env && set +a  # the commit this tree came from (its .git, if any, may be stale)

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at $(elapsed)s, limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "   $name: exit $? at $(elapsed)s" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; cat .remote/git.env; } >>"$log" 2>&1
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$log"

perf="$OUT/perf.jsonl"
if [ "${FIMLORA_REMOTE_PLAN:-all}" = remaining ]; then
  # Only what issue 6 still lacks on a GPU (docs/performance.md), most important first: the overhead
  # targets with 9 repeats (the spread of 3-5 did not resolve 2%), and EVA long enough that even an
  # unfinished run bounds the ratio above the 100x target (calibration took ~1.2 s at 1.5B).
  step overhead-8b 220 python3 -m bench.perf.calibration_overhead --device cuda --shape 8b --dtype bf16 --batch-size 4 --repeats 9 --jsonl "$perf"
  step overhead-1.5b 130 python3 -m bench.perf.calibration_overhead --device cuda --shape 1.5b --dtype bf16 --repeats 9 --jsonl "$perf"
  step vs-eva-1.5b 170 python3 -m bench.perf.vs_eva --device cuda --shape 1.5b --dtype bf16 --repeats 1 --warmup 0 --eva-timeout 140 --jsonl "$perf"
  step step-time-1.5b 100 python3 -m bench.perf.step_time --device cuda --shape 1.5b --dtype bf16 --repeats 9 --jsonl "$perf"
else
  step cuda-tests 120 python3 -m pytest -q -p no:cacheprovider -rs tests/unit/test_calibration_modes.py
  step overhead-1.5b 100 python3 -m bench.perf.calibration_overhead --device cuda --shape 1.5b --dtype bf16 --repeats 5 --per-example --jsonl "$perf"
  step step-time-1.5b 80 python3 -m bench.perf.step_time --device cuda --shape 1.5b --dtype bf16 --repeats 5 --jsonl "$perf"
  step overhead-8b 110 python3 -m bench.perf.calibration_overhead --device cuda --shape 8b --dtype bf16 --batch-size 4 --repeats 3 --jsonl "$perf"
  step vs-eva-1.5b 150 python3 -m bench.perf.vs_eva --device cuda --shape 1.5b --dtype bf16 --repeats 1 --warmup 0 --eva-timeout 110 --jsonl "$perf"
fi

# Issue 5: the reduced GPU grid, one worker per task x budget, each going seed by seed, so that a cut at
# the deadline leaves whole seeds (every method) rather than whole methods.
store=bench/results/gpu_reduced_store
grid_limit=$((budget - $(elapsed) - 15))
echo "== gpu grid (at $(elapsed)s, limit ${grid_limit}s)" | tee -a "$log"
if [ "$grid_limit" -gt 30 ]; then
  for task in sms_spam trec6 tweet_sentiment movie_sentiment bbc_news; do
    for b in r8 r2; do
      timeout "$grid_limit" bash -c "for s in 0 1 2 3 4; do python3 -m bench.run --grid bench/grids/gpu_reduced.yaml \
        --store $store --threads 1 --only task=$task --only budget=$b --only seed=\$s; done" \
        >"$OUT/grid-$task-$b.log" 2>&1 &
    done
  done
  wait
fi
echo "   gpu grid: $(ls $store/runs 2>/dev/null | wc -l) records at $(elapsed)s" | tee -a "$log"
tail -n 3 "$OUT"/grid-*.log >>"$log" 2>&1
rm -f "$OUT"/grid-*.log
tar czf "$OUT/gpu_reduced_store.tgz" "$store" 2>>"$log"
[ -f "$perf" ] && python3 - "$perf" <<'PY' | tee -a "$log"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    res = {k: v for k, v in r["results"].items() if not isinstance(v, dict | list)}
    print(r["benchmark"], r["config"].get("shape"), json.dumps(res))
PY
