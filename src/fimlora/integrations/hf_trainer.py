"""FIM-LoRA inside a Hugging Face ``Trainer``: calibrate on the Trainer's own first T training batches.

Two entry points, one mechanism (:func:`fimlora.initialize_lora_fim_ranks`):

* :class:`FimCalibrationCallback` -- add it to ``callbacks=[...]`` and call ``trainer.train()`` as usual.
  ``Trainer`` creates its optimizer *before* callbacks' ``on_train_begin`` fires, so resizing the LoRA
  layers there would leave the optimizer holding the old, orphaned tensors. The callback therefore
  rebinds every optimizer parameter group to the new tensors of the same names (the optimizer has taken
  no step yet, so it has no state to carry). Weight-decay grouping, learning rates and the scheduler are
  untouched. Single process only: under DDP/FSDP/DeepSpeed the model is already wrapped at that point.
* :func:`fim_initialize_for_trainer` -- call it between building the trainer and ``trainer.train()``.
  It calibrates on ``trainer.get_train_dataloader()`` and drops any optimizer/scheduler already created,
  so ``train()`` builds them over the resized model. Works with distributed launches (the statistics are
  all-reduced; the model is wrapped later, inside ``train()``).

Both work unchanged with TRL's ``SFTTrainer`` (a ``Trainer`` subclass): its dataloader yields dicts with
``input_ids``/``attention_mask``/``labels`` (prompt tokens masked with -100 for completion-only loss), and
the calibration loss is the model's own ``.loss`` on them. Collator-only keys that the model does not
take (``completion_mask``, ``assistant_masks``) are dropped; pass ``loss_fn`` for anything more unusual.
Adapters save with ``trainer.save_model()``/``model.save_pretrained()`` as usual (rank and alpha patterns
included).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from fimlora.calibration import LossFn
from fimlora.config import FimConfig
from fimlora.initialize import initialize_lora_fim_ranks
from fimlora.rankmap import RankMap

__all__ = ["FimCalibrationCallback", "fim_initialize_for_trainer"]

_COLLATOR_ONLY_KEYS = ("completion_mask", "assistant_masks", "num_items_in_batch")


def _model_batch(batch: Any) -> Any:
    """Drop collator-only keys the model's forward would reject."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in _COLLATOR_ONLY_KEYS}
    return batch


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**_model_batch(batch))
    loss = out["loss"] if isinstance(out, Mapping) else out.loss
    if loss is None:
        raise ValueError(
            "the model returned no loss on a training batch: the batches need `labels` (or pass loss_fn)"
        )
    return loss  # type: ignore[no-any-return]


def _calibrate(
    model: nn.Module, dataloader: Any, fim_config: FimConfig, adapter_name: str, loss_fn: LossFn | None
) -> RankMap:
    batches = itertools.islice(iter(dataloader), fim_config.calibration_batches)
    return initialize_lora_fim_ranks(
        model, batches, fim_config, adapter_name=adapter_name, loss_fn=loss_fn or _default_loss
    )


def fim_initialize_for_trainer(
    trainer: Any,
    fim_config: FimConfig | None = None,
    *,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
) -> RankMap:
    """Allocate FIM-LoRA ranks on ``trainer.model`` from the trainer's first T training batches.

    Call after building the trainer and before ``trainer.train()``::

        trainer = Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=collator)
        rank_map = fim_initialize_for_trainer(trainer, FimConfig(calibration_batches=8))
        trainer.train()

    Args:
        trainer: a ``transformers.Trainer`` (or subclass, e.g. ``trl.SFTTrainer``) whose model is a PEFT
            LoRA model.
        fim_config: calibration, budget and bounds.
        adapter_name: which adapter to resize.
        loss_fn: ``loss_fn(model, batch) -> loss``; default: the model's ``.loss`` on the batch.

    Returns:
        The :class:`RankMap` applied; the trainer's optimizer and scheduler are reset so that
        ``train()`` creates them over the resized parameters.
    """
    rank_map = _calibrate(
        trainer.model, trainer.get_train_dataloader(), fim_config or FimConfig(), adapter_name, loss_fn
    )
    trainer.optimizer = None
    trainer.lr_scheduler = None
    return rank_map


class FimCalibrationCallback(TrainerCallback):  # type: ignore[misc]
    """Run FIM-LoRA calibration and allocation when ``Trainer.train()`` starts.

    Example::

        trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                          callbacks=[FimCalibrationCallback(FimConfig(calibration_batches=8))])
        trainer.train()                      # calibrates, resizes, then trains
        trainer.save_model("out")            # a standard PEFT adapter with rank/alpha patterns

    After training starts, ``callback.rank_map`` holds the ranks applied. When training resumes from a
    Trainer checkpoint (``global_step > 0``), nothing is recalibrated: rebuild the model with
    ``fimlora.apply_rank_map(model, RankMap.load_json(...))`` before loading such a checkpoint.
    """

    def __init__(
        self,
        fim_config: FimConfig | None = None,
        *,
        adapter_name: str = "default",
        loss_fn: LossFn | None = None,
    ) -> None:
        self.fim_config = fim_config or FimConfig()
        self.adapter_name = adapter_name
        self.loss_fn = loss_fn
        self.rank_map: RankMap | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rank_map is not None or state.global_step > 0:
            return
        model, optimizer, dataloader = (
            kwargs.get("model"),
            kwargs.get("optimizer"),
            kwargs.get("train_dataloader"),
        )
        if model is None or optimizer is None or dataloader is None:
            raise RuntimeError(
                "FimCalibrationCallback needs the Trainer's model, optimizer and train dataloader"
            )
        if getattr(args, "world_size", 1) > 1 or getattr(args, "deepspeed", None):
            raise RuntimeError(
                "FimCalibrationCallback works in a single process; under DDP/FSDP/DeepSpeed call "
                "fimlora.integrations.fim_initialize_for_trainer(trainer, fim_config) before trainer.train()"
            )
        if len(optimizer.state) > 0:
            raise RuntimeError(
                "the optimizer has already taken steps; FIM calibration must run before training"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        self.rank_map = _calibrate(model, dataloader, self.fim_config, self.adapter_name, self.loss_fn)
        _rebind_optimizer(optimizer, names, dict(model.named_parameters()))


def _rebind_optimizer(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str], params: Mapping[str, nn.Parameter]
) -> None:
    """Point every parameter group at the model's current tensor of the same name (state must be empty)."""
    for group in optimizer.param_groups:
        rebound = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or name not in params:
                raise RuntimeError(
                    f"optimizer parameter {name or '?'} is no longer in the model after resizing"
                )
            rebound.append(params[name])
        group["params"] = rebound
