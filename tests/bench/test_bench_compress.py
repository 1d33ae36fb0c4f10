"""The bench's ``compress_fractions`` option: a run's trained adapter, compressed and evaluated per fraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_bert

from bench.harness import RunSpec
from bench.suites import run_config_for, run_spec
from bench.suites.compress import check_compress_fractions


def test_compress_fractions_are_checked_before_a_run() -> None:
    assert check_compress_fractions(None) == () and check_compress_fractions([0.5, 1]) == (0.5, 1.0)
    for bad in ("0.5", [0.0], [1.5], [0.5, 0.5], [True], [float("nan")]):
        with pytest.raises(ValueError, match="compress_fractions"):
            check_compress_fractions(bad)
    with pytest.raises(ValueError, match="compress_fractions"):
        run_config_for("encoder", "trec6", "m", "uniform", "r2", 0, {"compress_fractions": [2.0]})


def test_a_run_records_its_adapter_compressed_and_evaluated(tmp_path: Path) -> None:
    from fimlora.models import embedded_model_dir

    model = make_tiny_bert(tmp_path / "tiny-bert", tokenizer_dir=embedded_model_dir(), num_labels=2)
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"this is {w} {i}", "label": int(w in words[3:])}) + "\n"
            for i in range(8)
            for w in words
        )
    )
    overrides = {
        "train": str(data),
        "eval": str(data),
        "max_eval": 32,
        "max_length": 16,
        "batch_size": 8,
        "lr": 1e-2,
        "device": "cpu",
        "target_modules": ["query", "value", "intermediate.dense"],
        "compress_fractions": [1.0, 0.5, 0.25],
    }
    spec = RunSpec("hf", "toy", str(model), "uniform", "r4", 0, overrides)
    outcome = run_spec(spec)
    compress = outcome["extra"]["compress"]
    assert list(compress) == ["1.0", "0.5", "0.25"]
    source = outcome["extra"]["lora_params"]
    # Full budget: the same adapter, so the same predictions and accuracy.
    assert compress["1.0"]["accuracy"] == outcome["metrics"]["accuracy"]
    assert compress["1.0"]["lora_params"] == source == compress["1.0"]["source_lora_params"]
    assert compress["1.0"]["kept_energy_fraction"] == pytest.approx(1.0)
    for fraction in ("0.5", "0.25"):
        entry = compress[fraction]
        assert entry["lora_params"] <= float(fraction) * source
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert sum(entry["rank_map"].values()) == entry["total_rank"]
    assert compress["0.25"]["kept_energy_fraction"] <= compress["0.5"]["kept_energy_fraction"] < 1.0
    json.dumps(outcome)  # the record stays JSON
