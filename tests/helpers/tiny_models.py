"""The tests' one home for tiny random models built from configs (no downloads).

In memory: :func:`tiny_bert`, :func:`tiny_gpt2` (Conv1D, fan_in_fan_out), :func:`tiny_llama`, wrapped by
:func:`peft_model`, with :func:`batches` of random tokens. Saved to disk with a tokenizer (for the CLI,
recipes and trainer tests): :func:`make_tiny_bert` (WordPiece over :data:`WORDS`, or another model's
tokenizer) and :func:`make_tiny_llama` (word-level fast tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 97


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


ARCHS: dict[str, tuple[Callable[[int], torch.nn.Module], dict[str, Any]]] = {
    "bert": (
        tiny_bert,
        {"target_modules": ["query", "key", "value", "dense"], "task_type": TaskType.SEQ_CLS},
    ),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "llama": (
        tiny_llama,
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    ),
    "llama-all-linear": (tiny_llama, {"target_modules": "all-linear"}),
}


def peft_model(
    arch: str, *, r: int = 4, lora_alpha: int = 8, seed: int = 0, **lora_kwargs: Any
) -> torch.nn.Module:
    build, kwargs = ARCHS[arch]
    base = build(seed)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=lora_alpha, **{**kwargs, **lora_kwargs}))


def batches(arch: str, n: int = 8, *, seed: int = 1, batch_size: int = 4, seq_len: int = 12) -> list[dict]:
    """A batch stream whose gradients differ between modules (random tokens, random labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
        if arch == "bert":
            labels = torch.randint(0, 3, (batch_size,), generator=g)
        else:
            labels = ids.clone()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def method_step(
    method: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, batch: dict
) -> Any:
    """One training step driven through the method protocol, in the training loop's order."""
    loss = model(**batch).loss
    penalty = method.penalty(model)
    (loss if penalty is None else loss + penalty).backward()
    opt.step()
    opt.zero_grad()
    return method.on_step_end(model, step, opt)


def eval_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits in eval mode (no dropout) without labels; the model is left in train mode."""
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    return out


# ---- saved to disk, with a tokenizer ---------------------------------------------------------------

WORDS = (
    "the a this it was is movie film plot acting story good great fine excellent superb lovely bad awful poor "
    "terrible boring dull what who where when capital of france england italy paris london rome answer yes no "
    "city country red blue green colour sky grass sea"
).split()
SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIALS_LM = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
POSITIVE = ("good", "great", "fine", "excellent", "superb", "lovely")
NEGATIVE = ("bad", "awful", "poor", "terrible", "boring", "dull")


def make_tiny_bert(
    path: Path, seed: int = 0, *, tokenizer_dir: Path | None = None, num_labels: int | None = None
) -> Path:
    """A 2-layer, 32-wide random BERT saved under ``path`` with a tokenizer.

    Args:
        path: where to save it.
        seed: seeds the weights.
        tokenizer_dir: take the tokenizer (and vocabulary size) from this model directory; default: a
            WordPiece tokenizer over :data:`WORDS`.
        num_labels: save a ``BertForSequenceClassification`` with this many labels (default: the bare
            encoder, whose head is created when loaded for classification).
    """
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
    )

    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        vocab = path / "vocab.txt"
        vocab.write_text("\n".join(SPECIALS_BERT + list(WORDS)) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
        vocab_size = len(SPECIALS_BERT) + len(WORDS)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        vocab_size = tokenizer.vocab_size
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **({"num_labels": num_labels} if num_labels is not None else {}),
    )
    (BertModel(config) if num_labels is None else BertForSequenceClassification(config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random LLaMA + word-level fast tokenizer saved under ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(SPECIALS_LM + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=vocab["[PAD]"],
        bos_token_id=vocab["[BOS]"],
        eos_token_id=vocab["[EOS]"],
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
