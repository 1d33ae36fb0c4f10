"""One budget for every method, driven by the registry: ``fimlora train --budget-ranks R`` / ``--budget-params
P`` end every registered method at that budget, or are refused in one line before anything is loaded; an
option a method does not use is an error, never dropped. A newly registered method is tested by being
registered."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.data_files import sft_rows, write_jsonl
from helpers.tiny_models import make_tiny_llama
from safetensors.torch import load_file

from fimlora.methods.base import BUDGET_OPTIONS, RUN_OPTIONS, available_methods, method_run_options

# Tiny LLaMA, all seven linear kinds in 2 layers (14 modules); at r = 4 uniform LoRA holds 56 ranks and
# 4 * sum(in + out) parameters. Both budgets are feasible inside every method's default bounds.
BUDGET_RANKS = 40
BUDGET_PARAMS = 3000
PARAM_SLACK = 96  # a parameter budget is met from below with less than one rank of the costliest module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("one_budget")
    return {
        "root": root,
        "llama": make_tiny_llama(root / "llama"),
        "sft": write_jsonl(root / "sft.jsonl", sft_rows(48)),
    }


def _train(ws: dict[str, Path], method: str, out: Path, *extra: str) -> tuple[int, str]:
    import contextlib
    import io

    from fimlora.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            ["train", "--model", str(ws["llama"]), "--task", "sft", "--data", str(ws["sft"]), "--out", str(out),
             "--method", method, "--r", "4", "--batch-size", "4", "--max-steps", "12", "--seed", "0",
             "--target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "--no-progress", "--device", "cpu", *extra]
        )  # fmt: skip
    return code, err.getvalue()


def _ranks_and_params(out: Path) -> tuple[int, int]:
    """Rank sum and LoRA parameter count of the saved adapter, read from its tensors."""
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ranks = sum(int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_A.weight"))
    params = sum(t.numel() for k, t in tensors.items() if ".lora_A." in k or ".lora_B." in k)
    return ranks, params


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("unit", ["ranks", "params"])
def test_every_method_ends_at_the_budget_or_refuses_it_in_one_line(
    workspace: dict[str, Path], tmp_path: Path, method: str, unit: str
) -> None:
    flag, budget = ("--budget-ranks", BUDGET_RANKS) if unit == "ranks" else ("--budget-params", BUDGET_PARAMS)
    out = tmp_path / "run"
    code, err = _train(workspace, method, out, flag, str(budget))
    if f"budget_{unit}" not in method_run_options(method):
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"does not use {flag}" in err and not out.exists()
        return
    assert code == 0, err
    ranks, params = _ranks_and_params(out)
    if unit == "ranks":
        assert ranks == BUDGET_RANKS, f"{method} ended at rank sum {ranks}, asked for {BUDGET_RANKS}"
    else:
        assert BUDGET_PARAMS - PARAM_SLACK < params <= BUDGET_PARAMS, f"{method} ended at {params} parameters"


@pytest.mark.parametrize("method", available_methods())
def test_a_run_option_a_method_does_not_use_is_refused_before_loading(
    workspace: dict[str, Path], tmp_path: Path, method: str
) -> None:
    unused = [f for f in RUN_OPTIONS if f not in method_run_options(method) and f != "budget_unit"]
    for field in unused:
        flag = "--" + field.replace("_", "-")
        value = "2" if field in ("r_min", "calibration_batches") else "40" if field != "r_max" else "8"
        out = tmp_path / field
        code, err = _train(workspace, method, out, flag, value)
        assert code == 2 and f"'{method}' does not use {flag}" in err, (method, field, err)
        assert not out.exists()


def test_every_method_declares_only_known_run_options() -> None:
    for method in available_methods():
        assert method_run_options(method) <= set(RUN_OPTIONS), method
    assert set(BUDGET_OPTIONS) < set(RUN_OPTIONS)


@pytest.mark.parametrize(("method", "options"), [("adalora", {}), ("eva", {"rho": 2.0})])
@pytest.mark.parametrize("unit", ["ranks", "params"])
def test_an_explicit_budget_above_what_the_method_can_hold_is_refused_and_the_model_left_as_it_was(
    method: str, options: dict, unit: str
) -> None:
    import torch
    from helpers.tiny_models import ARCHS, batches
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fimlora.methods import get_method

    build, kwargs = ARCHS["llama"]
    base = build(0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    too_much = {f"budget_{unit}": 10**7, "budget_unit": unit}
    with pytest.raises(ValueError, match="budget"):
        get_method(method, **options, **too_much).prepare(
            base, LoraConfig(r=4, **kwargs), calibration_batches=batches("llama", 2), total_steps=10
        )
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", available_methods())
def test_an_infeasible_budget_is_refused_in_one_line_before_the_weights_load(
    workspace: dict[str, Path], tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fimlora.recipes.prepare as prepare_module

    if "budget_ranks" not in method_run_options(method):
        pytest.skip(f"{method} takes no explicit budget (see the test above)")

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's weights were loaded before the budget was checked")

    monkeypatch.setattr(prepare_module, "load_model_and_tokenizer", no_load)
    out = tmp_path / "run"
    code, err = _train(workspace, method, out, "--budget-ranks", str(10**6))  # far above any method's bounds
    assert code == 2 and len(err.strip().splitlines()) == 1 and "budget" in err, (method, err)
    assert not out.exists()


@pytest.mark.parametrize("method", available_methods())
def test_every_method_is_configured_one_way_by_its_options_class(method: str) -> None:
    import dataclasses

    from fimlora.methods import get_method
    from fimlora.methods.base import method_options_class

    options_class = method_options_class(method)
    assert dataclasses.is_dataclass(options_class)
    default = get_method(method)
    assert default.options == options_class()  # no fields: the options class's defaults
    given = options_class()
    assert get_method(method, given).options is given  # an options object, as it is
    with pytest.raises(ValueError, match=rf"{options_class.__name__} has no option 'not_an_option'; valid: "):
        get_method(method, not_an_option=1)
    with pytest.raises(ValueError, match="not both"):
        get_method(method, given, **{dataclasses.fields(options_class)[0].name: None})
    # the run-level options a method honours are exactly those its options class has
    assert method_run_options(method) == {f.name for f in dataclasses.fields(options_class)} & set(
        RUN_OPTIONS
    )
