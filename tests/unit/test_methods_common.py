"""Shared pieces of the training-time methods: optimizer-state carry-over and the rank history."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fimlora.methods import available_methods, get_method
from fimlora.methods.history import RankEvent, RankHistory
from fimlora.methods.optim_state import ParamRemap, carry_optimizer_state, stale_optimizer_params
from fimlora.rankmap import RankMap


def _adam_with_state(*params: nn.Parameter) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    return opt


def test_carry_optimizer_state_keeps_survivors_and_zeroes_new_rows() -> None:
    torch.manual_seed(0)
    a_old = nn.Parameter(torch.randn(4, 3))  # LoRA-A: rank is dim 0
    b_old = nn.Parameter(torch.randn(5, 4))  # LoRA-B: rank is dim 1
    opt = _adam_with_state(a_old, b_old)
    before_a = {k: v.clone() for k, v in opt.state[a_old].items()}
    before_b = {k: v.clone() for k, v in opt.state[b_old].items()}
    a_new, b_new = nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(5, 6))
    kept = [3, 1]
    carry_optimizer_state(opt, [ParamRemap(a_old, a_new, 0, kept), ParamRemap(b_old, b_new, 1, kept)])

    assert opt.param_groups[0]["params"] == [a_new, b_new]
    assert a_old not in opt.state and b_old not in opt.state
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[a_new][key][:2], before_a[key][kept])
        assert torch.count_nonzero(opt.state[a_new][key][2:]) == 0
        torch.testing.assert_close(opt.state[b_new][key][:, :2], before_b[key][:, kept])
        assert torch.count_nonzero(opt.state[b_new][key][:, 2:]) == 0
    assert float(opt.state[a_new]["step"]) == float(before_a["step"])  # scalar state kept
    assert stale_optimizer_params(opt, [a_new, b_new]) == []
    # The optimizer still works on the new tensors.
    a_new.grad, b_new.grad = torch.ones_like(a_new), torch.ones_like(b_new)
    opt.step()


def test_carry_optimizer_state_refuses_unknown_parameter_without_side_effects() -> None:
    a = nn.Parameter(torch.randn(2, 3))
    opt = _adam_with_state(a)
    stranger = nn.Parameter(torch.randn(2, 3))
    with pytest.raises(ValueError, match="not in the optimizer"):
        carry_optimizer_state(
            opt,
            [ParamRemap(a, nn.Parameter(torch.zeros(1, 3)), 0, [0]), ParamRemap(stranger, stranger, 0, [0])],
        )
    assert opt.param_groups[0]["params"] == [a]
    with pytest.raises(ValueError, match="do not fit"):
        carry_optimizer_state(opt, [ParamRemap(a, nn.Parameter(torch.zeros(1, 3)), 0, [0, 1])])


def test_stale_optimizer_params_reports_problems() -> None:
    a = nn.Parameter(torch.randn(2, 3))
    opt = _adam_with_state(a)
    assert stale_optimizer_params(opt, []) != []  # a is not "in the model"
    opt.state[a]["exp_avg"] = torch.zeros(3, 3)
    assert any("shape" in p for p in stale_optimizer_params(opt, [a]))


def test_history_jsonl_round_trip_and_trajectories(tmp_path) -> None:
    path = tmp_path / "h" / "ranks.jsonl"
    h = RankHistory(path)
    h.log(RankEvent(0, m, 4, 4, "init") for m in ("layers.0.q", "layers.0.v"))
    h.log_changes(5, {"layers.0.q": 4, "layers.0.v": 4}, {"layers.0.q": 2, "layers.0.v": 6}, "l1ra")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 4
    assert set(lines[-1]) >= {"step", "module", "old_rank", "new_rank", "reason"}
    again = RankHistory.read_jsonl(path)
    assert again.trajectories() == {"layers.0.q": [(0, 4), (5, 2)], "layers.0.v": [(0, 4), (5, 6)]}
    restored = RankHistory()
    restored.load_state_dict(h.state_dict())
    assert restored.events == h.events
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        RankHistory.read_jsonl(tmp_path / "bad.jsonl")


def test_history_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    h = RankHistory()
    h.log([RankEvent(0, "layers.0.q", 4, 4, "init"), RankEvent(3, "layers.0.q", 4, 2, "l1ra")])
    assert h.plot_trajectories(tmp_path / "traj.png", last_step=10).stat().st_size > 0
    final = RankMap({"layers.0.q": 2, "layers.1.q": 6})
    assert RankHistory.plot_final(final, tmp_path / "final.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no rank events"):
        RankHistory().plot_trajectories(tmp_path / "empty.png")


@pytest.mark.parametrize("name", available_methods())
def test_every_method_is_selectable_by_name(name: str) -> None:
    method = get_method(name)
    assert method.name == name


def test_option_help_covers_inherited_fields() -> None:
    """Method options that share the budget/bounds base still get help text and a type for every field."""
    import dataclasses

    from fimlora.cli_options import field_docs, field_types
    from fimlora.methods.budget import BudgetBoundsOptions
    from fimlora.methods.fim_spectrum import SpectrumOptions
    from fimlora.methods.gora import GoraOptions

    for cls in (GoraOptions, SpectrumOptions):
        assert issubclass(cls, BudgetBoundsOptions)
        names = {f.name for f in dataclasses.fields(cls)}
        assert {"budget_unit", "r_min", "seed", "calibration_batches"} <= names
        assert set(field_docs(cls)) == names, cls
        assert set(field_types(cls)) >= names, cls


def test_shared_budget_bounds_checks_name_the_field() -> None:
    from fimlora.methods.fim_spectrum import SpectrumOptions
    from fimlora.methods.gora import GoraOptions

    for cls in (GoraOptions, SpectrumOptions):
        with pytest.raises(ValueError, match="r_min"):
            cls(r_min=5, r_max=2)
        with pytest.raises(ValueError, match="budget_ranks"):
            cls(budget_unit="ranks", budget_ranks=0)
        with pytest.raises(ValueError, match="adjust_scaling_factors"):
            cls(adjust_scaling_factors="yes")
