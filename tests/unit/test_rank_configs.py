"""A rank map as the configs trainers read: ``lora_config_with_ranks``, PEFT JSON, axolotl YAML.

A fresh model built from the config must have exactly the map's ranks and every module the config's
scale; names that PEFT would silently ignore are errors; ``fimlora allocate`` writes both files, and the
JSON builds the same adapter after a round trip. The axolotl keys are the ones axolotl's schema reads
(``src/axolotl/utils/schemas/peft.py``, ``LoraConfig``: ``lora_rank_pattern``/``lora_alpha_pattern`` are
``dict[str, PositiveInt]``, forwarded to PEFT by ``src/axolotl/loaders/adapter.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers.data_files import classification_rows, write_csv
from helpers.tiny_models import make_tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model

from fimlora import RankMap, lora_config_with_ranks
from fimlora.cli import main
from fimlora.peft_glue import axolotl_lora_config, current_ranks, lora_config_dict, lora_modules, pattern_key

# Keys of axolotl's LoRA schema this project writes (a subset of what axolotl reads).
AXOLOTL_KEYS = {
    "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
    "peft_use_rslora", "peft_use_dora", "lora_fan_in_fan_out", "peft_layers_to_transform",
    "lora_modules_to_save", "lora_rank_pattern", "lora_alpha_pattern",
}  # fmt: skip


def _base() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _rank_map() -> dict[str, int]:
    names = lora_modules(get_peft_model(tiny_llama(0), _base()))
    return {n: 1 + i % 6 for i, n in enumerate(names)}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_fresh_model_gets_the_ranks_and_keeps_every_scale(use_rslora: bool) -> None:
    base = _base()
    base.use_rslora = use_rslora
    ranks = _rank_map()
    config = lora_config_with_ranks(base, ranks)
    assert base.rank_pattern == {} and base.alpha_pattern == {}  # the base config is not modified
    assert config.rank_pattern == {pattern_key(n): r for n, r in ranks.items()}
    model = get_peft_model(tiny_llama(0), config)
    assert current_ranks(model) == ranks
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    for module in lora_modules(model).values():
        assert module.scaling["default"] == pytest.approx(scale)


def test_without_scale_adjustment_alpha_pattern_is_empty() -> None:
    config = lora_config_with_ranks(_base(), _rank_map(), adjust_scaling_factors=False)
    assert config.alpha_pattern == {} and len(config.rank_pattern) == len(_rank_map())


def test_names_are_checked_against_the_model() -> None:
    ranks = _rank_map()
    peft = get_peft_model(tiny_llama(0), _base())
    lora_config_with_ranks(_base(), ranks, model=peft)
    lora_config_with_ranks(_base(), ranks, model=tiny_llama(0))  # the plain model to be wrapped
    missing = dict(list(ranks.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        lora_config_with_ranks(_base(), missing, model=peft)
    typo = {**ranks, "model.layers.0.self_attn.qproj": 2}
    with pytest.raises(ValueError, match="unknown"):
        lora_config_with_ranks(_base(), typo, model=peft)
    with pytest.raises(ValueError, match="silently"):
        lora_config_with_ranks(_base(), typo, model=tiny_llama(0))
    with pytest.raises(ValueError, match="integer >= 0"):
        lora_config_with_ranks(_base(), {**ranks, next(iter(ranks)): -1})
    with pytest.raises(TypeError, match="LoraConfig"):
        lora_config_with_ranks({"r": 4}, ranks)


def test_prefixed_names_and_rank_maps_are_accepted() -> None:
    ranks = _rank_map()
    prefixed = {f"base_model.model.{n}": r for n, r in ranks.items()}
    assert (
        lora_config_with_ranks(_base(), RankMap(prefixed)).rank_pattern
        == lora_config_with_ranks(_base(), ranks).rank_pattern
    )


def test_json_round_trip_builds_the_same_adapter(tmp_path: Path) -> None:
    ranks = _rank_map()
    path = tmp_path / "lora_config.json"
    path.write_text(json.dumps(lora_config_dict(lora_config_with_ranks(_base(), ranks))))
    loaded = LoraConfig(**LoraConfig.from_json_file(str(path)))
    assert current_ranks(get_peft_model(tiny_llama(0), loaded)) == ranks


def test_axolotl_keys() -> None:
    ranks = _rank_map()
    axolotl = axolotl_lora_config(lora_config_with_ranks(_base(), ranks))
    assert set(axolotl) <= AXOLOTL_KEYS
    assert axolotl["lora_r"] == 4 and axolotl["lora_alpha"] == 8
    assert axolotl["lora_target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert axolotl["lora_rank_pattern"] == {pattern_key(n): r for n, r in ranks.items()}
    assert axolotl["lora_alpha_pattern"] == {pattern_key(n): 2 * r for n, r in ranks.items()}
    assert all(type(v) is int for v in axolotl["lora_alpha_pattern"].values())
    everything = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=False)
    assert axolotl_lora_config(everything)["lora_target_linear"] is True
    # rsLoRA's alpha*sqrt(r_i/r) is not a whole number: axolotl's integer alphas cannot carry it.
    rs = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    with pytest.raises(ValueError, match="whole number"):
        axolotl_lora_config(lora_config_with_ranks(rs, {"model.layers.0.self_attn.q_proj": 3}))


def test_allocate_writes_peft_and_axolotl_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = make_tiny_bert(tmp_path / "bert")
    data = write_csv(tmp_path / "train.csv", classification_rows(32))
    out = tmp_path / "alloc"
    code = main(["allocate", "--model", str(model_dir), "--data", str(data), "--r", "4", "--lora-alpha", "8",
                 "--calibration-batches", "2", "--out", str(out), "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0 and "lora_config.json" in capsys.readouterr().out
    rank_map = RankMap.load_json(out / "rank_map.json")
    config = LoraConfig(**LoraConfig.from_json_file(str(out / "lora_config.json")))
    assert config.rank_pattern == {pattern_key(n): r for n, r in rank_map.items()}
    from transformers import AutoModelForSequenceClassification

    fresh = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2), config
    )
    assert current_ranks(fresh) == dict(rank_map)
    axolotl = yaml.safe_load((out / "axolotl_lora.yaml").read_text())
    assert set(axolotl) <= AXOLOTL_KEYS
    assert axolotl["lora_rank_pattern"] == config.rank_pattern
    assert axolotl["lora_alpha_pattern"] == config.alpha_pattern
    assert axolotl["lora_r"] == 4 and axolotl["lora_alpha"] == 8
