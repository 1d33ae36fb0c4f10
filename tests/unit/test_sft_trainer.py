"""FIM-LoRA inside TRL's ``SFTTrainer``, unchanged: the callback and the helper (tiny random LLaMA, CPU).

Skipped when TRL is not installed (it is in the ``dev`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.data_files import sft_rows
from helpers.tiny_models import make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fimlora import FimConfig
from fimlora.integrations import FimCalibrationCallback, fim_initialize_for_trainer
from fimlora.peft_glue import current_ranks

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("sft") / "llama")


def _sft_trainer(model_dir: Path, out: Path, callbacks: list[Any] | None = None) -> Any:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    args = trl.SFTConfig(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        max_length=32,
        # SFTConfig defaults to bf16; accelerate then runs the live model's forward under autocast, which
        # would make the fp32 reload comparison below differ by ~1e-3 for reasons unrelated to fimlora.
        bf16=False,
    )
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(sft_rows(24)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=callbacks,
    )


def _check(trainer: Any, model_dir: Path, out: Path) -> None:
    model = trainer.model
    ranks = current_ranks(model)
    assert len(set(ranks.values())) > 1
    assert sum(ranks.values()) == 4 * len(ranks)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    model.save_pretrained(out / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter")
    )
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_sft_trainer_with_callback(tiny_llama_dir: Path, tmp_path: Path) -> None:
    callback = FimCalibrationCallback(FimConfig(calibration_batches=2, show_progress=False))
    trainer = _sft_trainer(tiny_llama_dir, tmp_path, callbacks=[callback])
    trainer.train()
    assert callback.rank_map is not None and dict(callback.rank_map) == current_ranks(trainer.model)
    _check(trainer, tiny_llama_dir, tmp_path)


def test_sft_trainer_with_helper(tiny_llama_dir: Path, tmp_path: Path) -> None:
    trainer = _sft_trainer(tiny_llama_dir, tmp_path)
    rank_map = fim_initialize_for_trainer(trainer, FimConfig(calibration_batches=2, show_progress=False))
    trainer.train()
    assert dict(rank_map) == current_ranks(trainer.model)
    _check(trainer, tiny_llama_dir, tmp_path)
