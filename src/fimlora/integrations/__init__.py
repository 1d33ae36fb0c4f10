"""Integrations with training frameworks (Hugging Face ``Trainer`` and subclasses such as TRL's ``SFTTrainer``)."""

from fimlora.integrations.hf_trainer import FimCalibrationCallback, fim_initialize_for_trainer

__all__ = ["FimCalibrationCallback", "fim_initialize_for_trainer"]
