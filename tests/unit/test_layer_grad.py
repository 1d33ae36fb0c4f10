"""The B gradient from each lora_B layer's input and output gradient (the path sharded models take).

On unsharded models it must give the batch estimator's statistics exactly (the same product, in the same
order, as autograd's weight gradient), in the library's loop and in a user's own, with shared-weight and
multi-forward backward passes and under gradient checkpointing. The path is forced by telling the session
the model is sharded; the two-process FSDP2 test (tests/integration/test_fsdp2.py) runs it on a really sharded model.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers.tiny_models import batches, peft_model

import fimlora.calibration.session as session
from fimlora import CalibrationError, FimConfig, ModuleStats, estimate_module_scores, fim_calibration
from fimlora.calibration import LayerGradientAccumulator, make_accumulator
from fimlora.calibration.layer_grad import layer_weight_grad
from fimlora.peft_glue import lora_factors, lora_modules


@pytest.fixture
def as_if_sharded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(session, "is_sharded", lambda model: True)
    yield


def _cfg(t: int = 5, **kw: object) -> FimConfig:
    return FimConfig(calibration_batches=t, show_progress=False, **kw)  # type: ignore[arg-type]


def _stats_by_both_paths(monkeypatch: pytest.MonkeyPatch, run: object) -> tuple[ModuleStats, ModuleStats]:
    reference = run()  # type: ignore[operator]
    monkeypatch.setattr(session, "is_sharded", lambda model: True)
    layer = run()  # type: ignore[operator]
    monkeypatch.undo()
    return reference, layer


@pytest.mark.parametrize("arch", ["llama-all-linear", "gpt2", "bert"])
def test_equals_the_grad_path_exactly(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, layer = _stats_by_both_paths(
        monkeypatch,
        lambda: estimate_module_scores(peft_model(arch), batches(arch, 5), _cfg(score="variance")),
    )
    assert layer.metadata["gradients"] == "layer" and layer.num_batches == ref.num_batches == 5
    assert layer.to_dict()["modules"] == ref.to_dict()["modules"]
    assert all(m.variance_sum > 0 for m in ref.modules.values())


def _own_loop(
    arch: str, forwards_per_backward: int, checkpointing: dict[str, bool] | None = None
) -> ModuleStats:
    model = peft_model(arch)
    if checkpointing is not None:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.base_model.model.enable_input_require_grads()
    data = batches(arch, 6)
    with fim_calibration(model, _cfg()) as cal:
        for i in range(0, len(data), forwards_per_backward):
            sum(model(**b).loss for b in data[i : i + forwards_per_backward]).backward()
    return cal.scores


@pytest.mark.parametrize("forwards", [1, 2])
def test_own_loop_counts_each_backward_once(forwards: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, layer = _stats_by_both_paths(monkeypatch, lambda: _own_loop("llama-all-linear", forwards))
    assert ref.num_batches == layer.num_batches == 6 // forwards
    for n, m in ref.modules.items():
        assert layer.modules[n].fisher_sum == pytest.approx(m.fisher_sum, rel=1e-6)
        assert layer.modules[n].variance_sum == pytest.approx(m.variance_sum, rel=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_each_call_once(reentrant: bool, as_if_sharded: None) -> None:
    plain = _own_loop("llama-all-linear", 1)
    checkpointed = _own_loop("llama-all-linear", 1, {"use_reentrant": reentrant})
    assert checkpointed.num_batches == plain.num_batches == 6
    for n, m in plain.modules.items():
        assert checkpointed.modules[n].fisher_sum == pytest.approx(m.fisher_sum, rel=1e-5)


def test_weight_grad_matches_autograd_and_upcasts_low_precision() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    layer = torch.nn.Linear(4, 6, bias=False).double()
    out = layer(h)
    d = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(d)
    assert torch.allclose(layer_weight_grad(h.detach(), d), layer.weight.grad, rtol=1e-12, atol=0)
    low = layer_weight_grad(h.detach().bfloat16(), d.bfloat16())
    assert low.dtype == torch.float32
    exact = layer_weight_grad(h.detach().bfloat16().double(), d.bfloat16().double())
    assert torch.allclose(low.double(), exact, rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_names_the_batch(as_if_sharded: None) -> None:
    model = peft_model("llama-all-linear")
    data = batches("llama-all-linear", 3)
    with pytest.raises(CalibrationError, match="calibration batch 1"):
        with fim_calibration(model, _cfg()):
            for i, b in enumerate(data):
                loss = model(**b).loss
                (loss * float("nan") if i == 1 else loss).backward()


def test_per_example_estimator_is_refused_on_sharded_models() -> None:
    model = peft_model("llama-all-linear")
    b_layers = {n: lora_factors(m)[1] for n, m in lora_modules(model).items()}
    assert isinstance(make_accumulator("batch", model, b_layers, sharded=True), LayerGradientAccumulator)
    with pytest.raises(ValueError, match="estimator='batch'"):
        make_accumulator("per_example", model, b_layers, sharded=True)


def test_model_state_is_restored(as_if_sharded: None) -> None:
    model = peft_model("llama-all-linear")
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate_module_scores(model, batches("llama-all-linear", 2), _cfg(2))
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # every hook removed
