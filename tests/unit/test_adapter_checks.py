"""Run-time checks on rewritten adapters: they fire on a wrong rewrite, name the versions, and leave the
user's model (and files) as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import batches
from test_methods_peft_baselines import _logits, _train_adalora

import fimlora.peft_glue.adalora as glue_adalora
from fimlora.errors import AdapterCheckError
from fimlora.peft_glue.verify import ProbedUpdate, check_updates, factor_update, installed_versions


def _one_line_naming_versions(err: pytest.ExceptionInfo[AdapterCheckError]) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert installed_versions() in message  # e.g. "peft 0.22.0, transformers 5.25.0"
    assert "nothing was written" in message and "tested with peft" in message
    return message


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_adalora_conversion_that_drops_a_scale_is_refused_and_the_model_kept(
    monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    method, model = _train_adalora(arch)
    batch = batches(arch, 1, seed=7)[0]
    before = _logits(model, batch)
    real = glue_adalora._lora_form

    def half_scale(*args, **kwargs):  # a conversion that loses a factor 2 of AdaLoRA's scale
        found = real(*args, **kwargs)
        return None if found is None else (found[0], found[1] / 2)

    monkeypatch.setattr(glue_adalora, "_lora_form", half_scale)
    with pytest.raises(AdapterCheckError) as err:
        method.finalize(model)
    message = _one_line_naming_versions(err)
    assert "AdaLoRA -> LoRA conversion changed module" in message and "tested with peft" in message
    # The AdaLoRA model is put back: same layers, same outputs.
    assert type(model.peft_config["default"]).__name__ == "AdaLoraConfig"
    torch.testing.assert_close(_logits(model, batch), before, atol=0, rtol=0)


def test_adalora_conversion_that_loses_the_trained_head_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # What peft 0.22's unload() did to fimlora's conversion: the classifier came back untrained.
    method, model = _train_adalora("bert")
    batch = batches("bert", 1, seed=7)[0]
    before = _logits(model, batch)
    monkeypatch.setattr(glue_adalora, "load_saved_module_states", lambda *args, **kwargs: None)
    with pytest.raises(AdapterCheckError) as err:
        method.finalize(model)
    assert "trained copy of classifier" in _one_line_naming_versions(err)
    torch.testing.assert_close(_logits(model, batch), before, atol=0, rtol=0)


def test_check_updates_tolerates_rounding_only() -> None:
    a, b = torch.randn(3, 8), torch.randn(5, 3)
    same = factor_update(a, b, 0.5)
    check_updates({"m": same}, {"m": factor_update(a.double().float(), b, 0.5)}, what="x")
    nudged = ProbedUpdate(same.value * (1 + 1e-6), same.noise)
    check_updates({"m": same}, {"m": nudged}, what="x")
    with pytest.raises(AdapterCheckError, match="x changed module m's update"):
        check_updates({"m": same}, {"m": factor_update(a, b, 0.51)}, what="x")


def test_a_module_on_one_side_only_must_have_a_zero_update() -> None:
    a, b = torch.randn(3, 8), torch.randn(5, 3)
    zero = factor_update(a, torch.zeros_like(b), 1.0)
    check_updates({"gone": zero}, {}, what="x")  # pruned to nothing and left out: fine
    with pytest.raises(AdapterCheckError, match="module gone"):
        check_updates({"gone": factor_update(a, b, 1.0)}, {}, what="x")
    with pytest.raises(AdapterCheckError, match="module new"):
        check_updates({}, {"new": factor_update(a, b, 1.0)}, what="x")


def test_cli_adalora_run_with_a_wrong_conversion_exits_2_in_one_line_and_writes_no_adapter(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from helpers.data_files import classification_rows, write_csv
    from helpers.tiny_models import make_tiny_bert

    from fimlora.cli import main

    model_dir = make_tiny_bert(tmp_path / "bert")
    data = write_csv(tmp_path / "train.csv", classification_rows(32))
    out = tmp_path / "run"
    capsys.readouterr()  # the tiny model's own save progress
    monkeypatch.setattr(glue_adalora, "load_saved_module_states", lambda *args, **kwargs: None)
    code = main(
        ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--method", "adalora",
         "--r", "4", "--batch-size", "8", "--max-steps", "6", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("fimlora: error: "), lines
    assert "trained copy of classifier" in lines[0] and "peft " in lines[0]
    assert not out.exists()
    assert not list(tmp_path.rglob("adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resize_that_loses_a_scale_on_kept_columns_is_refused_and_rolled_back(
    monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    from helpers.tiny_models import peft_model

    import fimlora.peft_glue.resize as glue_resize
    from fimlora.peft_glue import current_ranks, lora_factors, lora_modules, resize_lora_modules

    model = peft_model(arch)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            lora_factors(layer)[1].weight.normal_()  # a trained B, so the update is not zero
    batch = batches(arch, 1, seed=7)[0]
    before, ranks = _logits(model, batch), current_ranks(model)
    name = next(iter(ranks))
    resize_lora_modules(model, {name: 2}, keep={name: [0, 2]})  # the real resize passes its own check
    real = glue_resize._copy_kept

    def halve_b(module, adapter, old, idx):  # a rebuild that loses a factor 2 of the kept update
        real(module, adapter, old, idx)
        with torch.no_grad():
            module.lora_B[adapter].weight.mul_(0.5)

    monkeypatch.setattr(glue_resize, "_copy_kept", halve_b)
    other = list(ranks)[1]
    kept_before = _logits(model, batch)
    with pytest.raises(AdapterCheckError) as err:
        resize_lora_modules(model, {other: 3}, keep={other: [0, 1, 3]})
    assert "resizing LoRA modules (kept rank columns) changed module" in _one_line_naming_versions(err)
    assert current_ranks(model) == {**ranks, name: 2}  # rolled back: only the first resize stands
    torch.testing.assert_close(_logits(model, batch), kept_before, atol=0, rtol=0)
    assert not torch.equal(kept_before, before)  # (the first resize did drop two columns)


@pytest.mark.parametrize("engine", ["padded", "llama.cpp"])
def test_an_export_that_loses_a_scale_is_refused_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, engine: str
) -> None:
    from test_export_engines import _adapter

    import fimlora.peft_glue.export as glue_export
    from fimlora.peft_glue import export_adapter

    _, src = _adapter(tmp_path)
    real = glue_export._scaled
    monkeypatch.setattr(glue_export, "_scaled", lambda t, factor: real(t, factor * 0.9))
    out = tmp_path / "served"
    with pytest.raises(AdapterCheckError) as err:
        export_adapter(src, out, engine=engine)
    assert f"the {engine} export changed module" in _one_line_naming_versions(err)
    assert not out.exists() and not list(tmp_path.glob(".served*"))


def test_a_compress_whose_files_disagree_with_its_factors_is_refused_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from test_compress import _trained_adapter

    import fimlora.peft_glue.compress_io as glue_compress_io
    from fimlora.compress import compress_adapter

    _, _, adapter_dir = _trained_adapter("llama", tmp_path)
    real = glue_compress_io.pattern_key
    first: list[str] = []

    def first_key_misses(name: str) -> str:  # an alpha_pattern key PEFT would not match for one module
        first.append(name)
        return real(name) if len(first) > 1 else real(name) + "_"

    monkeypatch.setattr(glue_compress_io, "pattern_key", first_key_misses)
    out = tmp_path / "small"
    with pytest.raises(AdapterCheckError) as err:
        compress_adapter(adapter_dir, out, fraction=0.5, plot=False)
    assert "writing the compressed adapter" in _one_line_naming_versions(err)
    assert not out.exists() and not list(tmp_path.glob(".small*"))
