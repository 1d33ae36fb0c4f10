"""Recipes: what ``fimlora train``, ``allocate`` and ``eval`` run, built from the library's parts.

Each recipe validates everything and checks its output directory *before* loading a model, runs, then
writes its outputs into a staging directory that becomes the destination only on success
(:class:`fimlora.io.OutputDir`), with ``config.json``/``run.json`` provenance beside them.

* :func:`prepare_run`: a :class:`~fimlora.run_config.RunConfig` -> data, model, tokenizer, encoded rows.
* :func:`finetune`: prepare, train with the run's method (:func:`fimlora.training.train_adapter`), save.
* :func:`allocate_run`: calibrate on the first T training batches and compute the FIM rank map only.
* :func:`evaluate_adapter`: load a base model plus a saved adapter and evaluate it on a data file.

The package: :mod:`~fimlora.recipes.prepare` (options checked, data and model loaded),
:mod:`~fimlora.recipes.checks` (the option checks), :mod:`~fimlora.recipes.train` (train, save, allocate),
:mod:`~fimlora.recipes.evaluate` (evaluate a saved adapter).
"""

from __future__ import annotations

from fimlora.recipes.evaluate import EvalConfig, evaluate_adapter
from fimlora.recipes.prepare import PreparedRun, build_lora_config, fim_config_of, make_method, prepare_run
from fimlora.recipes.train import allocate_run, finetune, save_training_outputs, train_prepared

__all__ = [
    "EvalConfig",
    "PreparedRun",
    "allocate_run",
    "build_lora_config",
    "evaluate_adapter",
    "finetune",
    "fim_config_of",
    "make_method",
    "prepare_run",
    "save_training_outputs",
    "train_prepared",
]
