"""Does every method end at the budget it is given? ``fimlora train --budget-ranks R`` and ``--budget-params P``
for every registered method on the embedded MiniLM, each run's final rank sum and LoRA parameter count read
from the adapter it saved (or the one-line error it stopped with), as a markdown table.

    python -m bench.studies.one_budget --out docs/results/one_budget.md [--python PYTHON] [--label after]

``--python`` runs another interpreter (e.g. one whose ``PYTHONPATH`` puts an older checkout first, for a
before/after comparison). Runs are short (``--max-steps``, default 20): the budget is fixed before or during
the first steps, and the training-time methods reach theirs by the end of their schedule.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from fimlora.io import atomic_write_text, package_versions
from fimlora.methods.base import available_methods

COMMAND = "python -m bench.studies.one_budget"
"""How this study runs: the footer of the table it writes names it."""


def _adapter_size(out: Path) -> tuple[int, int]:
    """(rank sum, LoRA parameters) of a saved adapter, from its tensors."""
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ranks = sum(int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_A.weight"))
    params = sum(t.numel() for k, t in tensors.items() if ".lora_A." in k or ".lora_B." in k)
    return ranks, params


def run_one(python: str, method: str, flag: str, budget: str, args: argparse.Namespace) -> str:
    """One ``fimlora train`` run; its table cell: ``ranks / params`` or the error it gave."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [python, "-m", "fimlora.cli", "train", "--model", "minilm", "--data", f"builtin:{args.dataset}",
               "--method", method, flag, budget, "--r", str(args.r), "--max-steps", str(args.max_steps),
               "--max-train", "256", "--batch-size", "16", "--seed", "0", "--no-progress", "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return f"exit {proc.returncode}: {last[:110]}"
        ranks, params = _adapter_size(out)
        return f"{ranks} / {params:,}"


def _source_state(python: str) -> str:
    """The git commit (and whether it is dirty) of the fimlora that ``python`` imports."""
    code = "import json, fimlora.io as i; print(json.dumps(i.git_state()))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=_env())
    return proc.stdout.strip() or "unknown"


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the markdown table here (default: print it)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs fimlora")
    p.add_argument("--label", default="", help="a label for the table's heading (e.g. before, after)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--dataset", default="movie_sentiment")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--budget-ranks", default="200")
    p.add_argument("--budget-params", default="250k")
    p.add_argument("--max-steps", type=int, default=20)
    args = p.parse_args(argv)
    methods = args.methods or available_methods()
    rows = []
    for method in methods:
        cells = [run_one(args.python, method, flag, value, args) for flag, value in
                 (("--budget-ranks", args.budget_ranks), ("--budget-params", args.budget_params))]  # fmt: skip
        rows.append(f"| {method} | {cells[0]} | {cells[1]} |")
        print(rows[-1], flush=True)
    versions = json.dumps(package_versions())
    lines = [
        f"# One budget for every method{f' ({args.label})' if args.label else ''}",
        "",
        f"`fimlora train --model minilm --data builtin:{args.dataset} --r {args.r} --max-steps "
        f"{args.max_steps} --max-train 256 --method M` with `--budget-ranks {args.budget_ranks}` or "
        f"`--budget-params {args.budget_params}`: final rank sum / LoRA parameters of the saved adapter.",
        "",
        f"| method | --budget-ranks {args.budget_ranks} | --budget-params {args.budget_params} |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"Interpreter: `{args.python}`; fimlora source: `{_source_state(args.python)}`; versions: `{versions}`; "
        f"command: `{COMMAND} "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`.",
        "",
    ]
    text = "\n".join(lines)
    if args.out is None:
        print(text)
    else:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
