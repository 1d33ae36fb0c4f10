"""Issue 6, item 3: memory of the calibration statistics against a full-model Fisher diagonal.

Counted from shapes, no weights allocated: the LLaMA is built on ``torch.device("meta")`` and wrapped in
PEFT LoRA there, then parameters are counted. A full-model diagonal Fisher keeps one fp32 number per model
parameter; FIM-LoRA's Fisher keeps one per element of every LoRA-B (``sum numel(B_m) = r * sum out_m``).
The implementation (``fimlora.calibration.BatchAccumulator``) actually holds two fp32 tensors per B (sum g and
sum g^2, so that the variance is available too); both ratios are reported. The issue's reference: 497x at
the 1.5B shape, 729x at the 8B shape, r = 8 on all seven projections.

Example::

    python -m bench.perf.stats_memory --shape 1.5b
    python -m bench.perf.stats_memory --shape 8b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.perf import common  # noqa: E402
from fimlora.calibration import BatchAccumulator  # noqa: E402
from fimlora.peft_glue import lora_factors, lora_modules  # noqa: E402

REFERENCE_RATIO = {"1.5b": 497, "8b": 729}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    device = torch.device("cpu")  # nothing runs; only the provenance record needs a device
    shape = common.resolve_shape(args)
    base = common.build_base(shape, "meta", common.DTYPES[args.dtype], args.seed)
    base_params = common.count_params(base)
    model = common.lora_model(base, args.lora_r, args.seed)
    mods = lora_modules(model)
    factors = {n: lora_factors(m) for n, m in mods.items()}
    b_numel = sum(b.weight.numel() for _, b in factors.values())
    a_numel = sum(a.weight.numel() for a, _ in factors.values())
    # The very accumulator calibration uses, on meta tensors: counts its state without allocating it.
    acc = BatchAccumulator({n: b.weight for n, (_, b) in factors.items()})
    acc_numel = sum(t.numel() for store in (acc.sum_g, acc.sum_g2) for t in store.values())
    fp32 = 4
    results = {
        "base_params": base_params,
        "lora_modules": len(mods),
        "lora_b_numel": b_numel,
        "lora_a_numel": a_numel,
        "full_fisher_bytes_fp32": base_params * fp32,
        "fisher_b_bytes_fp32": b_numel * fp32,
        "implemented_state_bytes_fp32": acc_numel * fp32,
        "ratio_full_fisher_vs_b_fisher": base_params / b_numel,
        "ratio_full_fisher_vs_implemented_state": base_params / acc_numel,
        "reference_ratio": REFERENCE_RATIO.get(args.shape) if args.lora_r == 8 else None,
    }
    return common.emit("stats_memory", args, device, results, shape)


if __name__ == "__main__":
    main()
