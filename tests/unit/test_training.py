"""The training loop: data order, schedule, checkpoints, SIGTERM + resume equals an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.data_files import classification_rows
from helpers.processes import SigtermAt
from helpers.tiny_models import make_tiny_bert
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fimlora.checkpoints import latest_checkpoint
from fimlora.errors import UsageError
from fimlora.methods import get_method
from fimlora.tasks import classification_collator, encode_examples
from fimlora.training import (
    BatchPlan,
    TrainConfig,
    TrainingInterrupted,
    linear_schedule,
    train_adapter,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = make_tiny_bert(tmp_path_factory.mktemp("train") / "bert")
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in classification_rows(40)]
    return {
        "path": path,
        "tokenizer": tokenizer,
        "rows": encode_examples("classification", examples, tokenizer, 16),
    }


def test_batch_plan_visits_every_example_once_per_epoch_in_a_seeded_order() -> None:
    plan = BatchPlan(10, 4, seed=3)
    assert plan.steps_per_epoch == 3
    epoch0 = [i for s in range(3) for i in plan.indices(s)]
    epoch1 = [i for s in range(3, 6) for i in plan.indices(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert [BatchPlan(10, 4, seed=3).indices(s) for s in range(6)] == [plan.indices(s) for s in range(6)]
    assert BatchPlan(10, 4, seed=4).indices(0) != plan.indices(0)


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    f = linear_schedule(warmup=2, total=10)
    values = [f(s) for s in range(11)]
    assert values[0] < values[1] < values[2] == 1.0
    assert values[-1] == 0.0 and all(a >= b for a, b in zip(values[2:], values[3:], strict=False))


def test_train_config_errors_name_the_field() -> None:
    with pytest.raises(UsageError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(UsageError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


def test_latest_checkpoint_ignores_incomplete_and_stale_pointers(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "none") is None
    for step in (5, 10):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / "state.pt").write_bytes(b"x")
    (tmp_path / ".tmp-step-00000015-abc").mkdir()  # a write that was killed
    (tmp_path / "latest").write_text("step-00000099")  # stale pointer
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    (tmp_path / "latest").write_text("step-00000005")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"


def _run(tiny: dict[str, Any], method: Any, ckpt: Path | None, resume: bool = False) -> Any:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny["path"], num_labels=2)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value", "dense"], task_type="SEQ_CLS"
    )
    config = TrainConfig(epochs=2, batch_size=4, lr=5e-3, checkpoint_every=3, progress=False)
    return train_adapter(
        base, lora, method, tiny["rows"], classification_collator(tiny["tokenizer"]), config,
        seed=0, device="cpu", checkpoint_dir=ckpt, resume=resume,
    )  # fmt: skip


def _fim() -> Any:
    return get_method("fim", calibration_batches=2, show_progress=False)


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    reference = _run(tiny, _fim(), None)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted, match="--resume"):
        _run(tiny, SigtermAt(_fim(), step=7), ckpt)
    found = latest_checkpoint(ckpt)
    assert found is not None and found.name == "step-00000008"  # the step that was running finished first
    resumed = _run(tiny, _fim(), ckpt, resume=True)
    assert resumed.resumed_from == 8 and resumed.steps == reference.steps == 20
    assert dict(resumed.rank_map) == dict(reference.rank_map)
    ref_state = {n: p for n, p in reference.model.named_parameters() if p.requires_grad}
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref_state[name], rtol=0, atol=1e-6, msg=name)
    assert [v for _, v in resumed.losses] == pytest.approx([v for _, v in reference.losses], abs=1e-6)
    assert not ckpt.exists()  # removed after success (keep_checkpoints=False)


def test_same_seed_same_head_and_data_for_every_method(tiny: dict[str, Any]) -> None:
    uniform = _run(tiny, get_method("uniform"), None)
    fim = _run(tiny, _fim(), None)
    assert uniform.lora_params >= fim.lora_params  # same default budget (ranks), never above uniform here
    assert len(uniform.losses) == len(fim.losses) == 20
    # Step 1's batch and head init are identical; only the adapter ranks differ (B = 0 at step 1 for both).
    assert uniform.losses[0][1] == pytest.approx(fim.losses[0][1], abs=1e-6)
