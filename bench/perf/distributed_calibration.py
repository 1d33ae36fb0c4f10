"""Multi-process calibration under ``torchrun`` / ``accelerate launch`` (issue 6, "Scale").

Every process builds the same model (same seed), takes its own shard of the T batches (batch ``i`` goes to
rank ``i % world``) and calibrates; ``fimlora.calibration`` all-reduces the raw sums, so every rank ends with the
statistics of all T batches. Rank 0 prints the record; with ``--check`` it also calibrates alone on all T
batches and reports the largest relative difference and whether the rank maps are identical.

Examples::

    # two CPU processes (gloo)
    torchrun --standalone --nproc_per_node 2 -m bench.perf.distributed_calibration --device cpu --shape tiny --check
    # eight GPUs on one node (nccl), LOCAL_RANK picks the GPU
    torchrun --standalone --nproc_per_node 8 -m bench.perf.distributed_calibration --device cuda --shape 8b --dtype bf16 --batches 64
    accelerate launch --num_processes 8 -m bench.perf.distributed_calibration --device cuda --shape 8b --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.perf import common  # noqa: E402
from fimlora import FimConfig, estimate_module_scores  # noqa: E402
from fimlora.initialize import plan_rank_map  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--check", action="store_true", help="rank 0 also calibrates alone and compares")
    args = parser.parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        args.device = f"cuda:{local_rank}"
    device = common.setup(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        shape = common.resolve_shape(args)
        model = common.lora_model(
            common.build_base(shape, device, common.DTYPES[args.dtype], args.seed), args.lora_r, args.seed
        )
        batches = common.make_batches(shape, args.batches, device, args.seed)
        shard = batches[rank::world]
        dist.barrier()
        common.sync(device)
        t0 = time.perf_counter()
        stats = estimate_module_scores(
            model, shard, FimConfig(calibration_batches=len(shard), show_progress=False)
        )
        common.sync(device)
        seconds = time.perf_counter() - t0
        if rank != 0:
            # Wait for rank 0's check before tearing down: a peer that leaves early makes gloo abort
            # the other process ("terminate called without an active exception").
            dist.barrier()
            return None
        results: dict[str, Any] = {
            "world_size": stats.world_size,
            "num_batches": stats.num_batches,
            "seconds": seconds,
            "backend": dist.get_backend(),
        }
        if args.check:
            # A process group of one would all-reduce again; the reference must be purely local.
            single = _calibrate_locally(model, batches)
            rel = max(
                abs(getattr(d, f) - getattr(s, f)) / max(abs(getattr(s, f)), 1e-30)
                for n, d in stats.modules.items()
                for s in [single.modules[n]]
                for f in ("fisher_sum", "variance_sum")
            )
            cfg = FimConfig(show_progress=False)
            maps = [
                dict(plan_rank_map(st.scores(), st.shapes(), cfg, r=args.lora_r)) for st in (stats, single)
            ]
            results.update(max_relative_difference=rel, rank_maps_identical=maps[0] == maps[1])
        record = common.emit("distributed_calibration", args, device, results, shape)
        dist.barrier()
        return record
    finally:
        dist.destroy_process_group()


def _calibrate_locally(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Any:
    """Calibrate on all batches in this process alone (all-reduce disabled by hiding the process group)."""
    from unittest import mock

    with mock.patch.object(dist, "is_initialized", return_value=False):
        return estimate_module_scores(
            model, batches, FimConfig(calibration_batches=len(batches), show_progress=False)
        )


if __name__ == "__main__":
    main()
