"""Issue 6, items 5 and 6: training-step time of a FIM-LoRA adapter against uniform LoRA and AdaLoRA.

Three adapters on the same base and batches, each trained with AdamW (forward, backward, step, zero_grad):

* ``uniform``: LoRA at rank r on all seven projections;
* ``fim``: the same LoRA re-ranked by :func:`fimlora.initialize_lora_fim_ranks` at an equal *parameter*
  budget (``budget_unit="params"``), after a T-batch calibration that is timed separately;
* ``adalora``: PEFT AdaLoRA with ``init_r = 1.5 r`` and ``target_r = r`` (PEFT's default 12 -> 8 at r = 8),
  calling ``update_and_allocate(step)`` after every backward as its documentation requires; ``total_step`` is
  large so every timed step is in the budget-schedule phase (PEFT defaults ``deltaT=1``: masking each step).

Item 5: ``uniform / fim`` step time (target >= 0.97, i.e. at most 3% slower) and ``adalora / uniform``
(reference 1.60 on an H100). Item 6: end-to-end ``calibration + N * fim_step`` against ``N * adalora_step``
for ``--train-steps N``, extrapolated from the measured median step times (not a full training run).

Example::

    python -m bench.perf.step_time --device cpu --shape small --repeats 5
    python -m bench.perf.step_time --device cuda --shape 1.5b --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.perf import common  # noqa: E402
from fimlora import FimConfig, initialize_lora_fim_ranks  # noqa: E402


def _trainer(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, adalora: bool = False
) -> Callable[[], None]:
    """A closure running ``steps`` optimizer steps; AdaLoRA's global step keeps counting across calls."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    state = {"step": 0}

    def run() -> None:
        model.train()
        for i in range(steps):
            loss = model(**batches[i % len(batches)]).loss
            loss.backward()
            opt.step()
            if adalora:
                model.base_model.update_and_allocate(state["step"])
            opt.zero_grad(set_to_none=True)
            state["step"] += 1

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run")
    parser.add_argument("--train-steps", type=int, default=1000, help="N for the end-to-end extrapolation")
    args = parser.parse_args(argv)
    device = common.setup(args)
    shape = common.resolve_shape(args)
    from peft import AdaLoraConfig

    base = common.build_base(shape, device, common.DTYPES[args.dtype], args.seed)
    batches = common.make_batches(shape, args.batches, device, args.seed)
    r = args.lora_r

    uniform = common.lora_model(copy.deepcopy(base), r, args.seed)
    fim = common.lora_model(copy.deepcopy(base), r, args.seed)
    fim_cfg = FimConfig(calibration_batches=args.batches, budget_unit="params", show_progress=False)
    common.sync(device)
    rank_map = initialize_lora_fim_ranks(fim, batches, fim_cfg)
    calibration_s = float(rank_map.metadata.get("calibration_seconds", float("nan")))
    ada_cfg = AdaLoraConfig(
        init_r=max(1, (3 * r) // 2),
        target_r=r,
        lora_alpha=2 * r,
        target_modules=common.LLAMA_TARGETS,
        total_step=10**6,
    )
    adalora = common.lora_model(copy.deepcopy(base), r, args.seed, config=ada_cfg)
    del base

    variants = {
        "uniform": _trainer(uniform, batches, args.steps),
        "fim": _trainer(fim, batches, args.steps),
        "adalora": _trainer(adalora, batches, args.steps, adalora=True),
    }
    timings = common.time_interleaved(variants, device, args.repeats, args.warmup)
    step = {k: v["median_s"] / args.steps for k, v in timings.items()}
    n = args.train_steps
    results = {
        "timings": timings,
        "step_seconds": step,
        "trainable_params": {
            "uniform": common.count_params(uniform, trainable_only=True),
            "fim": common.count_params(fim, trainable_only=True),
            "adalora": common.count_params(adalora, trainable_only=True),
        },
        "fim_ranks": {"min": min(rank_map.values()), "max": max(rank_map.values())},
        "ratio_uniform_vs_fim": common.ratio(step["uniform"], step["fim"]),
        # Contention only ever adds time: on a shared machine the fastest repeat is the better estimate.
        "ratio_uniform_vs_fim_min": common.ratio(timings["uniform"]["min_s"], timings["fim"]["min_s"]),
        "ratio_adalora_vs_uniform_min": common.ratio(
            timings["adalora"]["min_s"], timings["uniform"]["min_s"]
        ),
        "ratio_adalora_vs_uniform": common.ratio(step["adalora"], step["uniform"]),
        "ratio_adalora_vs_fim": common.ratio(step["adalora"], step["fim"]),
        "calibration_seconds": calibration_s,
        "end_to_end_extrapolated": {
            "train_steps": n,
            "fim_seconds": calibration_s + n * step["fim"],
            "adalora_seconds": n * step["adalora"],
            "ratio_adalora_vs_fim": common.ratio(n * step["adalora"], calibration_s + n * step["fim"]),
        },
        "target_ratio_uniform_vs_fim": 0.97,
    }
    return common.emit("step_time", args, device, results, shape)


if __name__ == "__main__":
    main()
