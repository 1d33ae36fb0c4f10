"""``fimlora compare`` (:func:`compare_runs`) and ``fimlora plot`` (:func:`plot_outputs`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fimlora.report.runs import (
    AccuracyComparison,
    RunRecord,
    compare_accuracy,
    load_run,
    method_label,
    read_json_file,
    read_rank_map,
)
from fimlora.report.sections import baseline_method, format_or_na, runs_by_method, write_comparison_report

__all__ = ["compare_runs", "plot_outputs"]


def _run_names(dirs: Sequence[Path]) -> list[str]:
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" for d in dirs]


def compare_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``fimlora compare``: metrics, the paired difference to the baseline, rank maps and curves.

    Args:
        run_dirs: one or more directories with ``metrics.json`` (``fimlora train`` outputs).
        out_dir: where to write ``report.md``, ``report.html``, the figures and ``comparison.json``.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``{"runs": [...], "rank_agreement": [...], "comparisons": [...]}`` (also printed by the CLI).
    """
    from fimlora.errors import UsageError
    from fimlora.io import OutputDir, write_provenance

    if len(run_dirs) < 1:
        raise UsageError("compare needs at least one run directory")
    output = OutputDir(out_dir, overwrite=overwrite) if out_dir is not None else None
    dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, name) for d, name in zip(dirs, _run_names(dirs), strict=True)]
    headers = ["run", "method", "seed", "eval accuracy", "eval loss", "LoRA params", "trainable params",
               "calib s", "train s"]  # fmt: skip
    rows = [_metrics_row(r) for r in runs]
    agreement = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            a, b = runs[i].rank_map, runs[j].rank_map
            if a is not None and b is not None and set(a) == set(b):
                agreement.append({"a": runs[i].name, "b": runs[j].name, **_comparison_dict(a.compare(b))})
    groups = runs_by_method(runs)
    baseline = baseline_method(runs)
    comparisons = [
        c for m, rs in groups.items() if m != baseline for c in [compare_accuracy(rs, groups[baseline])] if c
    ]
    result = {
        "runs": [dict(zip(headers, r, strict=True)) for r in rows],
        "rank_agreement": agreement,
        "comparisons": [_comparison_record(c) for c in comparisons],
    }
    if output is not None:
        with output as staging:
            command = (
                "fimlora compare "
                + " ".join(_quote(str(d)) for d in run_dirs)
                + f" --out {_quote(str(out_dir))}"
            )
            write_comparison_report(
                staging,
                runs,
                title="fimlora compare: " + " vs ".join(method_label(m) for m in groups),
                command=command,
                setup=[("runs", "; ".join(f"{r.name}: {r.dir}" for r in runs)), *_commands(runs)],
                timing_note=(
                    "Wall-clock seconds each run recorded for itself (calibration; the training loop, evaluation "
                    "excluded), on the device listed above. Each `fimlora train` run was timed in its own "
                    "process, maybe at another time or with other load on the machine."
                ),
                timings_comparable=False,
            )  # fmt: skip
            (staging / "comparison.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            write_provenance(staging, {"runs": [str(d) for d in run_dirs]}, extra={"kind": "compare"})
    return result


def _comparison_record(c: AccuracyComparison) -> dict[str, Any]:
    return {
        "method": c.method,
        "baseline": c.baseline,
        "seeds": c.seeds,
        "diffs": c.diffs,
        "mean": c.mean,
        "ci": [c.low, c.high],
        "se": c.se,
        "basis": c.basis,
        "p_value": None if math.isnan(c.p_value) else c.p_value,
        "distinguishable": c.distinguishable,
        "sentence": c.sentence(),
    }


def _commands(runs: Sequence[RunRecord]) -> list[tuple[str, str]]:
    """The command that made each run (one line when they all came from the same command, e.g. a demo)."""
    commands = {r.name: _argv(r.provenance) for r in runs if r.provenance.get("command")}
    if len(set(commands.values())) == 1 and len(commands) == len(runs):
        return [("runs made by", next(iter(commands.values())))]
    return [(f"{name} made by", command) for name, command in commands.items()]


def _argv(prov: Mapping[str, Any]) -> str:
    return " ".join(_quote(str(a)) for a in prov.get("command") or [])


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _comparison_dict(cmp: Any) -> dict[str, Any]:
    if hasattr(cmp, "__dataclass_fields__"):
        import dataclasses

        return {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in dataclasses.asdict(cmp).items()
            if not isinstance(v, (dict, list))
        }
    return {"comparison": str(cmp)}


def _metrics_row(run: RunRecord) -> list[Any]:
    m = run.metrics
    ev = m.get("eval") or {}
    return [
        run.name,
        run.method,
        "–" if run.seed is None else run.seed,
        format_or_na(ev.get("accuracy"), ".4f"),
        format_or_na(ev.get("loss"), ".4f"),
        format_or_na(m.get("lora_params"), ","),
        format_or_na(m.get("trainable_params"), ","),
        format_or_na(m.get("calibration_seconds"), ".1f"),
        format_or_na(m.get("train_seconds"), ".1f"),
    ]


def plot_outputs(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    title: str | None = None,
) -> list[Path]:
    """``fimlora plot``: ``rank_map.png`` from a rank-map JSON or a run directory (+ ``curves.png``).

    Returns:
        The final paths of the figures written.
    """
    from fimlora.errors import UsageError
    from fimlora.io import OutputDir
    from fimlora.plot import plot_training_curves, smooth

    src = Path(source)
    map_path = src / "rank_map.json" if src.is_dir() else src
    if not map_path.is_file():
        raise UsageError(
            f"{source}: no rank map found; pass a rank_map.json or a `fimlora train` output directory"
        )
    rank_map = read_rank_map(map_path)
    history = src / "history.json" if src.is_dir() else None
    output = OutputDir(out_dir, overwrite=overwrite)
    names = ["rank_map.png"]
    with output as staging:
        rank_map.plot_heatmap(staging / "rank_map.png", title=title or f"ranks ({map_path})")
        if history is not None and history.is_file():
            losses = [tuple(p) for p in read_json_file(history).get("losses", [])]
            if losses:
                plot_training_curves(
                    {src.name: smooth(losses)}, staging / "curves.png", title="training loss"
                )  # type: ignore[arg-type]
                names.append("curves.png")
    return [output.path / n for n in names]
