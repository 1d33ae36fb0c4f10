"""``fimlora.export_adapter``: the engine-specific exports (padded, llama.cpp, peft), without llama.cpp.

llama.cpp's LoRA convention is emulated in torch here: one ``lora_alpha`` per adapter and module i scaled
by ``lora_alpha / r_i`` with ``r_i`` read from the tensor's shape (``llama_adapter_lora_weight::get_scale``).
The real engine's round trip is ``tests/serving/test_llama_cpp_round_trip.py`` (``pytest -m serving``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import batches, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from fimlora import export_adapter, export_uniform
from fimlora.cli import main
from fimlora.peft_glue import lora_modules
from fimlora.peft_glue.export import ENGINES, NOTE_FILE

# Per-module ranks as FIM-LoRA writes them: alpha_i = alpha * r_i / r, so every module's scale is alpha / r.
RANKS = {"q_proj": 2, "k_proj": 1, "v_proj": 6, "o_proj": 3, "gate_proj": 8, "up_proj": 5, "down_proj": 12}
R, ALPHA = 4, 8


def _adapter(tmp: Path, *, use_rslora: bool = False, lora_bias: bool = False) -> tuple[torch.nn.Module, Path]:
    """A tiny LLaMA with per-module ranks and alphas and random (nonzero) B; saved to ``tmp/adapter``."""
    config = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=list(RANKS),
        rank_pattern=dict(RANKS),
        alpha_pattern={k: ALPHA * r / R for k, r in RANKS.items()},
        use_rslora=use_rslora,
        lora_bias=lora_bias,
    )
    model = get_peft_model(tiny_llama(0), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in lora_modules(model).values():
            b = module.lora_B["default"]
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.3)
            if b.bias is not None:
                b.bias.copy_(torch.randn(b.bias.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(tmp / "adapter")
    return model, tmp / "adapter"


def _peft_deltas(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """PEFT's own effect of each module: ``scaling · B A`` (out × in) and ``scaling · bias`` (out)."""
    out = {}
    for name, module in lora_modules(model).items():
        s = module.scaling["default"]
        a, b = module.lora_A["default"], module.lora_B["default"]
        bias = None if b.bias is None else s * b.bias.detach()
        out[name] = (s * b.weight.detach() @ a.weight.detach(), bias)
    return out


