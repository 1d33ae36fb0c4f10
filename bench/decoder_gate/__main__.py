"""Command line of the decoder gate.

::

    python -m bench.decoder_gate pin            # extract the pairs, write pinned_pairs.json (once)
    python -m bench.decoder_gate check          # extract and compare with the pin; print the splits
    python -m bench.decoder_gate time --steps 20   # one short recorded run: seconds per step
    python -m bench.decoder_gate run            # the gate, resumable (lr phase, then gate phase)
    python -m bench.decoder_gate status         # finished / pending runs and the chosen rates

Everything runs on one CPU thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.harness import ResultStore, run_grid

from .pairs import PINNED_FILE, PairsMismatchError, pin_record
from .protocol import gate_specs, lr_specs
from .sft_run import GateRunner, smollm2_setup
from .worker import CHECKPOINT_ROOT, DEFAULT_STORE, chosen_rates, run_gate, timing_spec


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (2 on a pin mismatch, printed as one line)."""
    parser = argparse.ArgumentParser(prog="python -m bench.decoder_gate", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("pin", "check", "time", "run", "status"))
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="result store directory")
    parser.add_argument("--steps", type=int, default=20, help="steps of the timing run (time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    store = ResultStore(args.store)
    if args.command == "status":
        return _status(store)
    import torch

    torch.set_num_threads(args.threads)
    runner = GateRunner(smollm2_setup(checkpoint_root=CHECKPOINT_ROOT))
    try:
        if args.command == "pin":
            record = pin_record(runner.pairs(check=False))
            PINNED_FILE.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"wrote {PINNED_FILE}: " + ", ".join(f"{k} {v['pairs']}" for k, v in record.items()))
        elif args.command == "check":
            pairs = runner.pairs()
            print(json.dumps(pin_record(pairs), indent=2, ensure_ascii=False))
        elif args.command == "time":
            summary = run_grid([timing_spec(args.steps)], runner, store, progress=True)
            print(json.dumps(summary.__dict__))
        else:
            out = run_gate(runner, store)
            print(json.dumps({"chosen": out["chosen"], "dev_losses": out["dev_losses"]}, default=str))
    except PairsMismatchError as exc:
        print(f"bench.decoder_gate: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _status(store: ResultStore) -> int:
    chosen, losses = chosen_rates(store)
    specs = lr_specs() + (gate_specs(chosen) if len(chosen) == 4 else [])
    pending = store.pending(specs)
    print(
        f"runs planned so far: {len(specs)}, finished: {len(specs) - len(pending)}, pending: {len(pending)}"
    )
    print(f"chosen rates: {chosen}; dev losses: {losses}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
