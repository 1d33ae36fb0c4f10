"""Shared pieces of the performance benchmarks (issue 6): model shapes, batches, timing, memory, records.

Every script builds a randomly initialised LLaMA of a named shape, wraps it in PEFT LoRA on all seven
linear projections, times work on fixed random-token batches, and prints one JSON record (config, results,
provenance) on stdout, optionally appending it to a JSONL file.

Timing: ``warmup`` untimed runs, then ``repeats`` timed runs; the median is reported with all samples.
On CUDA every timed region starts and ends with ``torch.cuda.synchronize()``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` (tensor
memory, excluding the caching allocator's slack), reported as the peak above what was allocated before the
region. On CPU, the same quantity counted by :class:`LiveTensorBytes`, a ``TorchDispatchMode`` that adds the
storage size of every tensor an operator creates (forward and backward) and subtracts it when the storage
is freed. Process RSS was tried first and rejected: glibc keeps freed memory, so after a warm-up run the
resident-set high-water mark barely moves and every variant reads ~0. The tracker slows operators down, so
memory is measured in separate runs from timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# The seven linear projections of a LLaMA block: "all linear layers" of the issue, lm_head excluded.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class LlamaShape:
    """Architecture numbers of a LLaMA (untied embeddings, like the issue's 1.5B reference)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch_size: int
    seq_len: int
    """Default batch size and sequence length for this shape (overridable on the command line)."""


SHAPES: dict[str, LlamaShape] = {
    # Unit-test size: seconds on a laptop, for smoke tests only (timings at this size are noise).
    "tiny": LlamaShape(64, 2, 128, 4, 2, 512, batch_size=2, seq_len=32),
    # Big enough that one CPU forward+backward takes >= 50 ms on two cores, so ratios are measurable.
    "small": LlamaShape(256, 4, 688, 8, 4, 8192, batch_size=4, seq_len=128),
    # The reference: hidden 2048, 16 layers, vocab 128k, untied embeddings: 1.50B parameters.
    "1.5b": LlamaShape(2048, 16, 8192, 32, 8, 128256, batch_size=8, seq_len=512),
    # Llama-3-8B: 8.03B parameters.
    "8b": LlamaShape(4096, 32, 14336, 32, 8, 128256, batch_size=8, seq_len=512),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every perf script shares."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=[*SHAPES, "custom"], default="small")
    parser.add_argument("--hidden", type=int, help="custom shape: hidden size")
    parser.add_argument("--layers", type=int, help="custom shape: number of layers")
    parser.add_argument("--intermediate", type=int, help="custom shape: MLP size")
    parser.add_argument("--heads", type=int, help="custom shape: attention heads")
    parser.add_argument("--kv-heads", type=int, help="custom shape: key/value heads")
    parser.add_argument("--vocab", type=int, help="custom shape: vocabulary size")
    parser.add_argument("--batches", type=int, default=8, help="T: batches per timed run")
    parser.add_argument("--batch-size", type=int, help="sequences per batch (default: the shape's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the shape's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the model weights")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--jsonl", type=Path, help="also append the record to this JSONL file")


def resolve_shape(args: argparse.Namespace) -> LlamaShape:
    """The shape named by ``--shape`` with ``--batch-size``/``--seq-len`` and custom fields applied."""
    if args.shape == "custom":
        fields = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab")
        missing = [f"--{f.replace('_', '-')}" for f in fields if getattr(args, f) is None]
        if missing:
            raise SystemExit(f"--shape custom needs {', '.join(missing)}")
        shape = LlamaShape(*(getattr(args, f) for f in fields), batch_size=8, seq_len=512)
    else:
        shape = SHAPES[args.shape]
    return LlamaShape(
        **{
            **asdict(shape),
            "batch_size": args.batch_size or shape.batch_size,
            "seq_len": args.seq_len or shape.seq_len,
        }
    )


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``/``--seed``; fail early on a CUDA request without CUDA."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device


def llama_config(shape: LlamaShape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(4096, shape.seq_len),
        tie_word_embeddings=False,
        use_cache=False,
    )


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_base(shape: LlamaShape, device: torch.device | str, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random LLaMA created directly on ``device`` in ``dtype`` (no fp32 copy of an 8B model first)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(llama_config(shape))
    return model


def lora_model(
    base: nn.Module, r: int, seed: int, *, config: Any | None = None, **lora_kwargs: Any
) -> nn.Module:
    """PEFT LoRA (or the given PEFT config) on all seven projections, LoRA-A seeded."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    cfg = config or LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS, **lora_kwargs)
    return get_peft_model(base, cfg)


def make_batches(
    shape: LlamaShape, n: int, device: torch.device | str, seed: int
) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random tokens on ``device`` (labels = inputs: the causal-LM loss)."""
    g = torch.Generator().manual_seed(seed + 2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, shape.vocab, (shape.batch_size, shape.seq_len), generator=g)
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": ids.to(device),
            }
        )
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_interleaved(
    variants: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """Median seconds of each variant; runs are interleaved (A B C A B C ...) so drift hits all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(time_once(fn, device))
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v} for k, v in samples.items()
    }


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (CPU analogue of ``max_memory_allocated``).

    Storages are counted once (views share them) and released through a weakref finaliser, so memory held
    only by the autograd graph (saved activations) counts until the graph is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                if storage in self._sizes:
                    continue
                nbytes = storage.nbytes()
                self._sizes[storage] = nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, nbytes)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak tensor memory of ``fn()`` above what was allocated before it (method in the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "cuda.max_memory_allocated", "peak_delta_bytes": peak - before}
    with LiveTensorBytes() as tracker:
        fn()
    return {"method": "LiveTensorBytes (dispatch-mode storage accounting)", "peak_delta_bytes": tracker.peak}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def provenance(device: torch.device) -> dict[str, Any]:
    """:func:`fimlora.io.provenance` (versions, git commit, command line, machine, time) plus the CPU or
    GPU model the numbers were measured on."""
    from fimlora.io import provenance as run_provenance

    machine = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {"cpu": _cpu_model()}
    # Top-level python and torch_threads as in the perf records written before fimlora.io existed.
    extra = {"python": platform.python_version(), "torch_threads": torch.get_num_threads(), **machine}
    return run_provenance(extra=extra)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def emit(
    benchmark: str,
    args: argparse.Namespace,
    device: torch.device,
    results: dict[str, Any],
    shape: LlamaShape | None = None,
) -> dict[str, Any]:
    """Print the record as one JSON line on stdout and append it to ``--jsonl`` when given."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {
        "benchmark": benchmark,
        "config": config,
        "shape": asdict(shape) if shape else None,
        "results": results,
        "provenance": provenance(device),
    }
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if args.jsonl:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")
    return record


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 4)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b
