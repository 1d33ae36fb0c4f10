"""LR-LoRA: the soft mask, gradient to the cutoffs, exact budget at truncation, exact folding, resume."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers.tiny_models import ARCHS, batches, eval_logits, method_step
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from fimlora.methods import get_method
from fimlora.methods.lrlora import LrLoraMethod, LrLoraOptions, soft_rank_mask
from fimlora.methods.optim_state import stale_optimizer_params
from fimlora.peft_glue import current_ranks, lora_modules


def _prepare(arch: str, steps: int, **options: Any) -> tuple[LrLoraMethod, torch.nn.Module]:
    build, kwargs = ARCHS[arch]
    method = LrLoraMethod(LrLoraOptions(**options))
    return method, method.prepare(build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), total_steps=steps)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"temperature_start": 0.1, "temperature_end": 1.0}, "temperature_end"),
        ({"truncate_at": 1.5}, "truncate_at"),
        ({"cutoff_lr": -1.0}, "cutoff_lr"),
        ({"budget_params": 10}, "budget_params"),
    ],
)
def test_bad_config(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("lrlora", **options)


def test_prepare_needs_total_steps_and_a_feasible_budget() -> None:
    build, kwargs = ARCHS["gpt2"]
    with pytest.raises(ValueError, match="total_steps"):
        LrLoraMethod().prepare(build(0), LoraConfig(r=4, **kwargs))
    with pytest.raises(ValueError, match="infeasible"):
        _prepare("gpt2", 10, budget_ranks=1000)


def test_soft_rank_mask() -> None:
    tau = torch.tensor(3.0)
    soft = soft_rank_mask(tau, 6, 1.0)
    assert torch.all(soft[:-1] > soft[1:])  # decreasing in k: the first columns are kept first
    assert float(soft.sum()) == pytest.approx(3.0, abs=1e-5)  # symmetric tails: soft rank = tau
    hard = soft_rank_mask(tau, 6, 1e-3)
    assert hard.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_cutoffs_get_gradient_once_b_has_learnt() -> None:
    method, model = _prepare("llama", 10)
    batch = batches("llama", 1)[0]
    model(**batch).loss.backward()
    assert all(t.grad is None or float(t.grad) == 0.0 for t in method.cutoffs.values())  # B = 0 at init
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    opt.step()
    opt.zero_grad()
    model(**batch).loss.backward()
    assert any(t.grad is not None and float(t.grad) != 0.0 for t in method.cutoffs.values())


@pytest.mark.parametrize(("arch", "unit"), [("llama", "ranks"), ("gpt2", "params")])
def test_truncation_holds_the_budget_and_leaves_plain_lora(arch: str, unit: str) -> None:
    steps = 10
    method, model = _prepare(arch, steps, cutoff_lr=0.3, budget_unit=unit, truncate_at=0.8)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    truncated = None
    for step, batch in enumerate(batches(arch, steps)):
        result = method_step(method, model, opt, step, batch)
        if method.truncated is not None and truncated is None:
            truncated = step
            assert result is not None and method.budget is not None and method.budget.holds(result)
            assert stale_optimizer_params(opt, [p for g in opt.param_groups for p in g["params"]]) == []
    assert truncated == 7
    plain, rank_map = method.finalize(model)
    assert method.budget is not None and method.budget.holds(rank_map)
    assert not any(m.lora_B["default"]._forward_pre_hooks for m in lora_modules(plain).values())
    assert any(e.reason == "lrlora-truncate" for e in method.history.events)


def test_truncation_with_a_hard_mask_keeps_the_logits() -> None:
    method, model = _prepare("llama", 10, truncate_at=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g))
        for i, tau in enumerate(method.cutoffs.values()):
            tau.fill_(3.0 if i % 2 else 5.0)  # integers that sum to the budget (r = 4 on average)
    method.temperature = 1e-3  # a hard step: columns beyond tau are exactly off
    batch = batches("llama", 1)[0]
    expected = eval_logits(model, batch)
    plain, rank_map = method.finalize(model)
    assert sorted(set(rank_map.values())) == [3, 5]
    torch.testing.assert_close(eval_logits(plain, batch), expected, atol=1e-5, rtol=0)


def test_resume_after_truncation_matches_uninterrupted_run(tmp_path) -> None:
    steps, kill_at = 10, 8
    data = batches("llama", steps)
    options = {"cutoff_lr": 0.3, "truncate_at": 0.7}

    method, model = _prepare("llama", steps, **options)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    for step in range(steps):
        method_step(method, model, opt, step, data[step])
    expected = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    expected_ranks = current_ranks(model)

    method, model = _prepare("llama", steps, **options)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    for step in range(kill_at):
        method_step(method, model, opt, step, data[step])
    assert method.truncated is not None
    torch.save(
        {
            "adapter": get_peft_model_state_dict(model),
            "optimizer": opt.state_dict(),
            "method": method.state_dict(),
        },
        tmp_path / "ckpt.pt",
    )
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    method, model = _prepare("llama", steps, **options)
    method.load_state_dict(copy.deepcopy(saved["method"]))
    set_peft_model_state_dict(model, saved["adapter"])
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
    opt.load_state_dict(saved["optimizer"])
    for step in range(kill_at, steps):
        method_step(method, model, opt, step, data[step])

    assert current_ranks(model) == expected_ranks
    got = get_peft_model_state_dict(model)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)
