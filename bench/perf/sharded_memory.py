"""Peak memory per process of calibration on an FSDP2-sharded model vs the same model unsharded (issue 15).

Both modes run under ``torchrun`` with the same number of processes, each calibrating on its own batches
(statistics all-reduced):

* ``--mode unsharded``: every process builds the whole model (LoRA r on all seven projections) and
  calibrates it (the DDP way);
* ``--mode sharded``: every process builds the model on the meta device, shards it with ``fully_shard``
  (every decoder layer, then the root), materialises only its shards (random weights, LoRA-B = 0) and
  calibrates the sharded model (B's gradient from each lora_B layer's input and output gradient).

Peak memory is the process's peak resident set size (``ru_maxrss``; CPU) or ``torch.cuda.max_memory_allocated``
(GPU), read after building the model and after calibration; rank 0 prints one JSON record with every rank's
numbers. Weights are random: the figure is about memory, not scores.

Examples::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m bench.perf.sharded_memory --mode unsharded
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m bench.perf.sharded_memory --mode sharded
    torchrun --standalone --nproc_per_node 8 -m bench.perf.sharded_memory --mode sharded --device cuda \\
        --shape 8b --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from bench.perf import common  # noqa: E402
from fimlora import FimConfig, estimate_module_scores  # noqa: E402

# A few hundred MB in fp32 (~200M parameters, untied embeddings): sharding visibly halves it on 2 processes.
MEDIUM = common.LlamaShape(1024, 12, 2816, 16, 4, 32000, batch_size=2, seq_len=128)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _sharded_model(
    shape: common.LlamaShape, r: int, device: torch.device, dtype: torch.dtype, seed: int
) -> nn.Module:
    """The LoRA model built on the meta device, sharded, and only this process's shards materialised."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    config = common.llama_config(shape)
    with torch.device("meta"):
        base = LlamaForCausalLM(config).to(dtype)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=common.LLAMA_TARGETS))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed + dist.get_rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if "lora_B" in name:
                local.zero_()
            else:
                local.normal_(0.0, 0.02, generator=g)
        # Non-persistent buffers (rotary inverse frequencies) are not parameters: rebuild them.
        for module in model.modules():
            if type(module).__name__.endswith("RotaryEmbedding"):
                with torch.device(device):
                    fresh = type(module)(config=config)
                for buffer_name, buffer in fresh.named_buffers(recurse=False):
                    setattr(module, buffer_name, buffer)
    return model


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["unsharded", "sharded"], required=True)
    parser.add_argument("--shape", choices=["medium", *common.SHAPES], default="medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(common.DTYPES), default="fp32")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="calibration batches per process")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        shape = MEDIUM if args.shape == "medium" else common.SHAPES[args.shape]
        shape = common.LlamaShape(
            **{
                **vars(shape),
                "batch_size": args.batch_size or shape.batch_size,
                "seq_len": args.seq_len or shape.seq_len,
            }
        )
        dtype = common.DTYPES[args.dtype]
        import peft  # noqa: F401  (imported before the baseline: both modes need them)
        import transformers  # noqa: F401

        base_rss = _rss_gib()
        if args.mode == "sharded":
            model = _sharded_model(shape, args.r, device, dtype, args.seed)
        else:
            base = common.build_base(shape, device, dtype, args.seed)
            model = common.lora_model(base, args.r, args.seed)
        params = sum(p.numel() for p in model.parameters())  # global sizes (DTensor.numel is global)
        build_peak = _peak_gib(device)
        batches = common.make_batches(shape, args.batches, device, args.seed + 100 * dist.get_rank())
        t0 = time.perf_counter()
        stats = estimate_module_scores(
            model, batches, FimConfig(calibration_batches=args.batches, show_progress=False)
        )
        seconds = time.perf_counter() - t0
        record = {
            "rank": dist.get_rank(),
            "rss_after_imports_gib": round(base_rss, 3),
            "peak_after_build_gib": round(build_peak, 3),
            "peak_after_calibration_gib": round(_peak_gib(device), 3),
            "calibration_seconds": round(seconds, 1),
        }
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)
        if dist.get_rank() != 0:
            return None
        out = {
            "bench": "sharded_memory",
            "mode": args.mode,
            "world_size": dist.get_world_size(),
            "device": str(device),
            "dtype": args.dtype,
            "shape": vars(shape),
            "params": params,
            "lora_r": args.r,
            "batches_per_process": args.batches,
            "statistics_num_batches": stats.num_batches,
            "gradients": stats.metadata.get("gradients", "grad"),
            "memory_unit": "peak RSS (ru_maxrss)"
            if device.type == "cpu"
            else "torch.cuda.max_memory_allocated",
            "ranks": gathered,
            "versions": {"torch": torch.__version__},
        }
        print(json.dumps(out, indent=1), flush=True)
        return out
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
