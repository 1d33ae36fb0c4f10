"""The controls for FIM-LoRA's scores: ``random`` (Exp(1) scores through FIM-LoRA's planner, no
calibration) and ``fim-shuffled`` (fim's ranks permuted among modules of the same shape).

Both must spend exactly fim's budget within fim's bounds, be deterministic per seed, end as plain PEFT LoRA
and be reachable from ``fimlora methods`` / ``fimlora train --method``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import test_methods_reload as reload_test
import torch
from helpers.data_files import classification_rows, write_csv
from helpers.tiny_models import ARCHS, batches, make_tiny_bert, peft_model
from peft import LoraConfig

from fimlora.cli import main
from fimlora.config import FimConfig
from fimlora.errors import UsageError
from fimlora.methods import get_method
from fimlora.methods.fim_shuffled import shuffle_within_shapes
from fimlora.peft_glue import current_ranks, lora_layout, lora_modules, module_shapes, scaled_alpha
from fimlora.rankmap import RankMap
from fimlora.recipes import make_method
from fimlora.run_config import RunConfig

R, ALPHA = 4, 8
R_MIN, R_MAX = 2, 16  # FimConfig's defaults for r = 4: [r // 2, 4 r]
FIM = {"calibration_batches": 2, "show_progress": False}


def _shapes(arch: str) -> dict[str, tuple[int, int]]:
    return module_shapes(lora_modules(peft_model(arch, r=R, lora_alpha=ALPHA)))


def _prepare(name: str, arch: str, **options: object) -> tuple[torch.nn.Module, RankMap]:
    """Wrap the arch's tiny model with method ``name``; fim's calibration batches are the same for all."""
    build, kwargs = ARCHS[arch]
    method = get_method(name, **options)
    model = method.prepare(
        build(0),
        LoraConfig(r=R, lora_alpha=ALPHA, **kwargs),
        calibration_batches=iter(batches(arch, 2)),
    )
    rank_map = method.finalize(model)[1]
    assert current_ranks(model) == dict(rank_map)  # the layers have the ranks the map records
    alphas = lora_layout(model)["alphas"]
    assert alphas == {n: scaled_alpha(ALPHA, R, k, use_rslora=False) for n, k in rank_map.items()}
    return model, rank_map


def _assert_budget(
    ranks: Mapping[str, int],
    shapes: Mapping[str, tuple[int, int]],
    unit: str,
    *,
    total: int | None = None,
    r_min: int = R_MIN,
    r_max: int = R_MAX,
) -> None:
    """fim's contract: bounds per module; rank sum exact, or parameters <= P with slack below one rank of
    the cheapest module that can still grow. ``total`` defaults to uniform LoRA at rank R."""
    costs = {n: i + o for n, (i, o) in shapes.items()}
    hi = {n: min(r_max, *shapes[n]) for n in shapes}
    assert set(ranks) == set(shapes)
    assert all(r_min <= ranks[n] <= hi[n] for n in shapes), dict(ranks)
    if unit == "ranks":
        assert sum(ranks.values()) == (total if total is not None else R * len(shapes))
    else:
        budget = total if total is not None else R * sum(costs.values())
        slack = budget - sum(ranks[n] * costs[n] for n in shapes)
        assert 0 <= slack < min(costs[n] for n in shapes if ranks[n] < hi[n])


# ---- random -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["ranks", "params"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_random_holds_fims_budget_and_bounds(arch: str, unit: str) -> None:
    shapes = _shapes(arch)
    for seed in range(3):
        _, rank_map = _prepare("random", arch, draw_seed=seed, budget_unit=unit)
        _assert_budget(rank_map, shapes, unit)
        assert rank_map.metadata["control"] == "random" and rank_map.metadata["seed"] == seed


def test_random_holds_explicit_budgets_and_bounds() -> None:
    shapes = _shapes("llama")
    params = 3 * sum(i + o for i, o in shapes.values()) + 17  # not a multiple of any cost: slack is left
    for unit, budget in (
        ("ranks", {"budget_ranks": 3 * len(shapes) + 5}),
        ("params", {"budget_params": params}),
    ):
        total = next(iter(budget.values()))
        _, rank_map = _prepare("random", "llama", draw_seed=1, r_min=1, r_max=8, **budget)
        _assert_budget(rank_map, shapes, unit, total=total, r_min=1, r_max=8)


def test_random_is_deterministic_per_seed_varies_across_seeds_and_spreads() -> None:
    maps = [dict(_prepare("random", "llama", draw_seed=s)[1]) for s in range(5)]
    assert dict(_prepare("random", "llama", draw_seed=0)[1]) == maps[0]
    # FimConfig's normalize ("kind", "layer") would not touch i.i.d. draws: not an option, refused; "none" is
    # what the planner gets
    with pytest.raises(ValueError, match="no option 'normalize'"):
        get_method("random", normalize="kind")
    assert _prepare("random", "llama", draw_seed=0)[1].metadata["config"]["normalize"] == "none"
    assert len({tuple(m.values()) for m in maps}) == len(maps)
    # Not clustered at uniform: every map varies, and together they reach r_min and well above r.
    assert all(len(set(m.values())) > 2 for m in maps)
    ranks = [k for m in maps for k in m.values()]
    assert min(ranks) == R_MIN and max(ranks) >= 2 * R


def test_random_runs_no_calibration() -> None:
    def refuse() -> Iterator[dict]:
        raise AssertionError("the random control must not read calibration batches")
        yield {}

    build, kwargs = ARCHS["llama"]
    for calibration in (None, refuse()):
        method = get_method("random", draw_seed=2)
        model = method.prepare(
            build(0), LoraConfig(r=R, lora_alpha=ALPHA, **kwargs), calibration_batches=calibration
        )
        assert all(p.grad is None for p in model.parameters())
        assert dict(method.finalize(model)[1]) == dict(_prepare("random", "llama", draw_seed=2)[1])


# ---- fim-shuffled ---------------------------------------------------------------------------------------


def _by_shape(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> dict[tuple, Counter]:
    out: dict[tuple, Counter] = {}
    for n, k in ranks.items():
        out.setdefault(tuple(shapes[n]), Counter())[k] += 1
    return out


@pytest.mark.parametrize("unit", ["ranks", "params"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fim_shuffled_permutes_fims_ranks_within_shapes(arch: str, unit: str) -> None:
    shapes = _shapes(arch)
    _, fim_map = _prepare("fim", arch, budget_unit=unit, **FIM)
    _, shuffled = _prepare("fim-shuffled", arch, draw_seed=1, budget_unit=unit, **FIM)
    assert shuffled.metadata["fim_ranks"] == dict(fim_map)  # calibrated and allocated exactly as fim
    assert _by_shape(shuffled, shapes) == _by_shape(fim_map, shapes)
    _assert_budget(shuffled, shapes, unit)
    costs = {n: i + o for n, (i, o) in shapes.items()}
    assert sum(shuffled.values()) == sum(fim_map.values())
    assert sum(k * costs[n] for n, k in shuffled.items()) == sum(k * costs[n] for n, k in fim_map.items())


def test_fim_shuffled_is_deterministic_and_changes_the_assignment() -> None:
    shapes = _shapes("llama")
    _, fim_map = _prepare("fim", "llama", **FIM)
    groups = _by_shape(fim_map, shapes)
    assert any(len(c) > 1 for c in groups.values()), "fim's map must vary within a shape for this test"
    maps = [dict(_prepare("fim-shuffled", "llama", draw_seed=s, **FIM)[1]) for s in range(4)]
    assert dict(_prepare("fim-shuffled", "llama", draw_seed=0, **FIM)[1]) == maps[0]
    assert any(m != dict(fim_map) for m in maps)
    assert len({tuple(m.values()) for m in maps}) > 1


def test_shuffle_within_shapes_only_permutes_equal_shapes() -> None:
    shapes = {"a": (8, 8), "b": (8, 16), "c": (8, 8), "d": (8, 16), "e": (4, 4)}
    ranks = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    seen = set()
    for seed in range(20):
        out = shuffle_within_shapes(ranks, shapes, seed)
        assert list(out) == list(ranks) and out["e"] == 5
        assert {out["a"], out["c"]} == {1, 3} and {out["b"], out["d"]} == {2, 4}
        assert out == shuffle_within_shapes(ranks, shapes, seed)
        seen.add(tuple(out.values()))
    assert len(seen) == 4  # every permutation of both pairs occurs


def test_fim_shuffled_needs_calibration_batches() -> None:
    build, kwargs = ARCHS["llama"]
    with pytest.raises(ValueError, match="calibration batches"):
        get_method("fim-shuffled").prepare(build(0), LoraConfig(r=R, **kwargs))


def test_fim_shuffled_shuffles_the_map_its_fim_config_makes() -> None:
    # FimConfig fields reach the source, so a variant's own control shuffles the variant's map.
    shapes = _shapes("llama")
    _, plain = _prepare("fim", "llama", **FIM)
    _, tempered = _prepare("fim", "llama", score_power=0.25, **FIM)
    assert dict(tempered) != dict(plain), "the tempered map must differ for this test"
    _, shuffled = _prepare("fim-shuffled", "llama", draw_seed=1, score_power=0.25, **FIM)
    assert shuffled.metadata["fim_ranks"] == dict(tempered) and shuffled.metadata["source"] == "fim"
    assert _by_shape(shuffled, shapes) == _by_shape(tempered, shapes)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fim_shuffled_shuffles_the_spectrum_map(arch: str) -> None:
    shapes = _shapes(arch)
    # the control hands its own budget, bounds and calibration to the source; the rest is source_options
    _, spectrum = _prepare("fim-spectrum", arch, calibration_batches=2, budget_unit="ranks", normalize=False)
    _, shuffled = _prepare(
        "fim-shuffled",
        arch,
        draw_seed=1,
        calibration_batches=2,
        source="fim-spectrum",
        source_options={"normalize": False},
    )
    assert shuffled.metadata["source"] == "fim-spectrum"
    assert shuffled.metadata["fim_ranks"] == dict(spectrum)
    assert _by_shape(shuffled, shapes) == _by_shape(spectrum, shapes)
    assert sum(shuffled.values()) == sum(spectrum.values())


def test_fim_shuffled_source_is_checked_before_any_model() -> None:
    with pytest.raises(ValueError, match="`source` must be one of fim, fim-spectrum, got 'gora'"):
        get_method("fim-shuffled", source="gora")
    with pytest.raises(ValueError, match="`gradient_init` cannot be shuffled"):
        get_method("fim-shuffled", source_options={"gradient_init": True})
    with pytest.raises(ValueError, match="not taken by source 'fim'"):
        get_method("fim-shuffled", source_options={"normalize": False})
    with pytest.raises(ValueError, match=r"unknown `source_options` \['not_an_option'\].*valid: .*normalize"):
        get_method("fim-shuffled", source="fim-spectrum", source_options={"not_an_option": 1})
    with pytest.raises(ValueError, match="`normalize`"):
        get_method("fim-shuffled", source="fim-spectrum", source_options={"normalize": "no"})
    with pytest.raises(ValueError, match="set budget_ranks on fim-shuffled itself"):
        get_method("fim-shuffled", source="fim-spectrum", source_options={"budget_ranks": 9})
    options = {"source": "fim-spectrum", "source_options": {"normalize": False}}
    method = make_method(RunConfig(method="fim-shuffled", seed=3, method_options=options))
    assert method.options.source == "fim-spectrum" and method.options.draw_seed == 3
    with pytest.raises(UsageError, match="invalid options for method 'fim-shuffled'.*source"):
        make_method(RunConfig(method="fim-shuffled", method_options={"source": "eva"}))


# ---- both: options, the run's config and seed, plain PEFT ------------------------------------------------


@pytest.mark.parametrize("name", ["random", "fim-shuffled"])
def test_options_are_checked_and_given_one_way(name: str) -> None:
    with pytest.raises(ValueError, match="`draw_seed`"):
        get_method(name, draw_seed=-1)
    with pytest.raises(ValueError, match="no option 'not_an_option'"):
        get_method(name, not_an_option=1)
    method = get_method(name, r_min=1, r_max=6, seed=5)
    assert (method.options.r_min, method.options.r_max, method.options.seed) == (1, 6, 5)
    options = method.options_class(r_min=1, r_max=6, seed=5)
    assert get_method(name, options).options == options
    with pytest.raises(ValueError, match="not both"):
        get_method(name, options, r_max=6)


@pytest.mark.parametrize("name", ["random", "fim-shuffled"])
def test_make_method_passes_the_runs_fim_options_and_seed(name: str) -> None:
    run = RunConfig(method=name, seed=3, fim=FimConfig(r_min=1, budget_unit="params"))
    method = make_method(run)
    assert (method.options.r_min, method.options.budget_unit, method.options.draw_seed) == (1, "params", 3)
    run = RunConfig(method=name, seed=3, method_options={"draw_seed": 7, "r_max": 6})
    method = make_method(run)
    assert method.options.draw_seed == 7 and method.options.r_max == 6
    with pytest.raises(UsageError, match="draw_seed"):
        make_method(RunConfig(method=name, method_options={"draw_seed": "x"}))
    # fim gets the run's fim section; uniform has no draw and takes no seed.
    assert make_method(RunConfig(method="fim", fim=FimConfig(r_min=1))).options.r_min == 1
    assert make_method(RunConfig(method="uniform", seed=3)).name == "uniform"


def test_controls_reload_with_plain_peft_in_a_fresh_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # test_methods_reload's own check, run on the two controls only (one fresh process for both).
    options = {"random": {"draw_seed": 1}, "fim-shuffled": {"draw_seed": 1, **FIM}}
    monkeypatch.setattr(reload_test, "OPTIONS", options)
    reload_test.test_every_method_reloads_with_plain_peft_in_a_fresh_process(tmp_path)


def test_cli_lists_and_trains_the_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "random" in listing and "Control: random ranks" in listing
    assert "fim-shuffled" in listing and "Control: FIM-LoRA's ranks permuted" in listing
    model = make_tiny_bert(tmp_path / "bert")
    data = write_csv(tmp_path / "train.csv", classification_rows(32))
    for name in ("random", "fim-shuffled"):
        out = tmp_path / name
        args = ["train", "--method", name, "--model", model, "--data", data, "--out", out, "--seed", "2"]
        args += ["--r", "4", "--batch-size", "8", "--max-steps", "2"]
        args += ["--calibration-batches", "2"] if name == "fim-shuffled" else []  # random does not calibrate
        assert main([*map(str, args), "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
        meta = json.loads((out / "rank_map.json").read_text())["metadata"]
        assert meta["method"] == name and meta["control"] == name and meta["seed"] == 2
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
