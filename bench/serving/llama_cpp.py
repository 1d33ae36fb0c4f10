"""Round trip of a LoRA adapter through a real llama.cpp, compared with PEFT (issue 16).

llama.cpp is the one vendored by the ``llama-cpp-python`` source distribution, built on CPU by
``scripts/ci_serving.sh``; its own scripts convert the base model (``convert_hf_to_gguf.py``) and each
adapter (``convert_lora_to_gguf.py``), and the Python binding runs them. ``FIMLORA_LLAMA_CPP_DIR`` names
the llama.cpp source tree (the sdist's ``vendor/llama.cpp``).

The measure is the adapter's *effect* on the logits, ``Δ = logits(base + adapter) − logits(base)``,
computed inside each engine, and ``relative error = ‖Δ_llama.cpp − Δ_PEFT‖ / ‖Δ_PEFT‖`` over all positions
and the whole vocabulary; plus how many positions pick the same top-1 token with the adapter. Comparing
effects rather than logits keeps the base model's own engine-to-engine difference (f32 kernels in a
different order) out of the adapter's figure. llama.cpp's KV cache is f32 (its default f16 cache rounds K
and V and adds ~1e-3 to every comparison, adapter or not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "RoundTrip",
    "convert_adapter",
    "convert_base",
    "llama_cpp_dir",
    "llama_cpp_logits",
    "peft_logits",
    "round_trip",
]

LLAMA_CPP_DIR_ENV = "FIMLORA_LLAMA_CPP_DIR"


def llama_cpp_dir() -> Path:
    """The llama.cpp source tree with the conversion scripts (``$FIMLORA_LLAMA_CPP_DIR``)."""
    value = os.environ.get(LLAMA_CPP_DIR_ENV)
    if not value or not (Path(value) / "convert_lora_to_gguf.py").is_file():
        raise RuntimeError(
            f"${LLAMA_CPP_DIR_ENV} must name llama.cpp's source tree (with convert_lora_to_gguf.py); "
            "scripts/ci_serving.sh builds llama-cpp-python from its sdist and sets it"
        )
    return Path(value)


def _run_script(name: str, *args: str | Path) -> None:
    cmd = [sys.executable, str(llama_cpp_dir() / name), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def convert_base(hf_dir: Path, out: Path) -> Path:
    """``convert_hf_to_gguf.py HF_DIR --outtype f32``: the base model as an f32 GGUF file."""
    if not out.is_file():
        _run_script("convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", out)
    return out


def convert_adapter(adapter_dir: Path, base_dir: Path, out: Path) -> Path:
    """``convert_lora_to_gguf.py ADAPTER --base BASE --outtype f32``: an adapter as llama.cpp reads it."""
    _run_script(
        "convert_lora_to_gguf.py", adapter_dir, "--base", base_dir, "--outtype", "f32", "--outfile", out
    )
    return out


def llama_cpp_logits(
    model_gguf: Path, tokens: list[int], *, lora_gguf: Path | None = None, f32_kv_cache: bool = True
) -> np.ndarray:
    """Logits at every position from llama.cpp (Python binding), with an optional LoRA adapter (scale 1).

    Returns:
        ``(len(tokens), vocab)`` float32.
    """
    import llama_cpp

    kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv_cache else llama_cpp.GGML_TYPE_F16
    threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    llm = llama_cpp.Llama(
        model_path=str(model_gguf),
        lora_path=None if lora_gguf is None else str(lora_gguf),
        n_ctx=max(64, len(tokens)),
        n_batch=max(64, len(tokens)),
        logits_all=True,
        type_k=kv_type,
        type_v=kv_type,
        flash_attn=False,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def peft_logits(base_dir: Path, adapter_dir: Path | None, tokens: list[int]) -> np.ndarray:
    """Logits from transformers (fp32), with the adapter loaded by plain PEFT when given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return logits.float().numpy()


@dataclass
class RoundTrip:
    """One adapter file through llama.cpp, against PEFT on the source adapter."""

    engine: str
    relative_error: float
    """‖Δ_llama.cpp − Δ_PEFT‖ / ‖Δ_PEFT‖, Δ = logits with adapter − logits without, in each engine."""
    top1_equal: int
    """Positions where llama.cpp's top-1 token with this adapter equals PEFT's with the source adapter."""
    positions: int
    safetensors_bytes: int
    gguf_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def round_trip(
    base_dir: Path,
    base_gguf: Path,
    source_adapter: Path,
    adapters: dict[str, Path],
    tokens: list[int],
    work: Path,
    *,
    f32_kv_cache: bool = True,
) -> list[RoundTrip]:
    """Convert every adapter of ``adapters`` (engine name -> directory) and compare it with PEFT.

    PEFT's reference is the *source* adapter (with its patterns) on the fp32 transformers model, so each
    row says whether llama.cpp with that file reproduces what the user trained.
    """
    peft_base = peft_logits(base_dir, None, tokens)
    peft_adapted = peft_logits(base_dir, source_adapter, tokens)
    want = peft_adapted - peft_base
    llama_base = llama_cpp_logits(base_gguf, tokens, f32_kv_cache=f32_kv_cache)
    rows = []
    for engine, adapter_dir in adapters.items():
        gguf = convert_adapter(adapter_dir, base_dir, work / f"lora-{engine}.gguf")
        adapted = llama_cpp_logits(base_gguf, tokens, lora_gguf=gguf, f32_kv_cache=f32_kv_cache)
        got = adapted - llama_base
        rows.append(
            RoundTrip(
                engine=engine,
                relative_error=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
                top1_equal=int((adapted.argmax(-1) == peft_adapted.argmax(-1)).sum()),
                positions=len(tokens),
                safetensors_bytes=(adapter_dir / "adapter_model.safetensors").stat().st_size,
                gguf_bytes=gguf.stat().st_size,
            )
        )
    return rows
