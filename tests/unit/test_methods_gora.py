"""GoRA (``fimlora.methods.gora``): importance and gradients by hand, the allocation rule, the budget and
bounds, B's formula (and that the first update is a descent step), the model state around calibration, the
CLI, and a save -> vanilla-PEFT reload in a fresh process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.data_files import classification_rows, write_csv
from helpers.tiny_models import ARCHS, batches, make_tiny_bert, peft_model
from peft import LoraConfig, get_peft_model
from test_methods_reload import _CHECK, OPTIONS, _train
from torch import nn

from fimlora.methods import available_methods, get_method
from fimlora.methods.gora import (
    GoraOptions,
    gora_allocation_scores,
    gora_importance,
    mean_weight_gradients,
    plan_gora_ranks,
)
from fimlora.peft_glue import lora_modules, module_shapes
from fimlora.peft_glue.weights import set_lora_factors

XI = 0.05
T = 2


# ---- by hand -----------------------------------------------------------------------------------------


class _TwoLinears(nn.Module):
    """Two bias-free linears read by a linear loss, so that dL/dW = c (sum_n x_n)^T exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 2, bias=False)
        self.second = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
            self.second.weight.fill_(0.5)


def _linear_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    c1, c2 = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0, -1.0, 2.0])
    return (model.first(x) @ c1).sum() + (model.second(x) @ c2).sum()


def test_weight_gradients_and_importance_by_hand() -> None:
    model = get_peft_model(_TwoLinears(), LoraConfig(r=2, target_modules=["first", "second"]))
    data = [torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]), torch.tensor([[2.0, 2.0, 0.0]])]
    grads, seen = mean_weight_gradients(model, data, 5, loss_fn=_linear_loss)
    # Per batch G = c x_sum^T with x_sum = [1, 1, 2] and [2, 2, 0]: mean x_sum = [1.5, 1.5, 1].
    x_mean = torch.tensor([1.5, 1.5, 1.0])
    g1 = torch.outer(torch.tensor([1.0, 2.0]), x_mean)  # [[1.5, 1.5, 1], [3, 3, 2]]
    g2 = torch.outer(torch.tensor([1.0, 0.0, -1.0, 2.0]), x_mean)
    assert seen == 2
    torch.testing.assert_close(grads["first"], g1)
    torch.testing.assert_close(grads["second"], g2)
    # |W1 * G1| = [[1.5, 3, 0.5], [0, 9, 2]]: mean 16/6. |W2 * G2| = 0.5 |G2|: sum 8 over 12 elements.
    w1 = model.base_model.model.first.base_layer.weight
    assert gora_importance(w1, grads["first"]) == pytest.approx(8 / 3)
    assert gora_importance(torch.full((4, 3), 0.5), grads["second"]) == pytest.approx(2 / 3)


def test_parameters_follow_importance() -> None:
    # Equal shapes: ranks in the ratio of the importances, 3:1 of a budget of 2 * 4 ranks.
    same = {"a": (8, 8), "b": (8, 8)}
    ranks = plan_gora_ranks({"a": 3.0, "b": 1.0}, same, GoraOptions(), r=4)
    assert dict(ranks) == {"a": 6, "b": 2}
    # GoRA's importances are allocated as they are, not through FIM-LoRA's default normalisation
    assert GoraOptions().allocation_config().normalize == "none"
    layered = {"h.0.q": 10.0, "h.1.q": 20.0, "h.0.v": 1.0, "h.1.v": 2.0}  # per kind, h.0.q would tie h.0.v
    ranks = plan_gora_ranks(layered, dict.fromkeys(layered, (8, 8)), GoraOptions(r_min=1, r_max=8), r=4)
    assert ranks["h.1.q"] >= ranks["h.0.q"] > ranks["h.1.v"] >= ranks["h.0.v"]
    # Different shapes: GoRA gives each module a parameter count proportional to its importance, so the
    # allocator's score is I / (in + out); here that is 1/16 = 2/32 and the ranks are equal.
    shapes = {"a": (8, 8), "b": (8, 24)}
    assert gora_allocation_scores({"a": 1.0, "b": 2.0}, shapes) == {"a": 1 / 16, "b": 2 / 32}
    ranks = plan_gora_ranks({"a": 1.0, "b": 2.0}, shapes, GoraOptions(), r=4)
    assert dict(ranks) == {"a": 4, "b": 4}  # parameters 64 : 128 = 1 : 2, the importances' ratio
    meta = ranks.metadata
    assert meta["method"] == "gora" and meta["importance"] == {"a": 1.0, "b": 2.0}


# ---- budget and bounds, on the tiny models -----------------------------------------------------------


