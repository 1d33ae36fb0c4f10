"""The per-example estimator: exact per-example squared gradient norms, checked against explicit gradients.

The math (``fimlora.calibration.per_example``) is compared with per-example gradients formed explicitly and with
``torch.func.vmap(grad(...))`` in fp64. The glue (``FimConfig(estimator="per_example")``) is compared, on
tiny BERT, GPT-2 and LLaMA, with each example's gradient computed by running that example alone (a batch
of one): that is what the estimator claims to compute from a single pass over the whole batch.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.tiny_models import VOCAB, batches, peft_model, tiny_llama
from peft import LoraConfig, get_peft_model

from fimlora import CalibrationError, FimConfig, ModuleStats, estimate_module_scores, fim_calibration
from fimlora.calibration import per_example_sq_norms
from fimlora.peft_glue import lora_modules

# --- the math ------------------------------------------------------------------------------------------


def _explicit_sq_norms(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||sum_t D[n,t]^T H[n,t]||^2 with the per-example gradients formed."""
    n = h.shape[0]
    g = torch.einsum("nto,ntr->nor", d.reshape(n, -1, d.shape[-1]), h.reshape(n, -1, h.shape[-1]))
    return g.square().sum((1, 2))


SHAPES = {
    "2d": ((5, 3), (5, 7)),
    "3d": ((5, 6, 3), (5, 6, 7)),
    "3d-long": ((4, 20, 3), (4, 20, 5)),  # T (r + out) > r out: "auto" takes the direct path
    "4d": ((3, 2, 4, 3), (3, 2, 4, 7)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", ["auto", "gram", "direct"])
@pytest.mark.parametrize("max_chunk_elements", [1, 1 << 24])  # 1: one example per chunk
def test_math_matches_explicit_per_example_gradients(
    shape: str, method: Any, max_chunk_elements: int
) -> None:
    g = torch.Generator().manual_seed(0)
    hs, ds = SHAPES[shape]
    h = torch.randn(hs, generator=g, dtype=torch.float64)
    d = torch.randn(ds, generator=g, dtype=torch.float64)
    got = per_example_sq_norms(h, d, method=method, max_chunk_elements=max_chunk_elements)
    assert got.shape == (hs[0],) and got.dtype == torch.float64
    torch.testing.assert_close(got, _explicit_sq_norms(h, d), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("t", [None, 6])
def test_math_matches_torch_func_per_example_gradients(t: int | None) -> None:
    """A nonlinear per-example loss: D from autograd of the summed loss, G_n from vmap(grad)."""
    g = torch.Generator().manual_seed(1)
    n, r, out = 4, 3, 5
    h = torch.randn((n, r) if t is None else (n, t, r), generator=g, dtype=torch.float64)
    weight = torch.randn(out, r, generator=g, dtype=torch.float64)

    def loss_one(w: torch.Tensor, h_n: torch.Tensor) -> torch.Tensor:
        return torch.sin(h_n @ w.T).square().sum()

    per_example = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0))(weight, h)
    y = (h @ weight.T).requires_grad_(True)
    (d,) = torch.autograd.grad(torch.sin(y).square().sum(), y)
    torch.testing.assert_close(
        per_example_sq_norms(h, d), per_example.square().sum((1, 2)), rtol=1e-12, atol=0.0
    )


def test_math_upcasts_half_precision_inputs() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 8, 4, generator=g, dtype=torch.float64)
    d = torch.randn(3, 8, 16, generator=g, dtype=torch.float64) * 1e3  # squares beyond fp16's range
    got = per_example_sq_norms(h.half(), d.half())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    ref = _explicit_sq_norms(h.half().double(), d.half().double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0.0)


