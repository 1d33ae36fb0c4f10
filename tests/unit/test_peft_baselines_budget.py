"""AdaLoRA and EVA held to uniform LoRA's parameter count (``budget_unit="params"``)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from helpers.tiny_models import ARCHS, batches, method_step
from peft import LoraConfig

from fimlora.allocate import select_within_budget
from fimlora.methods import get_method
from fimlora.methods.adalora import AdaLoraMethod, AdaLoraOptions, cubic_budget
from fimlora.methods.eva import EvaOptions
from fimlora.peft_glue.eva import CostWeightedEvaRanks

# ---- the pure selection ------------------------------------------------------------------------------------


def _kept_cost(keep: list[bool], costs: list[int]) -> int:
    return sum(c for c, k in zip(costs, keep, strict=True) if k)


@pytest.mark.parametrize("seed", range(30))
def test_selection_never_exceeds_the_budget_and_leaves_less_than_any_item_left_out(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    scores = [rng.choice([rng.random(), 0.5]) for _ in range(n)]  # some ties
    costs = [rng.choice([48, 64, 96, 160]) for _ in range(n)]
    budget = rng.randint(0, sum(costs) + 50)
    keep = select_within_budget(scores, costs, budget)
    spent = _kept_cost(keep, costs)
    assert spent <= budget
    left_out = [c for c, k in zip(costs, keep, strict=True) if not k]
    if left_out:
        assert budget - spent < min(left_out)  # no item left out would still fit
    else:
        assert spent == sum(costs)


def test_selection_follows_importance_and_skips_only_what_does_not_fit() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    costs = [10, 30, 10, 10, 5]
    # 0.9 (10) fits, 0.8 (30) does not in 25, 0.7 and 0.6 do (20), 0.5 (5) fills the rest exactly.
    assert select_within_budget(scores, costs, 35) == [True, False, True, True, True]
    # With equal costs it is the top-k by score.
    assert select_within_budget([0.1, 0.9, 0.5, 0.7], [4] * 4, 8) == [False, True, False, True]
    # A more important item is never left out for a less important one of the same cost.
    rng = random.Random(0)
    scores = [rng.random() for _ in range(50)]
    costs = [rng.choice([3, 7]) for _ in range(50)]
    keep = select_within_budget(scores, costs, 120)
    for i in range(50):
        for j in range(50):
            if keep[j] and not keep[i] and costs[i] == costs[j]:
                assert scores[i] <= scores[j]


def test_selection_breaks_ties_by_position_deterministically() -> None:
    assert select_within_budget([1.0, 1.0, 1.0], [5, 5, 5], 10) == [True, True, False]
    assert select_within_budget([0.0, 2.0, 2.0, 2.0], [1, 1, 1, 1], 2) == [False, True, True, False]


def test_selection_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        select_within_budget([1.0], [1, 2], 3)
    with pytest.raises(ValueError, match="`budget`"):
        select_within_budget([1.0], [1], -1)
    with pytest.raises(ValueError, match="`costs`"):
        select_within_budget([1.0], [0], 3)
    with pytest.raises(ValueError, match="NaN"):
        select_within_budget([float("nan")], [1], 3)


def test_cubic_budget_runs_from_start_to_end_over_the_pruning_phase() -> None:
    kw = {"tinit": 2, "tfinal": 3, "total": 12, "start": 1200, "end": 800}
    values = [cubic_budget(step, **kw) for step in range(12)]
    assert values[:3] == [1200, 1200, 1200]
    assert values[9:] == [800, 800, 800]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # never grows
    assert 800 < values[3] < 1200


# ---- options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [AdaLoraOptions, EvaOptions])
def test_budget_unit_is_validated(options: type) -> None:
    assert options().budget_unit == "ranks"
    assert options(budget_unit="params").budget_unit == "params"
    with pytest.raises(ValueError, match="`budget_unit` must be 'ranks' or 'params', got 'parameters'"):
        options(budget_unit="parameters")


# ---- AdaLoRA -----------------------------------------------------------------------------------------------


def _train_adalora(
    arch: str, unit: str, *, steps: int = 12, run: int | None = None
) -> tuple[AdaLoraMethod, torch.nn.Module]:
    """AdaLoRA at r = 4 (init_r 6, tinit 2, tfinal 3) for ``run`` of its ``steps`` steps (default: all)."""
    build, kwargs = ARCHS[arch]
    method = AdaLoraMethod(tinit=2, tfinal=3, budget_unit=unit)
    model = method.prepare(build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), total_steps=steps)
    opt = torch.optim.AdamW(method.param_groups(model, lr=2e-2))
    for step, batch in enumerate(batches(arch, steps if run is None else run)):
        method_step(method, model, opt, step, batch)
    return method, model


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_adalora_params_ends_as_plain_lora_within_the_parameter_budget(arch: str) -> None:
    method, model = _train_adalora(arch, "params")
    root = model.base_model
    pattern = root.peft_config["default"].rank_pattern  # the final mask, set at tfinal
    plain, rank_map = method.finalize(model)
    assert type(plain.peft_config["default"]).__name__ == "LoraConfig"
    meta = rank_map.metadata
    assert meta["config"]["budget_unit"] == "params"
    assert meta["total_params"] <= meta["uniform_params"]
    assert meta["params_vs_uniform"] >= 0.98
    # The LoRA model's own parameter count is the one reported, and the final mask is what it kept.
    lora_params = sum(p.numel() for n, p in plain.named_parameters() if "lora_" in n)
    assert lora_params == meta["total_params"]
    assert sum(sum(mask) for mask in pattern.values()) == meta["total_rank"]


def test_adalora_params_masks_hold_the_schedule_in_parameters() -> None:
    _, model = _train_adalora("llama", "params", run=6)  # stopped inside the pruning phase
    alloc = model.base_model.rankallocator
    costs = {n: m.lora_A["default"].shape[1] + m.lora_B["default"].shape[0] for n, m in _layers(model)}
    start, target = 6 * sum(costs.values()), 4 * sum(costs.values())  # init_r = ceil(1.5 * 4) = 6
    assert alloc.budget_schedule(0) == (start, False)
    assert alloc.budget_schedule(9) == (target, True)
    budget, mask = alloc.budget_schedule(5)
    assert mask and target < budget < start
    pattern = alloc.mask_to_budget(model.base_model.model, budget)
    module = {f"{n}.lora_E.default": n for n in costs}
    spent = sum(sum(keep) * costs[module[key]] for key, keep in pattern.items())
    assert spent <= budget
    left_out = [costs[module[key]] for key, keep in pattern.items() if not all(keep)]
    assert budget - spent < min(left_out)
    for name, layer in _layers(model):  # the singular values left out are zeroed
        keep = torch.tensor(pattern[f"{name}.lora_E.default"])
        assert not torch.any(layer.lora_E["default"][~keep])


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_E")]


def test_adalora_ranks_keeps_peft_allocator_and_rank_sum() -> None:
    method, model = _train_adalora("llama", "ranks")
    alloc = model.base_model.rankallocator
    assert "mask_to_budget" not in vars(alloc) and "budget_schedule" not in vars(alloc)  # PEFT's own methods
    _, rank_map = method.finalize(model)
    assert rank_map.metadata["total_rank"] == rank_map.metadata["uniform_rank"]


# ---- EVA ---------------------------------------------------------------------------------------------------


def _eva(arch: str, unit: str, *, r: int = 4, rho: float = 2.0) -> tuple[torch.nn.Module, dict]:
    build, kwargs = ARCHS[arch]
    method = get_method("eva", rho=rho, budget_unit=unit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = method.prepare(
            build(0),
            LoraConfig(r=r, lora_alpha=8, **kwargs),
            calibration_batches=batches(arch, 8, batch_size=8),
        )
    plain, rank_map = method.finalize(model)
    return plain, dict(rank_map.metadata)


@pytest.mark.parametrize(("arch", "r", "rho"), [("llama", 4, 2.0), ("llama", 1, 6.0), ("gpt2", 4, 2.0)])
def test_eva_params_holds_the_parameter_budget(arch: str, r: int, rho: float) -> None:
    plain, meta = _eva(arch, "params", r=r, rho=rho)
    assert meta["config"]["budget_unit"] == "params"
    assert meta["total_params"] <= meta["uniform_params"]
    assert meta["params_vs_uniform"] >= 0.98
    lora_params = sum(p.numel() for n, p in plain.named_parameters() if "lora_" in n)
    assert lora_params == meta["total_params"]
    assert max(plain.peft_config["default"].rank_pattern.values(), default=r) <= round(rho * r)


def test_eva_params_drops_modules_left_without_components_like_peft() -> None:
    # r = 1, rho = 6: many candidates per module, so some modules get none (seen on this tiny LLaMA).
    plain, meta = _eva("llama", "params", r=1, rho=6.0)
    zero = meta["zero_rank_modules"]
    assert zero, "this setting is meant to leave some module without a component"
    adapted = {n for n, m in plain.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert not adapted & set(zero)  # PEFT put their base layers back
    # P counts every targeted module, the dropped ones too: per layer q 32+32, k and v 32+16, o 32+32,
    # gate and up 32+64, down 64+32; two layers; r = 1.
    assert meta["uniform_params"] == 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
    assert meta["uniform_rank"] == 14
    assert set(meta["shapes"]).isdisjoint(zero)  # finalize lists the adapted modules' shapes


def test_eva_ranks_is_unchanged() -> None:
    _, meta = _eva("llama", "ranks")
    assert meta["total_rank"] == meta["uniform_rank"]
    from peft.tuners.lora import eva

    assert eva.Counter.__name__ == "Counter"  # the stand-in is gone after a run


def test_eva_stand_in_is_removed_even_on_error() -> None:
    from collections import Counter

    from peft.tuners.lora import eva

    selection = CostWeightedEvaRanks({"a": 2}, budget=4, most=2)
    with pytest.raises(RuntimeError, match="boom"), selection.installed():
        assert eva.Counter is selection
        raise RuntimeError("boom")
    assert eva.Counter is Counter
    assert eva.find_equal_values.__name__ == "find_equal_values"


def test_eva_choice_survives_peft_swaps_in_equal_input_groups() -> None:
    # q and k share an input (one SVD); PEFT gives the layer holding the SVD (q) the larger count.
    selection = CostWeightedEvaRanks({"q": 64, "k": 48, "o": 64}, budget=4 * 64, most=3)
    counts = selection(["k", "k", "q", "o", "k", "q", "o", "q", "o"])  # best first
    assert counts == {"k": 2, "q": 1, "o": 1}  # 2*48 + 64 + 64 = 224; a third k (48) does not fit
    shared = torch.arange(9.0).view(3, 3)  # the group's components, best first
    selection.groups = [["q", "k"]]
    swapped = {"q": shared[:2], "k": shared[:1], "o": torch.ones(1, 3)}  # as PEFT returns them
    fixed = selection.restore_choice(swapped)
    assert {n: u.shape[0] for n, u in fixed.items()} == counts
    torch.testing.assert_close(fixed["k"], shared[:2])
    torch.testing.assert_close(fixed["q"], shared[:1])


def test_eva_stand_in_refuses_an_incomplete_order() -> None:
    selection = CostWeightedEvaRanks({"q": 64, "k": 48}, budget=256, most=2)
    with pytest.raises(RuntimeError, match="every candidate"):
        selection(["q", "k", "q"])