def _llama_cpp_deltas(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The effect llama.cpp gives each module of this file: ``lora_alpha / r_i · B A``, r_i = B's columns."""
    alpha = json.loads((adapter_dir / "adapter_config.json").read_text())["lora_alpha"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            b = tensors[prefix + ".lora_B.weight"]
            s = alpha / b.shape[1]
            bias = tensors.get(prefix + ".lora_B.bias")
            out[prefix.removeprefix("base_model.model.")] = (s * b @ a, None if bias is None else s * bias)
    return out


def _relative_error(
    got: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    want: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
) -> dict[str, float]:
    assert set(got) == set(want)
    errors = {}
    for name, (w_want, b_want) in want.items():
        w_got, b_got = got[name]
        errors[name] = ((w_got - w_want).norm() / w_want.norm()).item()
        if b_want is not None:
            assert b_got is not None
            errors[name] = max(errors[name], ((b_got - b_want).norm() / b_want.norm()).item())
    return errors


@pytest.mark.parametrize("use_rslora", [False, True])
def test_llama_cpp_export_reproduces_peft_under_alpha_over_rank(tmp_path: Path, use_rslora: bool) -> None:
    model, src = _adapter(tmp_path, use_rslora=use_rslora)
    want = _peft_deltas(model)
    out = export_adapter(src, tmp_path / "llama", engine="llama.cpp")

    errors = _relative_error(_llama_cpp_deltas(out), want)
    assert max(errors.values()) <= 1e-6, errors
    # The raw adapter under the same convention is wrong wherever alpha_i != lora_alpha (every module
    # whose rank is not r), which is what llama.cpp does with it: it converts without a warning.
    raw = _relative_error(_llama_cpp_deltas(src), want)
    assert all(RANKS[n.split(".")[-1]] != R for n in raw)
    assert min(raw.values()) > 0.1, raw

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {} and config["use_rslora"] is False
    assert (
        config["lora_alpha"] == ALPHA
        and config["rank_pattern"] == json.loads((src / "adapter_config.json").read_text())["rank_pattern"]
    )
    exported = load_file(str(out / "adapter_model.safetensors"))
    for key, t in exported.items():  # every module keeps its own rank
        if key.endswith(".lora_A.weight"):
            assert t.shape[0] == RANKS[key.split(".")[-3]]


@pytest.mark.filterwarnings("ignore:.*lora_bias=True.*", "ignore:.*tensor\\(s\\) have invalid shape.*")
def test_lora_bias_padded_scales_it_and_llama_cpp_refuses_it(tmp_path: Path) -> None:
    model, src = _adapter(tmp_path, lora_bias=True)
    with pytest.raises(ValueError, match="no LoRA bias"):
        export_adapter(src, tmp_path / "llama", engine="llama.cpp")
    assert not (tmp_path / "llama").exists()
    padded = export_adapter(src, tmp_path / "padded", engine="padded")
    errors = _relative_error(_llama_cpp_deltas(padded), _peft_deltas(model))
    assert max(errors.values()) <= 1e-6  # scale 1 (r = lora_alpha): the folded bias is PEFT's scaled bias


def test_llama_cpp_export_loads_in_plain_peft_with_the_same_logits(tmp_path: Path) -> None:
    model, src = _adapter(tmp_path)
    inputs = {k: v for k, v in batches("llama", 1, seed=11)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    out = export_adapter(src, tmp_path / "llama", engine="llama.cpp")
    reloaded = PeftModel.from_pretrained(tiny_llama(0), out).eval()
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert {n: m.lora_A["default"].weight.shape[0] for n, m in lora_modules(reloaded).items()} == {
        n: m.lora_A["default"].weight.shape[0] for n, m in lora_modules(model).items()
    }
    assert (got - expected).abs().max().item() <= 1e-5


def test_llama_cpp_export_is_smaller_than_padded(tmp_path: Path) -> None:
    _, src = _adapter(tmp_path)
    padded = export_adapter(src, tmp_path / "padded", engine="padded")
    own = export_adapter(src, tmp_path / "llama", engine="llama.cpp")
    size = {p.name: (p / "adapter_model.safetensors").stat().st_size for p in (padded, own)}
    assert size["llama"] < 0.6 * size["padded"], size
    # padded is exactly export_uniform, and under llama.cpp's convention it is right too (scale 1)
    uniform = export_uniform(src, tmp_path / "uniform")
    assert (uniform / "adapter_model.safetensors").read_bytes() == (
        padded / "adapter_model.safetensors"
    ).read_bytes()


def test_each_export_writes_a_note_naming_its_engines(tmp_path: Path) -> None:
    _, src = _adapter(tmp_path)
    notes = {}
    for engine in ENGINES:
        out = export_adapter(src, tmp_path / engine.replace(".", "_"), engine=engine)
        text = (out / NOTE_FILE).read_text()
        correct, wrong = text.split("Not correct for:")
        notes[engine] = (correct.split("Correct for:")[1], wrong)
    assert all(e in notes["padded"][0] for e in ("vLLM", "SGLang", "llama.cpp", "PEFT"))
    assert "llama.cpp" in notes["llama.cpp"][0] and "PEFT" in notes["llama.cpp"][0]
    assert "vLLM" in notes["llama.cpp"][1] and "vLLM" not in notes["llama.cpp"][0]
    # the raw adapter has patterns: only PEFT is right, llama.cpp is named among the wrong ones
    assert "PEFT" in notes["peft"][0] and "llama.cpp" not in notes["peft"][0]
    assert "llama.cpp" in notes["peft"][1] and "--engine llama.cpp" in notes["peft"][1]


def test_peft_copy_is_identical(tmp_path: Path) -> None:
    _, src = _adapter(tmp_path)
    out = export_adapter(src, tmp_path / "copy", engine="peft")
    source_files = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted([*source_files, NOTE_FILE])
    for name in source_files:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_export_refuses_unknown_engine_and_existing_output(tmp_path: Path) -> None:
    _, src = _adapter(tmp_path)
    with pytest.raises(ValueError, match="padded, llama.cpp, peft"):
        export_adapter(src, tmp_path / "x", engine="vllm")
    assert not (tmp_path / "x").exists()
    out = export_adapter(src, tmp_path / "y", engine="llama.cpp")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_adapter(src, tmp_path / "y", engine="peft")
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_cli_export_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, src = _adapter(tmp_path)
    assert main(["export", str(src), "--engine", "llama.cpp", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / NOTE_FILE).is_file()
    errors = _relative_error(_llama_cpp_deltas(tmp_path / "cli"), _peft_deltas(model))
    assert max(errors.values()) <= 1e-6
    assert main(["export", str(src), "--out", str(tmp_path / "default")]) == 0  # padded by default
    config = json.loads((tmp_path / "default" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and config["r"] == config["lora_alpha"] == max(RANKS.values())