def test_math_zero_gradient_positions_need_no_mask() -> None:
    """Padding: positions whose output gradient is zero drop out whatever their input holds."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    d = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    d[0, 4:] = 0.0  # example 0 has 4 real positions, example 1 has 6
    h[0, 4:] = 1e3  # whatever sits at padded positions
    got = per_example_sq_norms(h, d)
    torch.testing.assert_close(got[0], _explicit_sq_norms(h[:1, :4], d[:1, :4])[0], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(got[1], _explicit_sq_norms(h[1:], d[1:])[0], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    ("hs", "ds", "match"),
    [((4,), (4,), "shape"), ((4, 3), (5, 7), "agree"), ((4, 6, 3), (4, 5, 7), "agree")],
)
def test_math_rejects_mismatched_shapes(hs: tuple[int, ...], ds: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        per_example_sq_norms(torch.zeros(hs), torch.zeros(ds))


def test_math_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="method"):
        per_example_sq_norms(torch.zeros(2, 3), torch.zeros(2, 4), method="ghost")  # type: ignore[arg-type]


# --- the estimator on tiny models ----------------------------------------------------------------------


def _cfg(t: int, **kw: Any) -> FimConfig:
    return FimConfig(calibration_batches=t, show_progress=False, estimator="per_example", **kw)


def _alone_reference(
    model: torch.nn.Module,
    examples: list[dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, tuple[float, float]]:
    """Module -> (E_n ||g_n||^2, E_n ||g_n||^2 - ||E_n g_n||^2), each example run alone (batch of one)."""
    mods = lora_modules(model)
    params = {n: m.lora_B["default"].weight for n, m in mods.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sq = dict.fromkeys(params, 0.0)
    total: dict[str, torch.Tensor] = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for example in examples:
        loss = loss_fn(model, example) if loss_fn else model(**example).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, grad in zip(params, grads, strict=True):
            sq[n] += float(grad.double().square().sum())
            total[n] += grad.double()
    for p, flag in flags.items():
        p.requires_grad_(flag)
    m = len(examples)
    return {n: (sq[n] / m, sq[n] / m - float((total[n] / m).square().sum())) for n in params}


def _split(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _assert_matches(stats: ModuleStats, ref: dict[str, tuple[float, float]], rtol: float = 1e-5) -> None:
    assert list(stats.modules) == list(ref)
    for name, (fisher, variance) in ref.items():
        m = stats.modules[name]
        assert fisher > 0 and variance > 0, name
        assert m.fisher_sum == pytest.approx(fisher, rel=rtol), name
        assert m.variance_sum == pytest.approx(variance, rel=rtol, abs=rtol * fisher), name
        assert m.score("fisher", "mean") == pytest.approx(fisher / m.numel, rel=rtol), name


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_scores_equal_per_example_gradients_of_examples_run_alone(arch: str) -> None:
    # Batches of different sizes (3 and 2): each example weighs the same whatever its batch's size.
    stream = batches(arch, 1, batch_size=3, seed=1) + batches(arch, 1, batch_size=2, seed=2)
    model = peft_model(arch, r=4)
    stats = estimate_module_scores(model, stream, _cfg(2, score="variance"))
    assert stats.num_batches == 2
    assert stats.metadata["estimator"] == "per_example" and stats.metadata["num_examples"] == 5
    _assert_matches(stats, _alone_reference(model, [e for b in stream for e in _split(b)]))


def test_padded_positions_contribute_nothing() -> None:
    """BERT with right padding (attention_mask = 0) equals each example run alone without its padding."""
    g = torch.Generator().manual_seed(5)
    lengths = [12, 7, 3]
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.zeros_like(ids)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
        ids[i, k:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}
    model = peft_model("bert", r=4)
    stats = estimate_module_scores(model, [batch], _cfg(1, score="variance"))
    alone = [
        {
            "input_ids": ids[i : i + 1, :k],
            "attention_mask": mask[i : i + 1, :k],
            "labels": batch["labels"][i : i + 1],
        }
        for i, k in enumerate(lengths)
    ]
    _assert_matches(stats, _alone_reference(model, alone), rtol=1e-4)


class _Twice(torch.nn.Module):
    """One linear layer applied twice (shared weights): its per-example gradient has two terms per token."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def _twice_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch["x"]).mean(1), batch["y"])


def test_shared_layer_and_two_forwards_per_backward() -> None:
    torch.manual_seed(0)
    model = get_peft_model(_Twice(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "head"]))
    g = torch.Generator().manual_seed(6)
    stream = [{"x": torch.randn(4, 5, 6, generator=g), "y": torch.randint(0, 3, (4,), generator=g)}]
    examples = [{"x": b["x"][i : i + 1], "y": b["y"][i : i + 1]} for b in stream for i in range(4)]
    ref = _alone_reference(model, examples, _twice_loss)
    # One forward of 4 examples per backward; the layer is called twice in it.
    one = estimate_module_scores(model, stream, _cfg(1, score="variance"), loss_fn=_twice_loss)
    _assert_matches(one, ref)
    # Two forwards of 2 examples each, summed into one backward (each a mean over its own examples).
    with fim_calibration(model, _cfg(1, score="variance")) as cal:
        halves = [{k: v[:2] for k, v in stream[0].items()}, {k: v[2:] for k, v in stream[0].items()}]
        (_twice_loss(model, halves[0]) + _twice_loss(model, halves[1])).backward()
    assert cal.scores.num_batches == 1 and cal.scores.metadata["num_examples"] == 4
    _assert_matches(cal.scores, ref)
    # Two forwards, then their two backwards (two calibration batches of 2).
    with fim_calibration(model, _cfg(2, score="variance")) as cal:
        losses = [_twice_loss(model, half) for half in halves]
        for loss in losses:
            loss.backward()
    assert cal.scores.num_batches == 2 and cal.scores.metadata["num_examples"] == 4
    _assert_matches(cal.scores, ref)


