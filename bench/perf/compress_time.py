"""Issue 14: time and memory of ``fimlora.compress_adapter`` on an adapter of a LLaMA shape (no model).

Random LoRA factors (A ~ N(0, 1/in), B ~ N(0, 1/r): a trained-looking, full-rank update) of rank ``--lora-r``
on all seven projections of every layer of the shape are written as a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``); no base model is built or needed. Then:

* ``seconds``: wall time of ``compress_adapter(adapter, out, fraction=F)`` (median of ``--repeats``),
  reading, decomposing, selecting, writing and plotting included; ``cpu_seconds``: the CPU time of one such
  call (what a shared machine does not inflate), and ``cpu_seconds_without_files`` of a call that only reads,
  decomposes and selects (``out_dir=None``);
* ``largest_allocation_bytes``: the largest tensor allocation of one aten operator during a compression,
  from ``torch.profiler`` (``profile_memory=True``), against the smallest ``out x in`` fp32 matrix of the
  shape: the compression never forms an ``out x in`` matrix, so the ratio stays far below 1; the one
  allocation outside any operator is safetensors reading the file (``..._outside_operators_bytes``);
* ``peak_live_tensor_bytes``: peak tensor storage alive during a compression
  (:class:`bench.perf.common.LiveTensorBytes`), against the adapter's own size.

Example (the figures in docs/compress.md)::

    python -m bench.perf.compress_time --shape 1.5b --lora-r 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.perf import common  # noqa: E402
from fimlora import compress_adapter  # noqa: E402

__all__ = ["llama_module_shapes", "main", "write_random_adapter"]


def llama_module_shapes(shape: common.LlamaShape) -> dict[str, tuple[int, int]]:
    """Module name -> ``(in, out)`` of the seven projections of every layer."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    per_layer = {
        "self_attn.q_proj": (shape.hidden, shape.hidden),
        "self_attn.k_proj": (shape.hidden, kv),
        "self_attn.v_proj": (shape.hidden, kv),
        "self_attn.o_proj": (shape.hidden, shape.hidden),
        "mlp.gate_proj": (shape.hidden, shape.intermediate),
        "mlp.up_proj": (shape.hidden, shape.intermediate),
        "mlp.down_proj": (shape.intermediate, shape.hidden),
    }
    return {f"model.layers.{i}.{k}": v for i in range(shape.layers) for k, v in per_layer.items()}


def write_random_adapter(
    directory: Path, shapes: dict[str, tuple[int, int]], r: int, *, seed: int = 0, alpha: int | None = None
) -> Path:
    """A PEFT LoRA adapter directory with random factors of rank ``r`` for ``shapes`` (no model)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) / fan_in**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) / r**0.5
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha if alpha is not None else 2 * r,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes}),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def largest_allocations(fn: Any) -> tuple[int, int]:
    """The largest CPU allocation of one aten operator while ``fn()`` runs, and the largest outside any
    operator (``torch.profiler``'s ``[memory]`` events: here, safetensors reading the adapter file)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ops = [int(e.cpu_memory_usage) for e in prof.events() if e.name.startswith("aten::")]
    other = [int(e.cpu_memory_usage) for e in prof.events() if not e.name.startswith("aten::")]
    return max(ops, default=0), max(other, default=0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--fraction", type=float, default=0.5, help="budget: fraction of LoRA parameters")
    parser.set_defaults(shape="1.5b", lora_r=16, repeats=3, warmup=1, device="cpu")
    args = parser.parse_args(argv)
    device = common.setup(args)
    shape = common.resolve_shape(args)
    shapes = llama_module_shapes(shape)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_random_adapter(root / "source", shapes, args.lora_r, seed=args.seed)
        counter = iter(range(10**6))

        def run() -> Any:
            return compress_adapter(source, root / f"out{next(counter)}", fraction=args.fraction)

        timing = common.time_interleaved({"compress": run}, device, args.repeats, args.warmup)["compress"]
        cpu_started = time.process_time()  # CPU time: robust to other jobs sharing the machine
        run()
        cpu_seconds = time.process_time() - cpu_started
        cpu_started = time.process_time()
        compress_adapter(source, None, fraction=args.fraction)  # decompose and select only: no files
        cpu_seconds_compute = time.process_time() - cpu_started
        biggest, outside = largest_allocations(run)
        with common.LiveTensorBytes() as tracker:
            report = run()
        file_bytes = (source / "adapter_model.safetensors").stat().st_size
    smallest_matrix = min(i * o for i, o in shapes.values()) * 4
    adapter_bytes = sum(args.lora_r * (i + o) for i, o in shapes.values()) * 4
    results = {
        "modules": len(shapes),
        "source_lora_params": report.source_lora_params,
        "lora_params": report.lora_params,
        "kept_energy_fraction": report.kept_energy_fraction,
        "seconds": timing,
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_without_files": cpu_seconds_compute,
        "largest_allocation_bytes": biggest,
        "smallest_out_in_fp32_bytes": smallest_matrix,
        "largest_allocation_over_smallest_matrix": biggest / smallest_matrix,
        "largest_allocation_outside_operators_bytes": outside,
        "adapter_file_bytes": file_bytes,
        "peak_live_tensor_bytes": tracker.peak,
        "adapter_fp32_bytes": adapter_bytes,
    }
    return common.emit("compress_time", args, device, results, shape)


if __name__ == "__main__":
    main()
