"""FIM-LoRA on tiny BERT, GPT-2 (Conv1D, fused c_attn), LLaMA and all-linear: budget, bounds, shapes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers.tiny_models import batches, peft_model

from fimlora import (
    FimConfig,
    ModuleStats,
    RankMap,
    estimate_module_scores,
    fim_calibration,
    initialize_lora_fim_ranks,
)
from fimlora.peft_glue import lora_modules, pattern_key

ARCH_NAMES = ["bert", "gpt2", "llama", "llama-all-linear"]


def _quiet(**kw):
    return FimConfig(show_progress=False, **kw)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_rank_budget_exact_bounds_and_shapes(arch: str) -> None:
    model = peft_model(arch, r=4)
    cfg = _quiet(r_min=2, r_max=12, normalize="none")  # raw scores: two layers of a kind may tie after "kind"
    rank_map = initialize_lora_fim_ranks(model, batches(arch), cfg)
    mods = lora_modules(model)
    assert set(rank_map) == set(mods)
    assert rank_map.total_rank == 4 * len(mods)
    assert all(2 <= r <= 12 for r in rank_map.values())
    assert len(set(rank_map.values())) > 1, "the batch stream gives different gradients: ranks must differ"
    for name, module in mods.items():
        r = rank_map[name]
        assert module.r["default"] == r
        assert module.lora_A["default"].weight.shape == (r, module.lora_A["default"].in_features)
        assert module.lora_B["default"].weight.shape == (module.lora_B["default"].out_features, r)
        assert torch.count_nonzero(module.lora_B["default"].weight) == 0
        # alpha_pattern keeps alpha/r constant, so every module has the config's scale 8/4.
        assert module.scaling["default"] == pytest.approx(2.0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_parameter_budget_slack_below_one_rank(arch: str) -> None:
    model = peft_model(arch, r=4)
    mods = lora_modules(model)
    costs = {n: m.lora_A["default"].in_features + m.lora_B["default"].out_features for n, m in mods.items()}
    budget = 4 * sum(costs.values()) - 7  # not a multiple of any cost: forces rounding
    rank_map = initialize_lora_fim_ranks(
        model, batches(arch), _quiet(budget_params=budget, r_min=1, r_max=16)
    )
    used = sum(rank_map[n] * costs[n] for n in mods)
    growable = [costs[n] for n in mods if rank_map[n] < 16]
    assert used <= budget
    assert budget - used < min(growable)
    assert rank_map.metadata["allocation"]["total_params"] == used


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_rebuilt_factors_keep_the_adapter_dtype_of_a_bf16_base(autocast_adapter_dtype: bool) -> None:
    # get_peft_model upcasts the adapter of a bf16 base to fp32 by default; PEFT's update_layer would
    # rebuild it in bf16 (measured on an H200: re-ranked adapters trained 27% faster than uniform LoRA
    # because they silently ran in bf16). The re-ranked adapter must keep what PEFT chose.
    from helpers.tiny_models import tiny_llama
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama().to(torch.bfloat16),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    before = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert set(before.values()) == {expected}
    rank_map = initialize_lora_fim_ranks(model, batches("llama"), _quiet())
    assert len(set(rank_map.values())) > 1
    after = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert after == before
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "base_layer" in n)


def test_gpt2_conv1d_fused_c_attn_shapes() -> None:
    model = peft_model("gpt2", r=4)
    initialize_lora_fim_ranks(model, batches("gpt2"), _quiet())
    c_attn = lora_modules(model)["transformer.h.0.attn.c_attn"]
    # Conv1D stores (in, out) transposed; the LoRA pair still maps 32 -> 3*32 (fused q, k, v).
    assert c_attn.lora_A["default"].in_features == 32
    assert c_attn.lora_B["default"].out_features == 96
    out = model(**batches("gpt2", 1)[0])
    assert torch.isfinite(out.loss)


def test_patterns_match_exactly_one_module() -> None:
    model = peft_model("llama", r=4)
    initialize_lora_fim_ranks(model, batches("llama"), _quiet())
    cfg = model.peft_config["default"]
    names = list(lora_modules(model))
    from peft.utils.other import get_pattern_key

    for key in cfg.rank_pattern:
        assert not key.startswith("^base_model")
        matched = [n for n in names if get_pattern_key([key], n) == key]
        assert len(matched) == 1, (key, matched)
    assert set(cfg.rank_pattern) == {pattern_key(n) for n in names}
    for name in names:
        expected_alpha = 8 * cfg.rank_pattern[pattern_key(name)] / 4
        assert cfg.alpha_pattern[pattern_key(name)] == pytest.approx(expected_alpha)


def test_rslora_alpha_keeps_alpha_over_sqrt_r() -> None:
    model = peft_model("llama", r=4, use_rslora=True)
    rank_map = initialize_lora_fim_ranks(model, batches("llama"), _quiet(r_min=1, r_max=16))
    for name, module in lora_modules(model).items():
        assert module.scaling["default"] == pytest.approx(8 / math.sqrt(4)), name
    assert len(set(rank_map.values())) > 1


def test_same_seed_same_map_and_same_A() -> None:
    maps, a_weights = [], []
    for _ in range(2):
        model = peft_model("llama", r=4)
        maps.append(initialize_lora_fim_ranks(model, batches("llama"), _quiet(seed=3)))
        a_weights.append({n: m.lora_A["default"].weight.clone() for n, m in lora_modules(model).items()})
    assert maps[0] == maps[1]
    for n in a_weights[0]:
        torch.testing.assert_close(a_weights[0][n], a_weights[1][n], rtol=0, atol=0)


def test_global_rng_not_consumed() -> None:
    model = peft_model("llama", r=4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    initialize_lora_fim_ranks(model, batches("llama"), _quiet())
    torch.testing.assert_close(torch.rand(3), expected)


def test_two_step_and_context_manager_agree_with_dataloader_path() -> None:
    data = batches("llama")
    m1 = peft_model("llama", r=4)
    stats = estimate_module_scores(m1, data, _quiet())
    m2 = peft_model("llama", r=4)
    with fim_calibration(m2, _quiet()) as cal:
        for batch in data:
            m2(**batch).loss.backward()
    assert cal.scores.num_batches == stats.num_batches == 8
    for name, stat in stats.modules.items():
        other = cal.scores.modules[name]
        assert other.fisher_sum == pytest.approx(stat.fisher_sum, rel=1e-6)
        assert other.variance_sum == pytest.approx(stat.variance_sum, rel=1e-6)
    # Two-step: statistics survive a JSON round trip and give the same map as the one-step call.
    m3 = peft_model("llama", r=4)
    direct = initialize_lora_fim_ranks(m3, data, _quiet())
    m4 = peft_model("llama", r=4)
    reloaded = ModuleStats.from_dict(stats.to_dict())
    assert initialize_lora_fim_ranks(m4, fim_config=_quiet(), scores=reloaded) == direct
    assert (
        initialize_lora_fim_ranks(peft_model("llama", r=4), fim_config=_quiet(), scores=cal.scores) == direct
    )


def test_fisher_matches_manual_squared_gradients() -> None:
    """E[g^2] from the hooks equals the mean of squared B-gradients computed by autograd directly."""
    data = batches("bert", 3)
    model = peft_model("bert", r=4)
    stats = estimate_module_scores(model, data, _quiet(calibration_batches=3))
    model.eval()
    mods = lora_modules(model)
    b_params = {n: m.lora_B["default"].weight for n, m in mods.items()}
    sq = {n: torch.zeros_like(p) for n, p in b_params.items()}
    s = {n: torch.zeros_like(p) for n, p in b_params.items()}
    for batch in data:
        grads = torch.autograd.grad(model(**batch).loss, list(b_params.values()))
        for n, g in zip(b_params, grads, strict=True):
            sq[n] += g * g
            s[n] += g
    for n in b_params:
        fisher = sq[n] / 3
        var = fisher - (s[n] / 3) ** 2
        assert stats.modules[n].fisher_sum == pytest.approx(float(fisher.sum()), rel=1e-5)
        assert stats.modules[n].variance_sum == pytest.approx(
            float(var.clamp_min(0).sum()), rel=1e-4, abs=1e-12
        )
    # And the A-gradient really is zero at init (B = 0), which is why only B is scored.
    a = mods["bert.encoder.layer.0.attention.self.query"].lora_A["default"].weight
    a.requires_grad_(True)
    (ga,) = torch.autograd.grad(model(**data[0]).loss, [a])
    assert torch.count_nonzero(ga) == 0


def test_variance_and_sum_aggregation_change_the_map() -> None:
    data = batches("llama")
    stats = estimate_module_scores(peft_model("llama", r=4), data, _quiet())
    fisher_mean = stats.scores("fisher", "mean")
    fisher_sum = stats.scores("fisher", "sum")
    variance = stats.scores("variance", "mean")
    for n, stat in stats.modules.items():
        assert fisher_sum[n] == pytest.approx(fisher_mean[n] * stat.numel)
        assert 0 <= variance[n] <= fisher_mean[n] * (1 + 1e-9)
    m_var = initialize_lora_fim_ranks(
        peft_model("llama", r=4), fim_config=_quiet(score="variance", r_min=1, r_max=16), scores=stats
    )
    assert isinstance(m_var, RankMap) and m_var.total_rank == 4 * len(stats.modules)


def test_variance_of_a_single_batch_is_exactly_zero() -> None:
    """E[g^2] - E[g]^2 over one batch is 0; fp32 rounding must not turn into a (random) variance map."""
    data = batches("llama")[:1]
    with pytest.warns(UserWarning, match="variance score needs >= 2"):
        stats = estimate_module_scores(
            peft_model("llama", r=4), data, _quiet(score="variance", calibration_batches=1)
        )
    assert all(s.variance_sum == 0.0 for s in stats.modules.values())
    assert any(s.fisher_sum > 0.0 for s in stats.modules.values())


def test_score_power_flattens_the_map_towards_uniform() -> None:
    """score_power = 0 gives uniform ranks; 0.5 lies between uniform and the proportional map."""
    from fimlora.initialize import plan_rank_map

    scores = {f"m{i}": float(i + 1) for i in range(6)}
    shapes = {n: (64, 64) for n in scores}

    def spread(power: float) -> int:
        cfg = _quiet(score_power=power, normalize="none", r_min=1, r_max=32)  # names without layers
        ranks = dict(plan_rank_map(scores, shapes, cfg, r=8))
        assert sum(ranks.values()) == 8 * len(scores)
        return max(ranks.values()) - min(ranks.values())

    assert spread(0.0) == 0
    assert 0 < spread(0.5) < spread(1.0)
    with pytest.raises(ValueError, match="score_power"):
        FimConfig(score_power=-1.0)


def test_normalize_by_kind_removes_the_bias_between_kinds_and_keeps_depth() -> None:
    """Scores 10x larger on every query than on every value: "kind" hands both kinds the same ranks, keeping
    each kind's rise over depth; "layer" removes the depth profile and keeps the kinds' ratio."""
    from fimlora.allocate import normalize_scores
    from fimlora.initialize import plan_rank_map

    scores = {}
    for layer in range(4):
        scores[f"enc.layer.{layer}.attn.query"] = 10.0 * (layer + 1)
        scores[f"enc.layer.{layer}.attn.value"] = 1.0 * (layer + 1)
    by_kind = normalize_scores(scores, "kind")
    assert (
        by_kind["enc.layer.3.attn.query"]
        == pytest.approx(by_kind["enc.layer.3.attn.value"])
        == pytest.approx(1.6)
    )
    by_layer = normalize_scores(scores, "layer")
    assert by_layer["enc.layer.0.attn.query"] == pytest.approx(by_layer["enc.layer.3.attn.query"])
    assert by_layer["enc.layer.0.attn.query"] == pytest.approx(10 * by_layer["enc.layer.0.attn.value"])
    assert normalize_scores({**scores, "x.layer.0.zero": 0.0}, "kind")["x.layer.0.zero"] == 0.0
    shapes = {n: (64, 64) for n in scores}
    plain = dict(plan_rank_map(scores, shapes, _quiet(normalize="none", r_min=1, r_max=32), r=8))
    kind = plan_rank_map(scores, shapes, _quiet(normalize="kind", r_min=1, r_max=32), r=8)
    assert sum(dict(kind).values()) == sum(plain.values())  # same budget
    assert plain["enc.layer.3.attn.query"] > plain["enc.layer.3.attn.value"]
    assert kind["enc.layer.3.attn.query"] == kind["enc.layer.3.attn.value"]
    assert kind["enc.layer.3.attn.value"] > kind["enc.layer.0.attn.value"]
    assert kind.metadata["raw_scores"]["enc.layer.0.attn.query"] == 10.0
    assert dict(plan_rank_map(scores, shapes, _quiet(r_min=1, r_max=32), r=8)) == plain  # the default
    with pytest.raises(ValueError, match="normalize"):
        FimConfig(normalize="depth")  # type: ignore[arg-type]


def test_normalize_warns_where_every_module_is_alone_in_its_group() -> None:
    """Without repeated layers, "kind" makes every score 1: the map is uniform, and the user is told."""
    from fimlora.allocate import normalize_scores
    from fimlora.initialize import plan_rank_map

    scores = {"encoder.query": 1.0, "encoder.value": 9.0}
    with pytest.warns(UserWarning, match="alone in its group.*normalize='none'"):
        assert normalize_scores(scores, "kind") == {"encoder.query": 1.0, "encoder.value": 1.0}
    with pytest.warns(UserWarning, match="alone in its group"):
        flat = plan_rank_map(
            scores, {n: (64, 64) for n in scores}, _quiet(normalize="kind", r_min=1, r_max=32), r=8
        )
    assert set(dict(flat).values()) == {8}
    raw = plan_rank_map(
        scores, {n: (64, 64) for n in scores}, _quiet(normalize="none", r_min=1, r_max=32), r=8
    )
    assert raw["encoder.value"] > raw["encoder.query"]
    two_layers = {"l.0.query": 1.0, "l.1.query": 3.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert normalize_scores(two_layers, "kind") == {"l.0.query": 0.5, "l.1.query": 1.5}
        assert normalize_scores({"only.module": 2.0}, "kind") == {
            "only.module": 1.0
        }  # one module: no warning