def _prepare(arch: str, **options: object) -> tuple[nn.Module, object, list[dict]]:
    build, kwargs = ARCHS[arch]
    method = get_method("gora", calibration_batches=T, **options)
    data = batches(arch, T)
    model = method.prepare(build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), calibration_batches=iter(data))
    return model, method, data


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_budget_and_bounds_hold(arch: str) -> None:
    model, method, _ = _prepare(arch, budget_unit="ranks")
    ranks = method.rank_map  # type: ignore[attr-defined]
    shapes = module_shapes(lora_modules(model))
    assert sum(ranks.values()) == 4 * len(shapes)
    assert all(2 <= k <= min(16, *shapes[n]) for n, k in ranks.items())  # default bounds [r/2, 4r]

    model, method, _ = _prepare(arch, r_min=3, r_max=6)  # budget_unit="params", GoRA's
    ranks = method.rank_map  # type: ignore[attr-defined]
    cost = {n: i + o for n, (i, o) in shapes.items()}
    used, budget = sum(k * cost[n] for n, k in ranks.items()), 4 * sum(cost.values())
    assert used <= budget and budget - used < min(cost.values())
    assert all(3 <= k <= 6 for k in ranks.values())
    assert ranks.metadata["total_params"] == used and ranks.metadata["uniform_params"] == budget
    from fimlora.peft_glue import current_ranks

    assert current_ranks(model) == dict(ranks)

    with pytest.raises(ValueError, match="infeasible"):
        _prepare(arch, budget_ranks=1000, budget_unit="ranks", r_max=6)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="init_step_size"):
        GoraOptions(init_step_size=-1.0)
    with pytest.raises(ValueError, match="r_min"):
        GoraOptions(r_min=5, r_max=2)
    with pytest.raises(ValueError, match="calibration batches"):
        get_method("gora").prepare(ARCHS["llama"][0](0), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="DoRA"):
        get_method("gora").prepare(
            ARCHS["llama"][0](0),
            LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
            calibration_batches=[],
        )


# ---- the initialisation --------------------------------------------------------------------------------


def _reference_grads(arch: str, data: list[dict]) -> dict[str, torch.Tensor]:
    """Mean weight gradients of the base model by plain autograd, each as (out, in)."""
    base = ARCHS[arch][0](0).eval()
    for batch in data:
        base(**batch).loss.backward()
    out = {}
    for name, module in base.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.grad is not None and w.dim() == 2:
            g = w.grad / len(data)
            out[name] = g.T if type(module).__name__ == "Conv1D" else g  # Conv1D stores (in, out)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_b_is_a_compressed_gradient_step_and_w_is_unchanged(arch: str) -> None:
    model, _, data = _prepare(arch, init_step_size=XI)
    ref = _reference_grads(arch, data)
    fresh = dict(ARCHS[arch][0](0).named_parameters())
    for name, module in lora_modules(model).items():
        a = module.lora_A["default"].weight.detach().double()  # (r, in)
        b = module.lora_B["default"].weight.detach().double()  # (out, r)
        s = module.scaling["default"]
        g = ref[name].double()
        rank, fan_in = a.shape
        expected_b = (
            -(XI / s) * math.sqrt(fan_in / rank) * g @ torch.linalg.pinv(a)
        )  # pinv(A) = A^T (A A^T)^-1
        torch.testing.assert_close(b, expected_b, rtol=2e-3, atol=1e-7)
        projection = torch.linalg.pinv(a) @ a
        torch.testing.assert_close(
            s * b @ a, -XI * math.sqrt(fan_in / rank) * g @ projection, rtol=2e-3, atol=1e-7
        )
        base = module.base_layer.weight
        torch.testing.assert_close(base, fresh[f"{name}.weight"], rtol=0, atol=0)  # W is not rewritten


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_first_update_lowers_the_calibration_loss_as_predicted(arch: str) -> None:
    """To first order the init changes the mean calibration loss by sum_m <G_m, s B_m A_m> < 0."""
    xi = 1e-3
    model, _, data = _prepare(arch, init_step_size=xi)
    ref = _reference_grads(arch, data)
    predicted = 0.0
    for name, module in lora_modules(model).items():
        delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        predicted += float((ref[name] * delta.detach()).sum())
    base = ARCHS[arch][0](0).eval()
    model.eval()
    with torch.no_grad():
        change = sum(float(model(**b).loss - base(**b).loss) for b in data) / len(data)
    assert predicted < 0
    assert change == pytest.approx(predicted, rel=0.1)


def test_without_gradient_init_the_adapter_starts_at_zero() -> None:
    model, _, data = _prepare("llama", gradient_init=False)
    assert all(
        float(m.lora_B["default"].weight.detach().abs().max()) == 0 for m in lora_modules(model).values()
    )
    base = ARCHS["llama"][0](0).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, base(**data[0]).logits)


def test_set_lora_factors_checks_shapes() -> None:
    module = next(iter(lora_modules(peft_model("llama")).values()))
    with pytest.raises(ValueError, match="LoRA-B has shape"):
        set_lora_factors(module, b=torch.zeros(3, 3))


# ---- the model's state around calibration --------------------------------------------------------------


