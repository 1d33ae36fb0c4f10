"""The adapter is standard: a fresh process with only torch/transformers/peft reloads it exactly.

Also covers :func:`fimlora.export_uniform`, the single-rank form for serving engines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import ARCHS, batches
from peft import LoraConfig, get_peft_model

from fimlora import FimConfig, export_uniform, initialize_lora_fim_ranks
from fimlora.peft_glue import lora_modules

# Runs in a fresh interpreter that never imports fimlora.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from peft import PeftModel
    base_dir, adapter_dir, inputs_path, out_path, kind = sys.argv[1:6]
    assert "fimlora" not in sys.modules
    auto = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    base = auto.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(**inputs).logits
    ranks = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            ranks[name] = int(module.lora_A["default"].weight.shape[0])
    torch.save(logits, out_path)
    print(json.dumps({"ranks": ranks, "fimlora_imported": "fimlora" in sys.modules}))
    """
)


def _train_a_few_steps(model: torch.nn.Module, arch: str, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches(arch, steps, seed=7):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _reload_in_fresh_process(tmp: Path, base_dir: Path, adapter_dir: Path, inputs: dict, kind: str):
    inputs_path, out_path = tmp / "inputs.pt", tmp / "logits.pt"
    torch.save(inputs, inputs_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD_SCRIPT,
            str(base_dir),
            str(adapter_dir),
            str(inputs_path),
            str(out_path),
            kind,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["fimlora_imported"] is False
    return torch.load(out_path), info["ranks"]


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
    got, ranks = _reload_in_fresh_process(tmp_path, base_dir, adapter_dir, inputs, kind)
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
    got, ranks = _reload_in_fresh_process(tmp_path, base_dir, out, inputs, kind)
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
