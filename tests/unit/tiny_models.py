"""Tiny random models built from configs (no downloads) and batch streams for the core tests."""

from __future__ import annotations

from collections.abc import Callable
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
