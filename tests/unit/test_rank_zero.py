"""Rank 0: an allocation may drop modules (``r_min=0``), and the dropped modules leave the adapter cleanly.

Budgets below one rank per module need it: with ``r_min >= 1`` the only map at a budget of one rank a module
is the uniform one. A dropped module keeps no LoRA layer, the saved adapter's ``target_modules`` lists the
modules kept, and vanilla PEFT reloads it exactly in a fresh process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.reload import reload_in_fresh_process
from helpers.tiny_models import ARCHS, batches, method_step, peft_model
from peft import LoraConfig, get_peft_model

from fimlora import (
    FimConfig,
    RankMap,
    allocate_ranks,
    export_uniform,
    initialize_lora_fim_ranks,
    lora_config_with_ranks,
)
from fimlora.methods.base import get_method
from fimlora.peft_glue import (
    apply_rank_map,
    current_ranks,
    drop_lora_modules,
    lora_config,
    lora_layout,
    lora_modules,
    restore_lora_layout,
)

# ---- the map and the allocator ---------------------------------------------------------------------------


def test_rankmap_holds_zero_and_names_the_dropped() -> None:
    rm = RankMap({"a": 3, "b": 0, "c": 1})
    assert rm.dropped == ["b"] and rm.total_rank == 4
    assert RankMap.from_dict(rm.to_dict()) == rm
    with pytest.raises(ValueError, match="module 'b'.*>= 0"):
        RankMap({"a": 1, "b": -1})


def test_allocator_with_r_min_zero_meets_a_budget_below_one_rank_a_module() -> None:
    scores = {f"m{i}": float(s) for i, s in enumerate([8, 4, 2, 1, 0.5, 0.25, 0.0, 0.0])}
    with pytest.raises(ValueError, match="infeasible"):
        allocate_ranks(scores, budget_ranks=4, r_min=1, r_max=8)
    rm = allocate_ranks(scores, budget_ranks=4, r_min=0, r_max=8)
    assert rm.total_rank == 4
    assert rm["m0"] >= rm["m1"] >= rm["m2"]  # proportional: the largest scores keep their ranks
    assert {"m6", "m7"} <= set(rm.dropped)  # no signal, no rank
    costs = {n: 10 + i for i, n in enumerate(scores)}
    by_params = allocate_ranks(scores, budget_params=40, costs=costs, r_min=0, r_max=8)
    used = sum(r * costs[n] for n, r in by_params.items())
    assert used <= 40 and 40 - used < min(costs.values())
    with pytest.raises(ValueError, match="r_min.*>= 0"):
        allocate_ranks(scores, budget_ranks=4, r_min=-1)
    with pytest.raises(ValueError, match="r_max.*positive"):
        allocate_ranks(scores, budget_ranks=4, r_min=0, r_max=0)


def test_fim_config_takes_r_min_zero_and_refuses_negative() -> None:
    assert FimConfig(r_min=0).resolved_bounds(8) == (0, 32)
    with pytest.raises(ValueError, match="r_min"):
        FimConfig(r_min=-1)


# ---- applied to a PEFT model -------------------------------------------------------------------------------


def _dropping_config(model: torch.nn.Module, keep_fraction: float = 0.5) -> FimConfig:
    n = len(lora_modules(model))
    return FimConfig(
        show_progress=False,
        r_min=0,
        r_max=8,
        normalize="none",
        budget_unit="ranks",
        budget_ranks=max(1, int(n * keep_fraction)),
    )


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_dropped_modules_leave_the_adapter_and_plain_peft_reloads_it(tmp_path: Path, arch: str) -> None:
    build, kwargs = ARCHS[arch]
    base = build(0)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kwargs))
    names = list(lora_modules(model))
    rank_map = initialize_lora_fim_ranks(model, batches(arch), _dropping_config(model))
    assert rank_map.dropped, "a budget of half a rank a module must drop modules"
    kept = [n for n in names if rank_map[n] > 0]
    assert current_ranks(model) == {n: rank_map[n] for n in kept}
    root = model.base_model.model
    for name in rank_map.dropped:  # the base layer is back in place, with no LoRA on it
        assert not hasattr(root.get_submodule(name), "lora_A")
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    shapes = rank_map.metadata["shapes"]
    assert trainable == sum(rank_map[n] * sum(shapes[n]) for n in names)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches(arch, 3, seed=7):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(kept)
    assert len(saved["rank_pattern"]) == len(kept)
    inputs = {k: v for k, v in batches(arch, 1, seed=11)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    got, ranks = reload_in_fresh_process(
        tmp_path, base_dir, adapter_dir, inputs, "seq_cls" if arch == "bert" else "causal"
    )
    assert ranks == {n: rank_map[n] for n in kept}
    assert (got - expected).abs().max().item() <= 1e-5


def test_padded_export_of_a_model_with_dropped_modules_reproduces_it(tmp_path: Path) -> None:
    build, kwargs = ARCHS["llama"]
    base = build(0)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kwargs))
    rank_map = initialize_lora_fim_ranks(model, batches("llama"), _dropping_config(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches("llama", 2, seed=7):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    inputs = {k: v for k, v in batches("llama", 1, seed=11)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    out = export_uniform(model, tmp_path / "padded")
    got, ranks = reload_in_fresh_process(tmp_path, base_dir, out, inputs, "causal")
    assert set(ranks) == {n for n, r in rank_map.items() if r > 0}
    assert set(ranks.values()) == {max(rank_map.values())}
    assert (got - expected).abs().max().item() <= 1e-5


def test_config_with_ranks_targets_only_the_modules_kept() -> None:
    calibrated = peft_model("llama")
    names = list(lora_modules(calibrated))
    ranks = {n: (0 if i % 3 == 0 else 2 + i % 2) for i, n in enumerate(names)}
    base_config = lora_config(calibrated)
    config = lora_config_with_ranks(base_config, RankMap(ranks), model=calibrated)
    fresh = get_peft_model(ARCHS["llama"][0](0), config)
    assert current_ranks(fresh) == {n: r for n, r in ranks.items() if r > 0}
    with pytest.raises(ValueError, match="every rank in the map is 0"):
        lora_config_with_ranks(base_config, RankMap(dict.fromkeys(names, 0)))


def test_checkpoint_layout_restores_the_drops_on_a_fresh_model() -> None:
    model = peft_model("bert")
    initialize_lora_fim_ranks(model, batches("bert"), _dropping_config(model))
    layout = json.loads(json.dumps(lora_layout(model)))  # as a checkpoint stores it
    fresh = peft_model("bert")
    restore_lora_layout(fresh, layout)
    assert current_ranks(fresh) == current_ranks(model)
    assert sorted(lora_config(fresh).target_modules) == sorted(lora_config(model).target_modules)


def test_drop_refuses_unknown_modules_and_dropping_everything() -> None:
    model = peft_model("bert")
    names = list(lora_modules(model))
    with pytest.raises(ValueError, match="not LoRA layers"):
        drop_lora_modules(model, ["no.such.module"])
    with pytest.raises(ValueError, match="keep at least one"):
        drop_lora_modules(model, names)
    assert list(lora_modules(model)) == names  # nothing changed
    with pytest.raises(ValueError, match="every rank in the map is 0"):
        apply_rank_map(model, dict.fromkeys(names, 0))
    with pytest.raises(ValueError, match=">= 0"):
        apply_rank_map(model, {**dict.fromkeys(names, 1), names[0]: -1})
    assert list(lora_modules(model)) == names and set(current_ranks(model).values()) == {4}


def test_a_module_shared_with_another_adapter_is_not_dropped() -> None:
    model = peft_model("bert")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["query"]))
    shared = next(n for n in lora_modules(model) if n.endswith("query"))
    with pytest.raises(ValueError, match="also carries adapter"):
        drop_lora_modules(model, [shared])


@pytest.mark.parametrize("name", ["fim", "fim-shuffled", "random"])
def test_methods_drop_modules_and_report_them_at_rank_zero(name: str) -> None:
    base = ARCHS["llama"][0](0)
    probe = peft_model("llama")
    fim_config = _dropping_config(probe)
    fields = {f: getattr(fim_config, f) for f in ("r_min", "r_max", "budget_unit", "budget_ranks")}
    method = get_method(name, **fields)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ARCHS["llama"][1]["target_modules"])
    model = method.prepare(base, lora, calibration_batches=batches("llama"), total_steps=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    method_step(method, model, opt, 0, batches("llama", 1)[0])
    model, final = method.finalize(model)
    assert final.dropped and final.total_rank == fim_config.budget_ranks
    assert set(final) == set(lora_modules(probe))  # every target module is in the map, dropped ones at 0
    assert current_ranks(model) == {n: r for n, r in final.items() if r > 0}
