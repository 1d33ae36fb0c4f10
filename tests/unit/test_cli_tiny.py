"""Tiny random models *saved to disk with a tokenizer* and tiny data files, for the CLI/training tests.

Built offline: a BERT with a ``BertTokenizerFast`` from a vocab file we write, and a LLaMA with a
word-level ``PreTrainedTokenizerFast`` from the ``tokenizers`` library. Other test modules import the
builders from here (``from test_cli_tiny import ...``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

WORDS = (
    "the a this it was is movie film plot acting story good great fine excellent superb lovely bad awful poor "
    "terrible boring dull what who where when capital of france england italy paris london rome answer yes no "
    "city country red blue green colour sky grass sea"
).split()
SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIALS_LM = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
POSITIVE = ("good", "great", "fine", "excellent", "superb", "lovely")
NEGATIVE = ("bad", "awful", "poor", "terrible", "boring", "dull")


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random BERT encoder + WordPiece tokenizer saved under ``path``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS_BERT + list(WORDS)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(SPECIALS_BERT) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
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


def classification_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Deterministic sentiment sentences, labels ``pos``/``neg``, alternating."""
    rows = []
    for i in range(offset, offset + n):
        words = POSITIVE if i % 2 == 0 else NEGATIVE
        noun = ("movie", "film", "plot", "acting", "story")[i % 5]
        rows.append(
            {
                "text": f"the {noun} was {words[i % 6]} {words[(i // 6) % 6]}",
                "label": "pos" if i % 2 == 0 else "neg",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


_FACTS = [
    ("capital of france", "paris"),
    ("capital of england", "london"),
    ("capital of italy", "rome"),
    ("colour of the sky", "blue"),
    ("colour of grass", "green"),
    ("colour of the sea", "blue"),
]


def sft_rows(n: int) -> list[dict[str, str]]:
    """Prompt/completion pairs over a few facts, repeated."""
    return [{"prompt": f"what is the {q}", "completion": a} for q, a in (_FACTS * (n // len(_FACTS) + 1))[:n]]


def multiple_choice_rows() -> list[dict[str, object]]:
    return [
        {"input": "what is the capital of france", "choices": ["paris", "london", "rome"], "answer": 0},
        {"input": "what is the colour of grass", "choices": ["red", "green"], "answer": "green"},
        {"input": "what is the capital of italy", "choices": ["london", "rome"], "answer": 1},
    ]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_models_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    bert = make_tiny_bert(tmp_path / "bert")
    tok = AutoTokenizer.from_pretrained(bert)
    assert tok("the movie was good")["input_ids"][0] == tok.cls_token_id
    assert AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2).config.num_labels == 2
    llama = make_tiny_llama(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(llama)
    assert tok.unk_token_id not in tok("what is the capital of france")["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(llama).config.vocab_size == len(tok)