def test_gradient_bypassing_lora_b_layer_is_an_error() -> None:
    """A loss term that uses B's weight directly (not through lora_B's forward) cannot be split by example."""
    model = peft_model("llama", r=4)
    b = next(iter(lora_modules(model).values())).lora_B["default"].weight

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**batch).loss + (b.sum() - 1.0).square()

    with pytest.raises(CalibrationError, match="bypasses"):
        estimate_module_scores(model, batches("llama", 2), _cfg(2), loss_fn=loss_fn)


# --- gradient checkpointing ----------------------------------------------------------------------------


def _peft_llama(base: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _enable_checkpointing(model: torch.nn.Module, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_counts_each_example_once(use_reentrant: bool) -> None:
    stream = batches("llama", 3, batch_size=3, seq_len=10)
    reference = estimate_module_scores(_peft_llama(tiny_llama()), stream, _cfg(3, score="variance"))
    base = tiny_llama()
    _enable_checkpointing(base, use_reentrant)
    layers = base.model.layers
    calls = [0]
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def counting(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            calls[0] += 1
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    model = _peft_llama(base)
    stats = estimate_module_scores(model, stream, _cfg(3, score="variance"))
    assert calls[0] == len(layers) * 3  # the layers were really checkpointed (and recomputed)
    assert stats.metadata["num_examples"] == reference.metadata["num_examples"] == 9
    for name, m in stats.modules.items():
        ref = reference.modules[name]
        # Counting an example twice would double the sum; missing one would lower it.
        assert m.fisher_sum == pytest.approx(ref.fisher_sum, rel=1e-6), name
        assert m.variance_sum == pytest.approx(ref.variance_sum, rel=1e-6), name


# --- the model is left as it was -----------------------------------------------------------------------


def _lora_b(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    return (m.lora_B["default"] for m in lora_modules(model).values())


def _hook_counts(model: torch.nn.Module) -> list[int]:
    counts = [len(model._forward_pre_hooks), len(model._forward_hooks)]
    for layer in _lora_b(model):
        counts += [len(layer._forward_hooks), len(layer._forward_pre_hooks)]
        counts.append(len(getattr(layer.weight, "_post_accumulate_grad_hooks", None) or {}))
    return counts


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail", [False, True])
def test_hooks_removed_and_state_restored(fail: bool) -> None:
    model = peft_model("llama", r=4)
    model.train()
    b0 = next(_lora_b(model)).weight
    b0.grad = torch.full_like(b0, 3.0)
    before_hooks = _hook_counts(model)
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grad = b0.grad

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_fn.calls += 1  # type: ignore[attr-defined]
        if fail and loss_fn.calls == 2:  # type: ignore[attr-defined]
            raise _Boom("batch 1")
        return m(**batch).loss

    loss_fn.calls = 0  # type: ignore[attr-defined]
    if fail:
        with pytest.raises(_Boom):
            estimate_module_scores(model, batches("llama", 3), _cfg(3), loss_fn=loss_fn)
    else:
        estimate_module_scores(model, batches("llama", 3), _cfg(3), loss_fn=loss_fn)
    assert _hook_counts(model) == before_hooks
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_flags
    assert b0.grad is grad
    # A later backward accumulates into .grad as usual (a leftover hook would consume it).
    for layer in _lora_b(model):
        layer.weight.grad = None
    model(**batches("llama", 1)[0]).loss.backward()
    assert all(layer.weight.grad is not None for layer in _lora_b(model))


# --- configuration -------------------------------------------------------------------------------------


def test_config_rejects_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="`estimator` must be one of"):
        FimConfig(estimator="ghost")  # type: ignore[arg-type]
    assert FimConfig().estimator == "batch"


def test_cli_exposes_the_estimator_flag_with_its_docstring_as_help() -> None:
    from fimlora.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("allocate", "train"):
        text = " ".join(sub.choices[command].format_help().split())
        assert "--estimator {batch,per_example}" in text, command
        assert "exact, from one pass" in text, command  # FimConfig's field docstring is the help


# --- torch.distributed ---------------------------------------------------------------------------------


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shard = batches("llama", 4, batch_size=2)[rank * 2 : rank * 2 + 2]
        stats = estimate_module_scores(peft_model("llama", r=4), shard, _cfg(2, score="variance"))
        if rank == 0:
            stats.save_json(Path(out_dir) / "stats.json")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_all_reduced_per_example_statistics_equal_single_process_union(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_dist_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    distributed = ModuleStats.load_json(tmp_path / "stats.json")
    single = estimate_module_scores(
        peft_model("llama", r=4), batches("llama", 4, batch_size=2), _cfg(4, score="variance")
    )
    assert distributed.world_size == 2 and distributed.num_batches == single.num_batches == 4
    assert distributed.metadata["num_examples"] == single.metadata["num_examples"] == 8
    for name, d in distributed.modules.items():
        s = single.modules[name]
        assert d.fisher_sum == pytest.approx(s.fisher_sum, rel=1e-6), name
        # The variance of the union (sum g_n all-reduced before the mean is squared).
        assert d.variance_sum == pytest.approx(s.variance_sum, rel=1e-6), name
