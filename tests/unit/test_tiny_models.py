"""The tiny on-disk models of ``tests/helpers`` load with the Auto classes and tokenize the test words."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_no_progress_hides_transformers_loading_bar(tmp_path, capsys) -> None:
    """``--no-progress`` (progress=False) silences transformers' "Loading weights" bar, and only while loading."""
    from transformers.utils import logging as hf_logging

    from fimlora.models import load_model_and_tokenizer

    model_dir = make_tiny_bert(tmp_path / "bert")
    load_model_and_tokenizer(str(model_dir), num_labels=2, progress=True)
    shown = capsys.readouterr().err
    load_model_and_tokenizer(str(model_dir), num_labels=2, progress=False)
    hidden = capsys.readouterr().err
    if "Loading weights" not in shown:  # transformers < 5 shows no such bar for a small model
        pytest.skip("this transformers shows no 'Loading weights' bar, so there is nothing to hide")
    assert "Loading weights" not in hidden
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is restored
