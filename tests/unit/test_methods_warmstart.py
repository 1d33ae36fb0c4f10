"""warmstart: the warm-up rank, the budget held after truncation, the truncation exact (top singular directions
through PEFT's forward), the optimizer state of truncated modules fresh, the signals, bad input, and a SIGTERM
during or right after the warm-up resuming to the same adapter bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.processes import SigtermAt
from helpers.tiny_models import ARCHS, batches, method_step
from peft import LoraConfig

from fimlora.compress.spectrum import factor_svd
from fimlora.methods import get_method
from fimlora.methods.budget import RankBudget
from fimlora.methods.optim_state import stale_optimizer_params
from fimlora.methods.warmstart import direction_counts, plan_warmstart_ranks
from fimlora.peft_glue import current_ranks, lora_factors, lora_modules, module_shapes
from fimlora.peft_glue.weights import lora_scale

R, STEPS = 4, 8


def _lora(arch: str) -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=2 * R, **ARCHS[arch][1])


def _prepare(arch: str, **options: Any) -> tuple[Any, torch.nn.Module]:
    method = get_method("warmstart", **options)
    model = method.prepare(
        ARCHS[arch][0](0), _lora(arch), calibration_batches=batches(arch, 4), total_steps=STEPS
    )
    return method, model


def _spectra(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in lora_modules(model).items():
        a, b = lora_factors(m)
        out[n] = factor_svd(a.weight, b.weight, lora_scale(m)).s
    return out


@pytest.mark.parametrize(
    ("arch", "signal_name", "unit"),
    [
        ("bert", "energy", "ranks"),
        ("gpt2", "energy", "params"),
        ("llama", "energy", "ranks"),
        ("llama", "count", "params"),
        ("llama", "fim", "ranks"),
        ("llama", "fim", "params"),
    ],
)
def test_warmup_rank_then_the_budget_exactly_and_the_top_directions_kept(
    arch: str, signal_name: str, unit: str
) -> None:
    options = {"fim_batches": 4} if signal_name == "fim" else {}
    method, model = _prepare(arch, warmup=3, signal=signal_name, budget_unit=unit, r_min=1, seed=1, **options)
    shapes = module_shapes(lora_modules(model))
    assert set(current_ranks(model).values()) == {2 * R}  # warm-up at 2r, every module
    data = batches(arch, STEPS, seed=3)
    opt = torch.optim.AdamW(method.param_groups(model, lr=2e-2))
    for step in range(2):
        assert method_step(method, model, opt, step, data[step]) is None
    model(**data[2]).loss.backward()  # the warm-up's last step, then the truncation
    opt.step()
    opt.zero_grad()
    before = _spectra(model)
    state_before = {id(p): p for p in opt.state}
    new_map = method.on_step_end(model, 2, opt)
    assert new_map is not None and method.truncated
    ranks = current_ranks(model)
    assert ranks == dict(new_map) and all(1 <= k <= 2 * R for k in ranks.values())
    budget = RankBudget.resolve(shapes, R, unit, None, None)
    used = budget.used(ranks)
    if unit == "ranks":
        assert used == budget.total
    else:
        assert budget.total - min(budget.costs.values()) < used <= budget.total
    after = _spectra(model)
    for n, k in ranks.items():  # the kept update is the old one's best rank-k approximation
        torch.testing.assert_close(after[n][:k], before[n][:k], rtol=1e-4, atol=1e-7)
    # truncated modules: new tensors, no optimizer state; unchanged ones keep theirs
    assert not stale_optimizer_params(opt, list(model.parameters()))
    mods = lora_modules(model)
    for n, k in ranks.items():
        params = [p for f in lora_factors(mods[n]) for p in f.parameters()]
        if k < 2 * R:
            assert all(p not in opt.state for p in params), n
        else:
            assert all(id(p) in state_before for p in params), n
    for step in range(3, STEPS):  # goes on training at the chosen ranks
        assert method_step(method, model, opt, step, data[step]) is None
    model, final = method.finalize(model)
    assert dict(final) == ranks and final.metadata["signal"] == signal_name
    assert final.metadata["warmup_steps"] == 3 and final.metadata["warmup_rank"] == 2 * R


def test_energy_puts_rank_where_the_update_has_directions() -> None:
    shapes = {"wide": (16, 16), "narrow": (16, 16)}
    spectra = {
        "wide": torch.tensor([4.0, 3.9, 3.8, 3.7, 0.1, 0.0]),
        "narrow": torch.tensor([4.0] + [0.01] * 5),
    }
    budget = RankBudget.resolve(shapes, 3, "ranks", None, None)  # 6 ranks in all
    ranks = plan_warmstart_ranks(spectra, shapes, budget, (1, 6), signal="energy")
    assert ranks == {"wide": 5, "narrow": 1}
    counts = direction_counts(spectra, 0.05)
    assert counts == {"wide": 4.0, "narrow": 1.0}
    by_count = plan_warmstart_ranks(spectra, shapes, budget, (1, 6), signal="count", threshold=0.05)
    assert by_count["wide"] > by_count["narrow"] and sum(by_count.values()) == 6
    by_fim = plan_warmstart_ranks(
        spectra, shapes, budget, (1, 6), signal="fim", scores={"wide": 1.0, "narrow": 2.0}
    )
    assert by_fim == {"wide": 2, "narrow": 4}


def test_bad_options_and_runs_are_refused_before_the_model_is_touched() -> None:
    for options, match in [
        ({"warmup": 1.5}, "`warmup`"),
        ({"warmup": 0}, "`warmup`"),
        ({"warmup_rank": 0.5}, "`warmup_rank`"),
        ({"signal": "gradient"}, "`signal`"),
        ({"threshold": 1.0}, "`threshold`"),
        ({"r_min": 5, "r_max": 2}, "r_min"),
    ]:
        with pytest.raises(ValueError, match=match):
            get_method("warmstart", **options)
    base = ARCHS["llama"][0](0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    method = get_method("warmstart", warmup=STEPS)
    with pytest.raises(ValueError, match="must end before the run does"):
        method.prepare(base, _lora("llama"), total_steps=STEPS)
    with pytest.raises(ValueError, match="needs `total_steps`"):
        method.prepare(base, _lora("llama"))
    with pytest.raises(ValueError, match="more than the warm-up can give"):
        get_method("warmstart", budget_ranks=10**6).prepare(base, _lora("llama"), total_steps=STEPS)
    with pytest.raises(ValueError, match="first batches"):
        get_method("warmstart", signal="fim").prepare(base, _lora("llama"), total_steps=STEPS)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in k for k in after)


def test_no_optimizer_at_the_truncation_is_an_error() -> None:
    method, model = _prepare("llama", warmup=1)
    with pytest.raises(ValueError, match="pass it to on_step_end"):
        method.on_step_end(model, 0, None)


# ---- resume: through the training loop, killed during and right after the warm-up ---------------------


def _collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train(method: Any, ckpt: Path | None, resume: bool = False) -> Any:
    from fimlora.training import TrainConfig, train_adapter

    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": torch.randint(0, 97, (12,), generator=g)} for _ in range(24)]
    config = TrainConfig(epochs=1, batch_size=4, lr=2e-2, checkpoint_every=1, progress=False)
    return train_adapter(
        ARCHS["llama"][0](0), _lora("llama"), method, rows, _collate, config,
        seed=0, device="cpu", checkpoint_dir=ckpt, resume=resume,
    )  # fmt: skip


@pytest.mark.parametrize("kill_at", [1, 3])  # the warm-up is steps 0-2: during it, and right after it
def test_sigterm_during_or_after_the_warmup_resumes_to_the_same_adapter_bit_for_bit(
    tmp_path: Path, kill_at: int
) -> None:
    from fimlora.training import TrainingInterrupted

    def make() -> Any:
        return get_method("warmstart", warmup=3, r_min=1)

    reference = _train(make(), None)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted):
        _train(SigtermAt(make(), kill_at), ckpt)
    resumed = _train(make(), ckpt, resume=True)
    assert resumed.resumed_from == kill_at + 1 and resumed.steps == reference.steps
    assert dict(resumed.rank_map) == dict(reference.rank_map)
    ref = {n: p for n, p in reference.model.named_parameters() if p.requires_grad}
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ref[name]), name
