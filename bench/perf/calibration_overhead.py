"""Issue 6, items 1 and 2: calibration time and peak memory against plain LoRA passes on the same batches.

Variants, all on the same T batches of one model:

* ``plain_lora``: T forward+backward passes of ordinary LoRA training (A and B trainable, no optimizer):
  the baseline of item 1.
* ``plain_lora_frozen_a``: the same with only B trainable (what calibration differentiates).
* ``calibration``: :func:`fimlora.estimate_module_scores` (A frozen, the default).
* ``calibration_trainable_a``: the same with ``freeze_lora_A=False`` (squared-gradient accumulation on top
  of a plain pass: isolates the cost of the hooks and accumulators).

Item 1 is ``calibration / plain_lora`` (target <= 1.02); the accumulation overhead on its own is
``calibration_trainable_a / plain_lora``. Item 2 compares calibration's peak memory with that of one LoRA
training step (forward, backward, AdamW step) on one of the same batches.

Example::

    python -m bench.perf.calibration_overhead --device cpu --shape small --repeats 7
    python -m bench.perf.calibration_overhead --device cuda --shape 1.5b --dtype bf16
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
from fimlora import FimConfig, estimate_module_scores  # noqa: E402


def _set_trainable(model: torch.nn.Module, train_a: bool) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_("lora_B" in n or (train_a and "lora_A" in n))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument(
        "--per-example",
        action="store_true",
        help="also time FimConfig(estimator='per_example') (exact per-example squared gradient norms)",
    )
    args = parser.parse_args(argv)
    device = common.setup(args)
    shape = common.resolve_shape(args)
    dtype = common.DTYPES[args.dtype]
    model = common.lora_model(common.build_base(shape, device, dtype, args.seed), args.lora_r, args.seed)
    batches = common.make_batches(shape, args.batches, device, args.seed)

    def plain(train_a: bool) -> None:
        # What a LoRA training loop does per batch, minus the optimizer: forward, backward, drop grads.
        _set_trainable(model, train_a)
        model.train()
        for b in batches:
            model(**b).loss.backward()
            model.zero_grad(set_to_none=True)

    def calibrate(freeze_a: bool, estimator: str = "batch") -> None:
        cfg = FimConfig(
            calibration_batches=args.batches,
            freeze_lora_A=freeze_a,
            show_progress=False,
            estimator=estimator,  # type: ignore[arg-type]
        )
        estimate_module_scores(model, batches, cfg)

    variants = {
        "plain_lora": lambda: plain(True),
        "plain_lora_frozen_a": lambda: plain(False),
        "calibration": lambda: calibrate(True),
        "calibration_trainable_a": lambda: calibrate(False),
    }
    if args.per_example:
        variants["calibration_per_example"] = lambda: calibrate(True, "per_example")
    timings = common.time_interleaved(variants, device, args.repeats, args.warmup)

    def train_step() -> None:
        # One ordinary LoRA training step, optimizer state created inside so that it counts.
        _set_trainable(model, True)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model(**batches[0]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del opt

    memory = {name: common.peak_memory(fn, device) for name, fn in variants.items()}
    memory["train_step"] = common.peak_memory(train_step, device)
    for p in model.parameters():  # leave B = 0: the optimizer step above moved it
        if p.requires_grad:
            p.grad = None

    med = {k: v["median_s"] for k, v in timings.items()}
    peak = {k: v["peak_delta_bytes"] for k, v in memory.items()}
    results = {
        "timings": timings,
        "memory": memory,
        "seconds_per_pass_plain": med["plain_lora"] / args.batches,
        "ratio_calibration_vs_plain": common.ratio(med["calibration"], med["plain_lora"]),
        "ratio_calibration_trainable_a_vs_plain": common.ratio(
            med["calibration_trainable_a"], med["plain_lora"]
        ),
        "ratio_calibration_vs_plain_frozen_a": common.ratio(med["calibration"], med["plain_lora_frozen_a"]),
        # Contention from other processes only ever adds time, so on a shared machine the fastest repeat
        # is the better estimate of the true cost; both are reported.
        "ratio_calibration_vs_plain_min": common.ratio(
            timings["calibration"]["min_s"], timings["plain_lora"]["min_s"]
        ),
        "ratio_per_example_vs_plain": common.ratio(med.get("calibration_per_example"), med["plain_lora"]),
        "target_ratio": 1.02 if device.type == "cpu" else 1.05 if args.shape == "8b" else 1.02,
        "peak_gib": {k: common.gib(v) for k, v in peak.items()},
        "ratio_peak_calibration_vs_train_step": common.ratio(peak["calibration"], peak["train_step"]),
        "ratio_peak_calibration_vs_plain": common.ratio(peak["calibration"], peak["plain_lora"]),
        "params_total": common.count_params(model),
    }
    return common.emit("calibration_overhead", args, device, results, shape)


if __name__ == "__main__":
    main()
