"""fim-spectrum: shares of gradient energy, the allocation rule (directions, not size), the statistics by
hand, and the final adapter: plain LoRA at the config's rank that vanilla PEFT reloads in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import ARCHS, batches
from peft import LoraConfig, get_peft_model
from test_methods_reload import _CHECK, OPTIONS, _train

from fimlora.methods import available_methods, get_method
from fimlora.methods.fim_spectrum import (
    SpectrumOptions,
    direction_shares,
    gradient_spectra,
    plan_spectrum_ranks,
)
from fimlora.peft_glue import lora_modules, module_shapes

SHAPES = {f"enc.layer.{i}.{kind}": (64, 64) for i in range(2) for kind in ("query", "value")}


def test_shares_are_each_modules_own_energy_split() -> None:
    assert direction_shares([1.0, 3.0, -1e-12]) == [0.75, 0.25, 0.0]
    assert direction_shares([1.0, 3.0], normalize=False) == [3.0, 1.0]
    assert direction_shares([0.0, 0.0]) == [0.0, 0.0]


def test_directions_not_size_decide_the_ranks() -> None:
    """A huge gradient concentrated in one direction gets fewer ranks than a small one spread evenly
    (normalize=True); ranked by raw energy (normalize=False), the huge one gets more."""
    spiky = [1000.0] + [2.0**-j for j in range(15)]
    flat = [1e-3] * 16
    spectra = {n: (spiky if "query" in n else flat) for n in SHAPES}

    def by_kind(ranks: dict[str, int]) -> tuple[int, int]:
        return sum(k for n, k in ranks.items() if "query" in n), sum(
            k for n, k in ranks.items() if "value" in n
        )

    opts = SpectrumOptions(budget_unit="ranks", r_min=1, r_max=16)
    ranks = plan_spectrum_ranks(spectra, SHAPES, opts, r=4)
    assert sum(ranks.values()) == 4 * len(SHAPES)  # exact rank budget
    assert by_kind(ranks) == (2, 14)  # the queries keep r_min: one direction holds ~all their energy
    raw = plan_spectrum_ranks(
        spectra, SHAPES, SpectrumOptions(budget_unit="ranks", r_min=1, r_max=16, normalize=False), r=4
    )
    assert by_kind(raw) == (14, 2)


def test_parameter_budget_and_bounds_hold() -> None:
    shapes = {**SHAPES, "enc.layer.0.ffn": (64, 256)}
    g = torch.Generator().manual_seed(0)
    spectra = {n: torch.rand(16, generator=g).tolist() for n in shapes}
    opts = SpectrumOptions(r_min=2, r_max=12)
    ranks = plan_spectrum_ranks(spectra, shapes, opts, r=4)
    costs = {n: sum(s) for n, s in shapes.items()}
    budget = 4 * sum(costs.values())
    used = sum(ranks[n] * costs[n] for n in shapes)
    assert used <= budget and budget - used < min(costs[n] for n in shapes if ranks[n] < 12)
    assert all(2 <= k <= 12 for k in ranks.values())
    with pytest.raises(ValueError, match="fewer than r_min"):
        plan_spectrum_ranks({n: [1.0] for n in shapes}, shapes, opts, r=4)


def test_options_are_checked() -> None:
    for bad, match in (
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"normalize": "yes"}, "normalize"),
        ({"r_min": 5, "r_max": 2}, "r_min"),
        ({"budget_ranks": 4, "budget_params": 40}, "only one"),
    ):
        with pytest.raises(ValueError, match=match):
            SpectrumOptions(**bad)
    assert "fim-spectrum" in available_methods()
    with pytest.raises(ValueError, match="calibration batches"):
        get_method("fim-spectrum").prepare(ARCHS["llama"][0](0), LoraConfig(r=4, target_modules=["q_proj"]))


def test_statistics_by_hand_are_the_stacked_sketches_spectrum() -> None:
    build, kwargs = ARCHS["llama"]
    data = batches("llama", 3)
    model = get_peft_model(build(0), LoraConfig(r=6, lora_alpha=12, **kwargs))
    spectra, seen = gradient_spectra(model, data, 3)
    assert seen == 3
    # by hand: each batch's B gradient with plain autograd, stacked, singular values squared
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in spectra}
    model.eval()
    for batch in data:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, m in lora_modules(model).items():
            grads[n].append(m.lora_B["default"].weight.grad.detach().double().clone())
    for n, gs in grads.items():
        expected = torch.linalg.svdvals(torch.cat(gs, dim=0)) ** 2
        torch.testing.assert_close(
            torch.tensor(spectra[n], dtype=torch.float64), expected, rtol=1e-6, atol=1e-18
        )
    assert all(p.grad is None for p in model.parameters() if p is not None and not p.requires_grad)


def test_prepare_gives_plain_lora_at_the_configs_rank_with_the_chosen_ranks() -> None:
    build, kwargs = ARCHS["llama"]
    method = get_method("fim-spectrum", calibration_batches=2, r_min=2, r_max=12)
    model = method.prepare(
        build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), calibration_batches=iter(batches("llama", 2))
    )
    cfg = model.peft_config["default"]
    mods = lora_modules(model)
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in mods.items()}
    assert cfg.r == 4 and ranks == dict(method.rank_map) and len(set(ranks.values())) > 1
    assert method.rank_map.metadata["calibration_rank"] == 12
    costs = {n: sum(s) for n, s in module_shapes(mods).items()}
    assert sum(ranks[n] * costs[n] for n in mods) <= 4 * sum(costs.values())
    assert all(float(m.lora_B["default"].weight.detach().abs().max()) == 0.0 for m in mods.values())  # B = 0
    assert all(abs(m.scaling["default"] - 2.0) < 1e-12 for m in mods.values())  # alpha/r kept per module


def test_fim_spectrum_adapter_reloads_with_plain_peft_in_a_fresh_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(OPTIONS, "fim-spectrum", {"calibration_batches": 2})
    build, _ = ARCHS["llama"]
    build(0).save_pretrained(tmp_path / "base")
    input_ids = batches("llama", 1, seed=5)[0]["input_ids"]
    model, ranks = _train("fim-spectrum")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path / "fim-spectrum")
    torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / "fim-spectrum" / "expected.pt")
    config = json.loads((tmp_path / "fim-spectrum" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["rank_pattern"].values()) == sorted(ranks.values())
    (tmp_path / "methods.json").write_text(json.dumps(["fim-spectrum"]))
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["fim-spectrum"] <= 1e-5
