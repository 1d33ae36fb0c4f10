"""AdaLoRA and EVA through the method protocol: schedule checks, every-step allocation, exact conversion."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import ARCHS, batches
from peft import LoraConfig

from fimlora.errors import CalibrationError
from fimlora.methods import get_method
from fimlora.methods.adalora import AdaLoraMethod
from fimlora.peft_glue import lora_modules


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train_adalora(
    arch: str, steps: int = 10, set_to_none: bool = True
) -> tuple[AdaLoraMethod, torch.nn.Module]:
    build, kwargs = ARCHS[arch]
    method = AdaLoraMethod(tinit=2, tfinal=3)
    model = method.prepare(build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), total_steps=steps)
    opt = torch.optim.AdamW(method.param_groups(model, lr=2e-2))
    for step, batch in enumerate(batches(arch, steps)):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)  # the protocol's order: zero_grad, then on_step_end
        method.on_step_end(model, step, opt)
    return method, model


def test_adalora_without_total_steps_fails_before_wrapping() -> None:
    build, kwargs = ARCHS["llama"]
    base = build(0)
    with pytest.raises(ValueError, match="total number of training steps"):
        get_method("adalora").prepare(base, LoraConfig(r=4, **kwargs), total_steps=None)
    assert not hasattr(base, "peft_config")
    with pytest.raises(ValueError, match="no pruning phase"):
        get_method("adalora", tinit=5, tfinal=5).prepare(base, LoraConfig(r=4, **kwargs), total_steps=10)
    with pytest.raises(ValueError, match="tinit"):
        get_method("adalora", tinit=1.5)


def test_adalora_allocates_every_step_in_the_protocol_order() -> None:
    method, _ = _train_adalora("llama")
    changes = [e for e in method.history.events if e.reason == "adalora"]
    assert changes, "update_and_allocate must prune triplets during the budgeting phase"
    assert sum(method._ranks.values()) == 4 * len(method._ranks)  # target_r = r: uniform LoRA's rank sum


def test_adalora_refuses_gradients_zeroed_in_place() -> None:
    with pytest.raises(RuntimeError, match="zeroed them in place"):
        _train_adalora("gpt2", set_to_none=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_adalora_converts_to_plain_lora_with_same_logits(arch: str) -> None:
    method, model = _train_adalora(arch)
    batch = batches(arch, 1, seed=7)[0]
    expected = _logits(model, batch)
    plain, rank_map = method.finalize(model)
    assert type(plain.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(_logits(plain, batch), expected, atol=1e-5, rtol=0)
    meta = rank_map.metadata
    assert meta["total_rank"] == meta["uniform_rank"]  # rank budget matched exactly
    assert rank_map.total_rank == meta["total_rank"]
    assert set(meta["zero_rank_modules"]).isdisjoint(lora_modules(plain))


def test_eva_matches_the_rank_budget_and_is_plain_lora() -> None:
    build, kwargs = ARCHS["llama"]
    torch.manual_seed(0)
    method = get_method("eva", rho=2.0)
    model = method.prepare(
        build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), calibration_batches=batches("llama", 8)
    )
    plain, rank_map = method.finalize(model)
    assert rank_map.total_rank == 4 * len(rank_map)
    assert rank_map.metadata["total_params"] > 0 and "params_vs_uniform" in rank_map.metadata
    assert plain.peft_config["default"].rank_pattern  # EVA wrote per-module ranks


def test_eva_errors_are_clear() -> None:
    build, kwargs = ARCHS["bert"]
    with pytest.raises(ValueError, match="calibration batches"):
        get_method("eva").prepare(build(0), LoraConfig(r=4, **kwargs))
    with pytest.raises(ValueError, match="dict batches"):
        get_method("eva").prepare(
            build(0), LoraConfig(r=4, **kwargs), calibration_batches=[torch.zeros(2, 3)]
        )
    # BERT's pooler sees one row per sequence: fewer rows than components, EVA can never converge.
    # A CalibrationError: the CLI reports it in one line with exit status 2, not a traceback.
    with pytest.raises(CalibrationError, match="did not converge"):
        get_method("eva", max_passes=2).prepare(
            build(0), LoraConfig(r=4, **kwargs), calibration_batches=batches("bert", 4)
        )
    with pytest.raises(ValueError, match="rho"):
        get_method("eva", rho=0.5)
