"""Calibration where users train: gradient checkpointing, bf16 autocast, bf16 weights, 4-bit bases.

Each mode must give finite statistics close to plain fp32 calibration, leave the model exactly as it
found it (train/eval modes, ``requires_grad`` flags, pre-existing ``.grad`` tensors, no hooks left behind),
whether calibration returns or raises. CUDA variants run when a GPU is present and skip otherwise; the
bitsandbytes 4-bit test also needs ``bitsandbytes``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers.tiny_models import VOCAB, tiny_llama
from peft import LoraConfig, get_peft_model

from fimlora import FimConfig, ModuleStats, estimate_module_scores, fim_calibration

T = 4
HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]


def _peft(base: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    # Seeded separately so LoRA-A is identical whatever happened to the base model before.
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _batches(n: int = T) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _cfg(**kw: Any) -> FimConfig:
    return FimConfig(calibration_batches=T, show_progress=False, **kw)


def _assert_close(got: ModuleStats, ref: ModuleStats, rtol: float) -> None:
    assert got.num_batches == ref.num_batches
    assert list(got.modules) == list(ref.modules)
    for name, g in got.modules.items():
        r = ref.modules[name]
        for field in ("fisher_sum", "variance_sum"):
            a, b = getattr(g, field), getattr(r, field)
            assert torch.isfinite(torch.tensor(a)), (name, field, a)
            assert abs(a - b) <= rtol * abs(b), (name, field, a, b)


@pytest.fixture(scope="module")
def reference() -> ModuleStats:
    """fp32, no checkpointing, LoRA-A frozen (the defaults) on CPU."""
    return estimate_module_scores(_peft(tiny_llama()), _batches(), _cfg())


def _enable_checkpointing(model: torch.nn.Module, use_reentrant: bool) -> None:
    """What a user does: the HF call (named ``activation_checkpointing_enable`` from transformers 5.x).

    transformers registers ``enable_input_require_grads()`` itself for ``input_ids`` models, which the
    reentrant variant needs because the frozen embedding's output does not require grad.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_is_used_and_gives_the_same_statistics(
    reference: ModuleStats, use_reentrant: bool
) -> None:
    base = tiny_llama()
    _enable_checkpointing(base, use_reentrant)
    model = _peft(base)
    layers = base.model.layers
    calls = [0]
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def counting(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            calls[0] += 1
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    model.eval()  # as after from_pretrained: checkpointing must still run during calibration
    stats = estimate_module_scores(model, _batches(), _cfg())
    # Every layer checkpointed in every batch: otherwise calibration keeps all activations and its peak
    # memory exceeds that of the checkpointed training step it is supposed to stay under.
    assert calls[0] == len(layers) * T
    assert all(not m.training for m in model.modules())  # the caller's eval mode is back
    # Recomputation is bitwise deterministic on CPU; allow float noise anyway.
    _assert_close(stats, reference, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_is_finite_and_close_to_fp32(reference: ModuleStats, device: str) -> None:
    model = _peft(tiny_llama()).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        stats = estimate_module_scores(model, _batches(), _cfg())
    # bf16 keeps ~3 significant digits per matmul; measured on CPU: <= 0.6% off, 5% leaves room for GPU
    # kernels that round differently.
    _assert_close(stats, reference, rtol=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weights_are_finite_and_close_to_fp32(reference: ModuleStats, device: str) -> None:
    model = _peft(tiny_llama()).to(device=device, dtype=torch.bfloat16)
    stats = estimate_module_scores(model, _batches(), _cfg())
    # Weights rounded to bf16, gradients in bf16 (accumulated in fp32); measured on CPU: <= 0.4% off.
    _assert_close(stats, reference, rtol=0.05)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_freezing_lora_a_does_not_change_the_statistics(reference: ModuleStats) -> None:
    # dL/dB does not depend on whether dL/dA is also computed; freezing A only saves time and memory.
    unfrozen = estimate_module_scores(_peft(tiny_llama()), _batches(), _cfg(freeze_lora_A=False))
    _assert_close(unfrozen, reference, rtol=1e-6)


def test_context_manager_equals_estimate_module_scores(reference: ModuleStats) -> None:
    model = _peft(tiny_llama())
    with fim_calibration(model, _cfg()) as cal:
        for batch in _batches():
            model(**batch).loss.backward()
    assert cal.scores.num_batches == T
    _assert_close(cal.scores, reference, rtol=0.0)


# --- the model is left exactly as it was -------------------------------------------------------------


def _lora_params(model: torch.nn.Module, kind: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if f"lora_{kind}." in n)


def _prepared_model() -> torch.nn.Module:
    """A model in a deliberately mixed state a training loop could leave behind."""
    model = _peft(tiny_llama())
    model.train()
    model.base_model.model.model.layers[1].eval()  # one subtree in eval mode
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)  # a trainable base weight
    _, a0 = next(_lora_params(model, "A"))
    a0.requires_grad_(False)  # a frozen LoRA-A
    for _, p in list(_lora_params(model, "B"))[:3] + list(_lora_params(model, "A"))[:2]:
        p.grad = torch.full_like(p, 3.0)  # pre-existing gradients (e.g. mid gradient-accumulation)
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def _assert_restored(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, grad in before["grads"].items():
        assert after["grads"][name] is grad, name  # the same tensor object, not a copy or None
    for name, grad in after["grads"].items():
        if grad is not None:
            assert torch.equal(grad, torch.full_like(grad, 3.0)), name
    # No calibration hook left behind: a later backward accumulates into B's .grad as usual (a leftover
    # hook would consume the gradient and set .grad to None).
    for _, p in _lora_params(model, "B"):
        p.grad = None
    model(**_batches(1)[0]).loss.backward()
    assert all(p.grad is not None for _, p in _lora_params(model, "B"))


@pytest.mark.parametrize("freeze_lora_A", [True, False])
def test_state_is_restored_after_success(freeze_lora_A: bool) -> None:
    model = _prepared_model()
    before = _snapshot(model)
    estimate_module_scores(model, _batches(), _cfg(freeze_lora_A=freeze_lora_A))
    _assert_restored(model, before)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("freeze_lora_A", [True, False])
def test_state_is_restored_after_an_exception_mid_calibration(freeze_lora_A: bool) -> None:
    model = _prepared_model()
    before = _snapshot(model)

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_fn.calls += 1  # type: ignore[attr-defined]
        if loss_fn.calls == 3:  # type: ignore[attr-defined]
            raise _Boom("batch 2")
        return m(**batch).loss

    loss_fn.calls = 0  # type: ignore[attr-defined]
    with pytest.raises(_Boom):
        estimate_module_scores(model, _batches(), _cfg(freeze_lora_A=freeze_lora_A), loss_fn=loss_fn)
    assert loss_fn.calls == 3  # type: ignore[attr-defined]
    _assert_restored(model, before)


def test_state_is_restored_after_an_exception_in_the_context_manager() -> None:
    model = _prepared_model()
    before = _snapshot(model)
    with pytest.raises(_Boom), fim_calibration(model, _cfg()):
        for i, batch in enumerate(_batches()):
            if i == 2:
                raise _Boom("batch 2")
            model(**batch).loss.backward()
    _assert_restored(model, before)


# --- quantized base ----------------------------------------------------------------------------------


@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="needs a CUDA GPU and bitsandbytes")
def test_bitsandbytes_4bit_base(tmp_path: Any, reference: ModuleStats) -> None:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(
        tmp_path / "base",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        device_map={"": 0},
    )
    model = _peft(base)
    stats = estimate_module_scores(model, _batches(), _cfg())
    assert stats.num_batches == T
    assert list(stats.modules) == list(reference.modules)
    assert stats.shapes() == reference.shapes()
    for name, m in stats.modules.items():
        # NF4 rounds every base weight, so the numbers move; they must stay finite, positive and of the
        # same order as the full-precision reference.
        ref = reference.modules[name].fisher_sum
        assert 0 < m.fisher_sum < float("inf"), name
        assert 0.2 * ref < m.fisher_sum < 5 * ref, (name, m.fisher_sum, ref)

    # The quantized layers are rebuilt at the chosen ranks, and the 4-bit model still trains.
    from fimlora import initialize_lora_fim_ranks
    from fimlora.peft_glue import current_ranks

    packed = {n: p.data.clone() for n, p in base.named_parameters() if p.dtype == torch.uint8}
    rank_map = initialize_lora_fim_ranks(model, fim_config=_cfg(), scores=stats)
    assert current_ranks(model) == dict(rank_map.items())
    assert len(set(rank_map.values())) > 1  # not the uniform fallback
    assert all(torch.equal(p.data, packed[n]) for n, p in base.named_parameters() if n in packed)
    batch = {k: v.to("cuda") for k, v in _batches(1)[0].items()}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
