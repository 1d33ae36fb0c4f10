"""The adapter is standard: a fresh process with only torch/transformers/peft reloads it exactly.

Also covers :func:`fimlora.export_uniform`, the single-rank form for serving engines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.reload import reload_in_fresh_process
from helpers.tiny_models import ARCHS, batches
from peft import LoraConfig, get_peft_model

from fimlora import FimConfig, export_uniform, initialize_lora_fim_ranks
from fimlora.peft_glue import lora_modules


def _train_a_few_steps(model: torch.nn.Module, arch: str, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches(arch, steps, seed=7):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _fim_model(arch: str, tmp: Path):
    build, kwargs = ARCHS[arch]
    base = build(0)
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)  # saved before wrapping: PEFT injects layers in place
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kwargs))
    rank_map = initialize_lora_fim_ranks(
        # raw scores: on a two-layer model "kind" can leave every rank at r, and this wants mixed ranks
        model,
        batches(arch),
        FimConfig(show_progress=False, r_min=1, r_max=12, normalize="none"),
    )
    _train_a_few_steps(model, arch)
    return model, rank_map, base_dir


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama-all-linear"])
def test_save_and_reload_with_plain_peft(tmp_path: Path, arch: str) -> None:
    model, rank_map, base_dir = _fim_model(arch, tmp_path)
    assert any(torch.count_nonzero(m.lora_B["default"].weight) > 0 for m in lora_modules(model).values())
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    inputs = {k: v for k, v in batches(arch, 1, seed=11)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    kind = "seq_cls" if arch == "bert" else "causal"
    got, ranks = reload_in_fresh_process(tmp_path, base_dir, adapter_dir, inputs, kind)
    assert ranks == dict(rank_map)
    assert len(set(ranks.values())) > 1
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "llama-all-linear"])
def test_export_uniform_reproduces_logits(tmp_path: Path, arch: str) -> None:
    model, rank_map, base_dir = _fim_model(arch, tmp_path)
    inputs = {k: v for k, v in batches(arch, 1, seed=11)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    out = export_uniform(model, tmp_path / "uniform")
    config = json.loads((out / "adapter_config.json").read_text())
    r_max = max(rank_map.values())
    assert config["r"] == config["lora_alpha"] == r_max
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    kind = "seq_cls" if arch == "bert" else "causal"
    got, ranks = reload_in_fresh_process(tmp_path, base_dir, out, inputs, kind)
    assert set(ranks.values()) == {r_max}
    assert (got - expected).abs().max().item() <= 1e-5


def test_export_uniform_from_directory_and_refuses_to_clobber(tmp_path: Path) -> None:
    model, _, _ = _fim_model("llama", tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    out = export_uniform(tmp_path / "adapter", tmp_path / "u")
    assert (out / "adapter_model.safetensors").is_file()
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_uniform(tmp_path / "adapter", tmp_path / "u")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export_uniform(tmp_path / "nowhere", tmp_path / "v")
    assert not (tmp_path / "v").exists()
