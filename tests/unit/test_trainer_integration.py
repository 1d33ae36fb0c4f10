"""FIM-LoRA inside a real ``transformers.Trainer`` on a tiny random BERT (a few CPU steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.data_files import classification_rows
from helpers.tiny_models import make_tiny_bert
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from fimlora import FimConfig
from fimlora.integrations import FimCalibrationCallback, fim_initialize_for_trainer
from fimlora.peft_glue import current_ranks
from fimlora.tasks import classification_collator, encode_examples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = make_tiny_bert(tmp_path_factory.mktemp("hf") / "bert")
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in classification_rows(32)]
    return {
        "path": path,
        "tokenizer": tokenizer,
        "rows": encode_examples("classification", examples, tokenizer, 16),
    }


def _trainer(tiny: dict[str, Any], out: Path, callbacks: list[Any] | None = None) -> Trainer:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny["path"], num_labels=2)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=tiny["rows"],
        data_collator=classification_collator(tiny["tokenizer"]),
        callbacks=callbacks,
    )


def _check_trained_and_saved(trainer: Trainer, out: Path, tiny: dict[str, Any]) -> None:
    model = trainer.model
    ranks = current_ranks(model)
    assert len(set(ranks.values())) > 1, "FIM allocation should not be uniform on this model"
    # The optimizer holds exactly the model's current trainable tensors (no orphans from before the resize).
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            assert module.lora_B["default"].weight.abs().sum() > 0, f"{name} was not trained"
    model.save_pretrained(out / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny["path"], num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    batch = classification_collator(tiny["tokenizer"])(tiny["rows"][:4])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_callback_calibrates_resizes_and_rebinds_the_optimizer(tiny: dict[str, Any], tmp_path: Path) -> None:
    callback = FimCalibrationCallback(FimConfig(calibration_batches=2, show_progress=False))
    trainer = _trainer(tiny, tmp_path, callbacks=[callback])
    trainer.train()
    assert callback.rank_map is not None and dict(callback.rank_map) == current_ranks(trainer.model)
    _check_trained_and_saved(trainer, tmp_path, tiny)


def test_helper_before_train(tiny: dict[str, Any], tmp_path: Path) -> None:
    trainer = _trainer(tiny, tmp_path)
    trainer.create_optimizer()  # an optimizer created too early must be discarded, not reused
    rank_map = fim_initialize_for_trainer(trainer, FimConfig(calibration_batches=2, show_progress=False))
    assert trainer.optimizer is None
    trainer.train()
    assert dict(rank_map) == current_ranks(trainer.model)
    _check_trained_and_saved(trainer, tmp_path, tiny)
