"""L1RA: budget invariant, exactness of resizes and gate folding, optimizer consistency, resume."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers.tiny_models import ARCHS, batches, eval_logits, method_step
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from fimlora.methods import get_method
from fimlora.methods.budget import RankBudget
from fimlora.methods.l1ra import L1raMethod, L1raOptions, plan_reallocation
from fimlora.methods.optim_state import stale_optimizer_params
from fimlora.peft_glue import current_ranks, lora_modules, module_shapes


def _prepare(arch: str, steps: int, seed: int = 0, **options: Any) -> tuple[L1raMethod, torch.nn.Module]:
    build, kwargs = ARCHS[arch]
    method = L1raMethod(L1raOptions(**options))
    model = method.prepare(build(seed), LoraConfig(r=4, lora_alpha=8, **kwargs), total_steps=steps)
    return method, model


def _randomise_b(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)


# ---- configuration errors surface before training --------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"l1_lambda": -0.1}, "l1_lambda"),
        ({"gate_lr": 0.0}, "gate_lr"),
        ({"prune_threshold": 1.0}, "prune_threshold"),
        ({"reallocate_every": 1.5}, "reallocate_every"),
        ({"reallocate_every": 0}, "reallocate_every"),
        ({"budget_ranks": 10, "budget_unit": "params"}, "budget_ranks"),
        ({"r_min": 3, "r_max": 2}, "r_max"),
    ],
)
def test_bad_config_fails_at_construction(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("l1ra", **options)


def test_schedule_longer_than_training_fails_in_prepare() -> None:
    with pytest.raises(ValueError, match="longer than training"):
        _prepare("llama", steps=10, reallocate_every=10)
    with pytest.raises(ValueError, match="total_steps"):
        build, kwargs = ARCHS["llama"]
        L1raMethod().prepare(build(0), LoraConfig(r=4, **kwargs), total_steps=None)


@pytest.mark.parametrize("budget", [{"budget_ranks": 10_000}, {"budget_ranks": 3}])
def test_infeasible_budget_fails_in_prepare(budget: dict) -> None:
    with pytest.raises(ValueError, match="infeasible"):
        _prepare("llama", steps=10, reallocate_every=2, **budget)


# ---- the reallocation rule, property-tested ---------------------------------------------------------------

_gate_values = st.lists(st.sampled_from([0.0, 0.001, 0.3, 0.9, 1.0]), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    gates=st.lists(_gate_values, min_size=1, max_size=6),
    unit=st.sampled_from(["ranks", "params"]),
    costs=st.lists(st.integers(8, 40), min_size=6, max_size=6),
    r_min=st.integers(1, 2),
)
def test_plan_reallocation_holds_budget(
    gates: list[list[float]], unit: str, costs: list[int], r_min: int
) -> None:
    names = [f"layers.{i}.proj" for i in range(len(gates))]
    g = dict(zip(names, gates, strict=False))
    ranks = {n: len(v) for n, v in g.items()}
    cost = {n: (1 if unit == "ranks" else c) for n, c in zip(names, costs, strict=False)}
    budget = RankBudget(unit, sum(ranks[n] * cost[n] for n in names), cost)  # type: ignore[arg-type]
    r_max = dict.fromkeys(names, 10)
    plan = plan_reallocation(g, budget, threshold=0.01, r_min=r_min, r_max=r_max)
    assert budget.holds(plan.ranks)
    for n in names:
        survivors = [k for k, v in enumerate(g[n]) if v >= 0.01]
        assert len(plan.keep[n]) >= min(r_min, ranks[n])
        assert set(survivors) <= set(plan.keep[n]) or len(survivors) < r_min
        assert len(plan.keep[n]) <= plan.ranks[n] <= r_max[n]
        assert plan.keep[n] == sorted(plan.keep[n])
    if not any(plan.pruned.values()):
        assert plan.ranks == ranks


def test_plan_reallocation_gives_freed_ranks_to_saturated_modules() -> None:
    gates = {"a": [1.0, 0.0, 0.0, 1.0], "b": [1.0, 1.0, 1.0, 1.0], "c": [0.5, 0.5, 0.5, 0.5]}
    plan = plan_reallocation(
        gates,
        RankBudget("ranks", 12, dict.fromkeys(gates, 1)),
        threshold=0.01,
        r_min=1,
        r_max=dict.fromkeys(gates, 8),
    )
    assert plan.ranks == {"a": 2, "b": 6, "c": 4}
    assert plan.keep["a"] == [0, 3] and plan.added["b"] == 2


# ---- on tiny models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "unit"), [("llama", "ranks"), ("gpt2", "params"), ("bert", "params")])
def test_budget_invariant_after_every_reallocation(arch: str, unit: str) -> None:
    steps = 12
    method, model = _prepare(
        arch, steps, l1_lambda=0.5, gate_lr=0.2, reallocate_every=3, budget_unit=unit, prune_threshold=0.3
    )
    _randomise_b(model)  # B = 0 gives every gate the same gradient (the penalty's); break the symmetry
    budget = method.budget
    assert budget is not None and budget.holds(current_ranks(model))
    uniform_params = 4 * sum(i + o for i, o in module_shapes(lora_modules(model)).values())
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    changes = 0
    for step, batch in enumerate(batches(arch, steps)):
        new_map = method_step(method, model, opt, step, batch)
        if new_map is not None:
            changes += 1
            assert budget.holds(new_map) and dict(new_map) == current_ranks(model)
            params = new_map.parameter_count(module_shapes(lora_modules(model)))
            assert params <= uniform_params if unit == "params" else new_map.total_rank == budget.total
            assert stale_optimizer_params(opt, [p for g in opt.param_groups for p in g["params"]]) == []
            live = {id(p) for p in model.parameters()} | {id(p) for p in method.gates.values()}
            assert all(id(p) in live for g in opt.param_groups for p in g["params"])
    assert changes > 0, "the test should exercise reallocations"
    assert len([e for e in method.history.events if e.reason == "l1ra"]) > 0


def test_dropping_zero_gate_columns_does_not_change_outputs() -> None:
    method, model = _prepare("llama", steps=20, reallocate_every=5)
    _randomise_b(model)
    with torch.no_grad():
        for i, g in enumerate(method.gates.values()):
            g[i % 4] = 0.0  # one pruned column per module
            g[(i + 1) % 4] = 0.7
    batch = batches("llama", 1)[0]
    before = eval_logits(model, batch)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-3))
    new_map = method.reallocate(model, step=4, optimizer=opt)
    assert new_map is not None
    torch.testing.assert_close(eval_logits(model, batch), before, atol=1e-6, rtol=0)


def test_gate_folding_reproduces_gated_logits() -> None:
    method, model = _prepare("gpt2", steps=20, reallocate_every=5)
    _randomise_b(model, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in method.gates.values():
            gate.copy_(torch.rand(gate.shape, generator=g))
    batch = batches("gpt2", 1)[0]
    gated = eval_logits(model, batch)
    plain, rank_map = method.finalize(model)
    assert not any(m.lora_B["default"]._forward_pre_hooks for m in lora_modules(plain).values())
    torch.testing.assert_close(eval_logits(plain, batch), gated, atol=1e-5, rtol=0)
    assert rank_map.metadata["method"] == "l1ra"


def test_reallocation_carries_optimizer_state_for_survivors() -> None:
    method, model = _prepare("llama", steps=20, reallocate_every=5)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    batch = batches("llama", 1)[0]
    for step in range(2):
        method_step(method, model, opt, step, batch)
    name = next(iter(lora_modules(model)))
    module = lora_modules(model)[name]
    old_b = module.lora_B["default"].weight
    old_avg = opt.state[old_b]["exp_avg"].clone()
    with torch.no_grad():
        method.gates[name.replace(".", ":")][0] = 0.0
    method.reallocate(model, step=4, optimizer=opt)
    new_b = lora_modules(model)[name].lora_B["default"].weight
    assert new_b is not old_b and old_b not in opt.state
    torch.testing.assert_close(opt.state[new_b]["exp_avg"][:, :3], old_avg[:, 1:])
    assert opt.state[new_b]["exp_avg"].shape == new_b.shape


def test_resume_matches_uninterrupted_run(tmp_path) -> None:
    steps, kill_at = 12, 7
    data = batches("llama", steps)
    options = {"l1_lambda": 0.5, "gate_lr": 0.2, "reallocate_every": 3, "prune_threshold": 0.3}

    method, model = _prepare("llama", steps, **options)
    _randomise_b(model)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    for step in range(steps):
        method_step(method, model, opt, step, data[step])
    expected_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    expected_ranks = current_ranks(model)

    method, model = _prepare("llama", steps, **options)
    _randomise_b(model)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    for step in range(kill_at):
        method_step(method, model, opt, step, data[step])
    assert current_ranks(model) != {n: 4 for n in expected_ranks}, "kill after a reallocation"
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(
        {
            "adapter": get_peft_model_state_dict(model),
            "optimizer": opt.state_dict(),
            "method": method.state_dict(),
        },
        checkpoint,
    )
    del method, model, opt

    saved = torch.load(checkpoint, weights_only=False)
    method, model = _prepare("llama", steps, seed=0, **options)  # as for a new run, then restore
    method.load_state_dict(copy.deepcopy(saved["method"]))
    set_peft_model_state_dict(model, saved["adapter"])
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    opt.load_state_dict(saved["optimizer"])
    for step in range(kill_at, steps):
        method_step(method, model, opt, step, data[step])

    assert current_ranks(model) == expected_ranks
    resumed_state = get_peft_model_state_dict(model)
    assert resumed_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        torch.testing.assert_close(resumed_state[key], value, atol=1e-6, rtol=0)


# ---- the FIM start (issue 13's variant: FIM-LoRA's map as L1RA's starting point) -------------------------


@pytest.mark.parametrize(("arch", "unit"), [("llama", "params"), ("gpt2", "ranks")])
def test_fim_start_begins_at_fims_map_within_the_budget(arch: str, unit: str) -> None:
    from fimlora import FimConfig
    from fimlora.initialize import plan_rank_map

    build, kwargs = ARCHS[arch]
    data = batches(arch, 4)
    method = L1raMethod(L1raOptions(start="fim", start_calibration_batches=4, budget_unit=unit, r_max=12))
    model = method.prepare(
        build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), total_steps=10, calibration_batches=iter(data)
    )
    ranks = current_ranks(model)
    assert method.budget is not None and method.budget.holds(ranks)
    assert len(set(ranks.values())) > 1 and min(ranks.values()) >= 2  # not uniform; FIM's floor r/2
    # the same map FIM-LoRA plans from the same batches, budget and bounds
    from peft import get_peft_model

    from fimlora.calibration import estimate_module_scores

    ref = get_peft_model(build(0), LoraConfig(r=4, lora_alpha=8, **kwargs))
    stats = estimate_module_scores(ref, data, FimConfig(calibration_batches=4, show_progress=False))
    shapes = module_shapes(lora_modules(ref))
    planned = plan_rank_map(
        stats.scores(),
        shapes,
        FimConfig(budget_unit=unit, r_min=2, r_max=12, normalize="none", show_progress=False),
        r=4,
    )
    assert ranks == dict(planned)
    assert all(float(g.detach().min()) == 1.0 for g in method.gates.values())  # gates start open
    with pytest.raises(ValueError, match="calibration batches"):
        L1raMethod(L1raOptions(start="fim")).prepare(build(0), LoraConfig(r=4, **kwargs), total_steps=10)
    with pytest.raises(ValueError, match="start"):
        L1raOptions(start="eva")
