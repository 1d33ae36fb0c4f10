"""Tasks: SFT masking and truncation, collation, multiple-choice scoring, data loading errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.data_files import multiple_choice_rows, write_jsonl
from helpers.tiny_models import make_tiny_bert, make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from fimlora.data import DataError
from fimlora.errors import UsageError
from fimlora.tasks import (
    IGNORE_INDEX,
    DataSpec,
    classification_collator,
    encode_examples,
    load_multiple_choice,
    load_task_data,
    score_multiple_choice,
    sft_collator,
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = make_tiny_llama(tmp_path_factory.mktemp("tasks") / "llama")
    return {
        "tokenizer": AutoTokenizer.from_pretrained(path),
        "model": AutoModelForCausalLM.from_pretrained(path),
    }


def test_sft_loss_is_on_completion_tokens_only(llama: dict[str, Any]) -> None:
    tok = llama["tokenizer"]
    [row] = encode_examples(
        "sft", [{"prompt": "what is the capital of france", "completion": "paris"}], tok, 32
    )
    n_prompt = len(tok("what is the capital of france")["input_ids"])
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == [tok.convert_tokens_to_ids("paris"), tok.eos_token_id]
    assert row["input_ids"][n_prompt:] == row["labels"][n_prompt:]


def test_sft_truncation_keeps_the_completion_and_drops_the_prompt_start(llama: dict[str, Any]) -> None:
    tok = llama["tokenizer"]
    [row] = encode_examples(
        "sft", [{"prompt": "what is the capital of france", "completion": "paris"}], tok, 4
    )
    assert len(row["input_ids"]) == 4
    assert tok.convert_ids_to_tokens(row["input_ids"][:2]) == ["of", "france"]
    assert row["labels"][:2] == [IGNORE_INDEX] * 2


def test_collators_pad_right_and_mask_padding(llama: dict[str, Any], tmp_path: Path) -> None:
    tok = llama["tokenizer"]
    rows = encode_examples(
        "sft",
        [
            {"prompt": "what is", "completion": "paris"},
            {"prompt": "what is the colour of the sky", "completion": "blue"},
        ],
        tok,
        32,
    )
    batch = sft_collator(tok)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(rows[0]["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (
        batch["attention_mask"][0, short:] == 0
    ).all()
    bert_tok = AutoTokenizer.from_pretrained(make_tiny_bert(tmp_path / "bert"))
    cls_rows = encode_examples(
        "classification",
        [{"text": "the movie was good", "label": 1}, {"text": "bad", "label": 0}],
        bert_tok,
        16,
    )
    cls_batch = classification_collator(bert_tok)(cls_rows)
    assert cls_batch["labels"].tolist() == [1, 0] and cls_batch["input_ids"].shape[0] == 2
    assert cls_batch["attention_mask"][1].sum() == 3  # [CLS] bad [SEP]


def test_multiple_choice_picks_the_most_likely_choice(llama: dict[str, Any], tmp_path: Path) -> None:
    tok, model = llama["tokenizer"], llama["model"]
    examples = load_multiple_choice(write_jsonl(tmp_path / "mc.jsonl", multiple_choice_rows()))
    assert [e["answer"] for e in examples] == [0, 1, 1]  # "green" given as text -> index 1
    result = score_multiple_choice(model, tok, examples)
    # Brute force: sum of log p(choice token | input) for each single-token choice.
    for ex, pred in zip(examples, result["predictions"], strict=True):
        ids = tok(ex["input"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
        scores = [float(logp[tok.convert_tokens_to_ids(c)]) for c in ex["choices"]]
        assert pred == max(range(len(scores)), key=scores.__getitem__)
    assert result["n"] == 3


def test_multiple_choice_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least two choices"):
        load_multiple_choice(
            write_jsonl(tmp_path / "a.jsonl", [{"input": "q", "choices": ["x"], "answer": 0}])
        )
    with pytest.raises(DataError, match="neither a choice nor an index"):
        load_multiple_choice(
            write_jsonl(tmp_path / "b.jsonl", [{"input": "q", "choices": ["x", "y"], "answer": "z"}])
        )
    with pytest.raises(DataError, match="no column 'choices'"):
        load_multiple_choice(write_jsonl(tmp_path / "c.jsonl", [{"input": "q", "answer": 0}]))


def test_load_task_data_builtin_and_errors() -> None:
    data = load_task_data("classification", DataSpec(train="builtin:trec6", max_train=30, max_eval=10))
    assert len(data.train) == 30 and len(data.eval) == 10 and data.label_names and len(data.label_names) == 6
    with pytest.raises(UsageError, match="unknown builtin dataset"):
        load_task_data("classification", DataSpec(train="builtin:nope"))
    with pytest.raises(UsageError, match="no training data"):
        load_task_data("classification", DataSpec())
    with pytest.raises(UsageError, match="unknown task"):
        load_task_data("regression", DataSpec(train="x.csv"))