def _state(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    return flags, modes


def test_calibration_restores_flags_modes_and_grads() -> None:
    model = peft_model("llama")
    model.train()
    model.base_model.model.model.layers[0].eval()  # a mixed state, to be restored as it was
    some_b = next(iter(lora_modules(model).values())).lora_B["default"].weight
    own_grad = torch.ones_like(some_b)
    some_b.grad = own_grad
    before = _state(model)
    data = batches("llama", T)

    mean_weight_gradients(model, data, T)
    assert _state(model) == before
    assert some_b.grad is own_grad
    assert [n for n, p in model.named_parameters() if p.grad is not None and p is not some_b] == []

    calls = []

    def failing(model: nn.Module, batch: dict) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # after one backward: the hooks have run, a sum exists
            raise RuntimeError("boom")
        return model(**batch).loss

    with pytest.raises(RuntimeError, match="boom"):
        mean_weight_gradients(model, data, T, loss_fn=failing)
    assert _state(model) == before and some_b.grad is own_grad
    for module in lora_modules(model).values():
        w = module.base_layer.weight
        assert not w.requires_grad and w.grad is None and not w._post_accumulate_grad_hooks


def test_prepare_leaves_a_plain_trainable_adapter() -> None:
    model, _, _ = _prepare("llama")
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad == ("lora_" in name), name
    assert all(m.training for m in model.modules())  # a fresh model is in train mode; so it stays


# ---- command line and reload -----------------------------------------------------------------------------


def test_cli_lists_and_trains_gora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fimlora.cli import main

    assert "gora" in available_methods()
    assert main(["methods"]) == 0
    assert any(line.startswith("gora ") for line in capsys.readouterr().out.splitlines())
    bert = make_tiny_bert(tmp_path / "bert")
    train = write_csv(tmp_path / "train.csv", classification_rows(32))
    out = tmp_path / "out"
    code = main(
        [
            "train", "--model", str(bert), "--data", str(train), "--out", str(out), "--r", "4",
            "--batch-size", "8", "--max-steps", "2", "--no-progress", "--device", "cpu", "--method", "gora",
            "--set", "method_options.calibration_batches=2", "--set", "method_options.init_step_size=0.01",
        ]
    )  # fmt: skip
    assert code == 0
    meta = json.loads((out / "rank_map.json").read_text())["metadata"]
    assert meta["method"] == "gora" and meta["config"]["init_step_size"] == 0.01
    assert meta["calibration_batches"] == 2
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]


def test_gora_adapter_reloads_with_plain_peft_in_a_fresh_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(OPTIONS, "gora", {"calibration_batches": T})
    build, _ = ARCHS["llama"]
    build(0).save_pretrained(tmp_path / "base")
    input_ids = batches("llama", 1, seed=5)[0]["input_ids"]
    model, ranks = _train("gora")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        base_logits = build(0).eval()(input_ids=input_ids).logits
    assert float((logits - base_logits).abs().max()) > 1e-3  # the adapter is not a no-op
    model.save_pretrained(tmp_path / "gora")
    torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / "gora" / "expected.pt")
    config = json.loads((tmp_path / "gora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["rank_pattern"].values()) == sorted(ranks.values())
    (tmp_path / "methods.json").write_text(json.dumps(["gora"]))
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    worst = json.loads(out.stdout.strip().splitlines()[-1])
    assert worst["gora"] <= 1e-5, worst


# ---- FIM's ranks with GoRA's initialisation (the `fim` method's gradient_init option) -------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fim_with_gradient_init_has_fims_ranks_and_goras_b(arch: str) -> None:
    from fimlora import FimConfig

    build, _ = ARCHS[arch]
    data = batches(arch, T)
    lcfg = LoraConfig(r=4, lora_alpha=8, **ARCHS[arch][1])
    fim_cfg = FimConfig(calibration_batches=T, budget_unit="params", r_min=1, r_max=16, show_progress=False)
    plain = get_method("fim", **vars(fim_cfg))
    plain_model = plain.prepare(build(0), lcfg, calibration_batches=iter(data))
    ginit = get_method("fim", **vars(fim_cfg), gradient_init=True, init_step_size=XI)
    model = ginit.prepare(
        build(0), lcfg, calibration_batches=iter(data)
    )  # a one-pass iterator: both passes see it
    assert dict(ginit.rank_map) == dict(plain.rank_map)  # the same map
    assert ginit.rank_map.metadata["gradient_init"] == {"init_step_size": XI}
    ref = _reference_grads(arch, data)
    for name, module in lora_modules(model).items():
        a = module.lora_A["default"].weight.detach().double()
        b = module.lora_B["default"].weight.detach().double()
        s = module.scaling["default"]
        rank, fan_in = a.shape
        expected_b = -(XI / s) * math.sqrt(fan_in / rank) * ref[name].double() @ torch.linalg.pinv(a)
        torch.testing.assert_close(b, expected_b, rtol=2e-3, atol=1e-7)
        assert float(lora_modules(plain_model)[name].lora_B["default"].weight.abs().max()) == 0.0
    with pytest.raises(ValueError, match="gradient_init"):
        get_method("fim", gradient_init="yes")
    with pytest.raises(ValueError, match="init_step_size"):
        get_method("fim", init_step_size=-1.0)
