"""Bad input gets an error that names the problem and the fix, and leaves the model exactly as it was."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.tiny_models import batches, peft_model, tiny_llama
from peft import IA3Config, get_peft_model

from fimlora import (
    CalibrationError,
    FimConfig,
    estimate_module_scores,
    fim_calibration,
    initialize_lora_fim_ranks,
)
from fimlora.peft_glue import lora_modules


def _cfg(**kw):
    return FimConfig(show_progress=False, **kw)


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "config": copy.deepcopy(model.peft_config["default"].to_dict()),
    }


def _assert_unchanged(model: torch.nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    assert now["tensors"].keys() == snap["tensors"].keys()
    for k, v in snap["tensors"].items():
        assert torch.equal(now["tensors"][k], v), k
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["training"] == snap["training"]
    assert now["config"] == snap["config"]
    for n, g in snap["grads"].items():
        if g is None:
            assert now["grads"][n] is None, n
        else:
            assert torch.equal(now["grads"][n], g), n


@pytest.fixture
def model() -> torch.nn.Module:
    m = peft_model("llama", r=4)
    m.train()
    # A pre-existing gradient that calibration must not disturb.
    first = next(p for p in m.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 0.5)
    return m


def test_not_a_peft_model() -> None:
    with pytest.raises(TypeError, match="get_peft_model"):
        initialize_lora_fim_ranks(tiny_llama(), batches("llama"), _cfg())


def test_peft_model_without_lora() -> None:
    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"]))
    with pytest.raises(ValueError, match="LoRA adapters"):
        initialize_lora_fim_ranks(ia3, batches("llama"), _cfg())


def test_unknown_adapter(model) -> None:
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"unknown adapter name 'other'.*\['default'\]"):
        initialize_lora_fim_ranks(model, batches("llama"), _cfg(), adapter_name="other")
    _assert_unchanged(model, snap)


def test_empty_dataloader(model) -> None:
    snap = _snapshot(model)
    with pytest.raises(CalibrationError, match="no batches"):
        initialize_lora_fim_ranks(model, [], _cfg())
    _assert_unchanged(model, snap)


def test_fewer_batches_warns_and_uses_them(model) -> None:
    with pytest.warns(UserWarning, match="only 3 of the 8"):
        stats = estimate_module_scores(model, batches("llama", 3), _cfg())
    assert stats.num_batches == 3


def test_batch_without_loss(model) -> None:
    snap = _snapshot(model)
    data = [{k: v for k, v in b.items() if k != "labels"} for b in batches("llama", 2)]
    with pytest.raises(CalibrationError, match=r"batch 0 produced no loss.*labels.*loss_fn"):
        initialize_lora_fim_ranks(model, data, _cfg())
    _assert_unchanged(model, snap)


def test_non_dict_batch_needs_loss_fn(model) -> None:
    with pytest.raises(CalibrationError, match="loss_fn"):
        estimate_module_scores(model, [torch.zeros(2, 3)], _cfg())


def _poisoned_at_2() -> tuple[list, object]:
    """Four batches and a loss whose gradient is NaN (the loss finite) on batch 2 only."""
    data = batches("llama", 4)
    poisoned = data[2]["input_ids"][0, 0].item()
    assert all(b["input_ids"][0, 0] != poisoned for b in data[:2])

    def loss_fn(m, batch):
        out = m(**batch)
        if batch["input_ids"][0, 0] == poisoned:
            # sqrt(|0 * x|) is 0 forward but its gradient is 0 * inf = NaN: finite loss, NaN gradient.
            return out.loss + (out.logits.sum() * 0).abs().sqrt()
        return out.loss

    return data, loss_fn


def test_nan_gradient_names_the_batch(model) -> None:
    snap = _snapshot(model)
    data, loss_fn = _poisoned_at_2()
    with pytest.raises(CalibrationError, match="batch 2"):
        initialize_lora_fim_ranks(model, data, _cfg(), loss_fn=loss_fn)
    _assert_unchanged(model, snap)


def test_nan_gradient_names_the_batch_in_a_users_loop(model) -> None:
    # fim_calibration reads gradients through hooks, estimate_module_scores after each backward: both name it.
    snap = _snapshot(model)
    data, loss_fn = _poisoned_at_2()
    with pytest.raises(CalibrationError, match="batch 2"), fim_calibration(model, _cfg()):
        for batch in data:
            loss_fn(model, batch).backward()
    _assert_unchanged(model, snap)


def test_data_parallel_wrapper(model) -> None:
    # estimate_module_scores runs the model inside the wrapper; a user's loop and resizing must be given
    # `model.module` (a wrapper's backward would average gradients; DDP must be rebuilt after resizing).
    data = batches("llama", 2)
    wrapped = torch.nn.DataParallel(model)
    stats = estimate_module_scores(wrapped, data, _cfg(calibration_batches=2))
    assert (
        stats.to_dict()["modules"]
        == estimate_module_scores(model, data, _cfg(calibration_batches=2)).to_dict()["modules"]
    )
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"data-parallel wrapper.*fim_calibration\(model\.module\)"):
        fim_calibration(wrapped, _cfg())
    with pytest.raises(TypeError, match=r"initialize_lora_fim_ranks.*`model\.module` before wrapping"):
        initialize_lora_fim_ranks(wrapped, scores=stats)
    _assert_unchanged(model, snap)


def test_fsdp1_wrapper_is_refused_with_what_to_do(model) -> None:
    # FSDP2 (fully_shard) is calibrated (tests/integration/test_fsdp2.py); FSDP1's wrapper, with its flattened
    # parameters and renamed modules, is not. A class of that name, without a process group, gets the error.
    fsdp1 = type("FullyShardedDataParallel", (torch.nn.Module,), {})()
    fsdp1.module = model
    with pytest.raises(TypeError, match=r"FSDP1.*fully_shard.*fsdp_version: 2"):
        estimate_module_scores(fsdp1, batches("llama", 1), _cfg())
    engine = type("DeepSpeedEngine", (torch.nn.Module,), {})()
    engine.module = model
    with pytest.raises(TypeError, match=r"engine\.module"):
        estimate_module_scores(engine, batches("llama", 1), _cfg())


def test_non_finite_loss(model) -> None:
    with pytest.raises(CalibrationError, match="non-finite loss"):
        estimate_module_scores(
            model, batches("llama", 2), _cfg(), loss_fn=lambda m, b: m(**b).loss * float("inf")
        )


def test_budget_outside_feasible_range(model) -> None:
    n = len(lora_modules(model))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"feasible range is \[{2 * n}, {8 * n}\]"):
        initialize_lora_fim_ranks(model, batches("llama"), _cfg(budget_ranks=9 * n, r_min=2, r_max=8))
    _assert_unchanged(model, snap)


def test_rank_above_full_rank(model) -> None:
    snap = _snapshot(model)
    # k_proj maps 32 -> 16 (2 kv heads of 8), so no module can take a rank above 16.
    with pytest.raises(ValueError, match=r"r_max=20 is above the full rank.*set r_max <= 16"):
        initialize_lora_fim_ranks(model, batches("llama"), _cfg(r_max=20))
    _assert_unchanged(model, snap)


def test_all_zero_scores_give_uniform_with_warning(model) -> None:
    names = list(lora_modules(model))
    with pytest.warns(UserWarning, match="all module scores are zero"):
        rank_map = initialize_lora_fim_ranks(model, fim_config=_cfg(), scores=dict.fromkeys(names, 0.0))
    assert set(rank_map.values()) == {4}


def test_scores_from_another_model(model) -> None:
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="same model"):
        initialize_lora_fim_ranks(model, fim_config=_cfg(), scores={"not.a.module": 1.0})
    _assert_unchanged(model, snap)


def test_calibration_restores_state_on_success(model) -> None:
    snap = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate_module_scores(model, batches("llama"), _cfg())
    _assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"score": "sensitivity"}, "score"),
        ({"aggregation": "max"}, "aggregation"),
        ({"budget_ranks": 10, "budget_params": 10}, "budget_params"),
        ({"r_min": 5, "r_max": 2}, "r_min"),
    ],
)
def test_config_errors_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        FimConfig(**kwargs)


def test_failure_while_resizing_rolls_back_every_module(model, monkeypatch) -> None:
    from peft.tuners.lora import Linear

    snap = _snapshot(model)
    calls = {"n": 0}
    original = Linear.update_layer

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure in the middle of the rebuild")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "update_layer", flaky)
    stats = estimate_module_scores(model, batches("llama"), _cfg())
    with pytest.raises(RuntimeError, match="simulated failure"):
        initialize_lora_fim_ranks(model, fim_config=_cfg(r_min=1, r_max=12), scores=stats)
    assert calls["n"] == 5
    _assert_unchanged(model, snap)
    monkeypatch.undo()
    out = model(**batches("llama", 1)[0])  # the restored model still runs
    assert torch.isfinite(out.loss)
