#!/usr/bin/env bash
# The full-length grids (run_all.sh) on pinned code, so that the library can move on in this checkout while
# the test grid, which takes many sessions, keeps running one version of it: every test record must come
# from the same code. The pin is the commit named in bench/grids/full/PIN.
#
#   bash bench/grids/full/run_pinned.sh        start: a git worktree of the pin under out/pinned, this
#                                              checkout's records copied into it, the pin's own run_all.sh
#                                              run there with the pin's src first on PYTHONPATH
#   bash bench/grids/full/run_pinned.sh sync   copy finished records back here (before committing them)
#   bash bench/grids/full/run_pinned.sh check  is .venv at the versions in constraints.txt (start checks it)
#
# Records stamp the pin (the worktree's HEAD). Copies never overwrite an existing record. Logs:
# out/pinned/out/workers/all_<n>.log.
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
WT=$ROOT/out/pinned
PIN=$(git rev-parse --verify "$(tr -d '[:space:]' <bench/grids/full/PIN)^{commit}")
STORES=(bench/results/full/test bench/results/full/variants)
CONSTRAINTS=bench/grids/full/constraints.txt

check_versions() {  # the records must come from one environment: .venv at the versions in $CONSTRAINTS
  .venv/bin/python - "$CONSTRAINTS" <<'PY'
import sys

from packaging.requirements import Requirement

from fimlora.io import package_versions  # what the records stamp

reqs = [Requirement(line) for line in (raw.split("#")[0].strip() for raw in open(sys.argv[1])) if line]
have = package_versions(tuple(req.name for req in reqs))
wrong = [
    f"{req.name} {have[req.name] or 'not installed'} (want {req.specifier})"
    for req in reqs
    if have[req.name] is None or not req.specifier.contains(have[req.name], prereleases=True)
]
if wrong:
    sys.exit(f"error: .venv differs from {sys.argv[1]}: {', '.join(wrong)}; "
             f"reinstall with: PIP_CONSTRAINT={sys.argv[1]} bash scripts/setup.sh")
PY
}

copy_records() {  # copy_records FROM TO: finished records only (claims stay where they are)
  local s f
  for s in "${STORES[@]}"; do
    mkdir -p "$2/$s/runs"
    for f in "$1/$s/runs"/*.json; do
      [[ -e $f ]] && cp -n "$f" "$2/$s/runs/"
    done
  done
}

case "${1:-start}" in
  start)
    if pgrep -f "$WT/bench/grids/full/run_all.sh" >/dev/null; then
      echo "error: pinned workers are already running (pgrep -f $WT); stop them first" >&2
      exit 2
    fi
    check_versions || exit 2
    git worktree prune
    [[ -d $WT ]] || git worktree add --detach "$WT" "$PIN" >/dev/null
    if [[ $(git -C "$WT" rev-parse HEAD) != "$PIN" ]]; then
      echo "error: $WT is not at the pin $PIN; remove it (git worktree remove --force $WT) and start again" >&2
      exit 2
    fi
    ln -sfn "$ROOT/.venv" "$WT/.venv"  # untracked: the pin's tree stays clean
    copy_records "$ROOT" "$WT"
    where=$(cd "$WT" && PYTHONPATH="$WT/src" .venv/bin/python -c 'import fimlora; print(fimlora.__file__)')
    if [[ $where != "$WT/src/"* ]]; then
      echo "error: the pinned run would import fimlora from $where, not $WT/src" >&2
      exit 2
    fi
    PYTHONPATH="$WT/src" bash "$WT/bench/grids/full/run_all.sh"
    echo "pinned at $PIN; sync records back with: bash bench/grids/full/run_pinned.sh sync"
    ;;
  sync)
    copy_records "$WT" "$ROOT"
    ;;
  check)
    check_versions || exit 2
    echo ".venv matches $CONSTRAINTS"
    ;;
  *)
    echo "usage: bash bench/grids/full/run_pinned.sh [start|sync|check]" >&2
    exit 2
    ;;
esac
