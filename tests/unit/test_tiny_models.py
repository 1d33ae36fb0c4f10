"""The tiny on-disk models of ``tests/helpers`` load with the Auto classes and tokenize the test words."""

from __future__ import annotations

from pathlib import Path

from helpers.tiny_models import make_tiny_bert, make_tiny_llama


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
