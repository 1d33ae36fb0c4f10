"""Reports: one list of blocks rendered twice, as ``report.md`` and a self-contained ``report.html``.

The HTML embeds every figure as a base64 PNG, so the file can be mailed or attached to an issue alone.
The Markdown links the PNGs next to it. :func:`compare_runs` builds a report from several ``fimlora
train`` output directories.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "compare_runs", "format_mean_std", "markdown_table", "plot_outputs"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right-aligned)."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def format_mean_std(values: Sequence[float], fmt: str = ".4f", scale: float = 1.0) -> str:
    """``"0.8123"`` for one value, ``"0.8123 ± 0.0040"`` (sample std) for several."""
    vals = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


@dataclass
class Report:
    """Blocks of a report: headings, paragraphs, tables, figures, code."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> Report:
        self.blocks.append(("h2", text))
        return self

    def paragraph(self, text: str) -> Report:
        self.blocks.append(("p", text))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Report:
        self.blocks.append(("table", (list(headers), [list(r) for r in rows])))
        return self

    def figure(self, path: str | os.PathLike[str], caption: str) -> Report:
        """A PNG; its path is stored relative to the report directory when written."""
        self.blocks.append(("figure", (Path(path), caption)))
        return self

    def code(self, text: str) -> Report:
        self.blocks.append(("code", text))
        return self

    def to_markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "table":
                out += [markdown_table(*value), ""]
            elif kind == "figure":
                path, caption = value
                out += [f"![{caption}]({_relative(path, base)})", "", f"*{caption}*", ""]
            elif kind == "code":
                out += ["```", value.rstrip("\n"), "```", ""]
        return "\n".join(out)

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{html.escape(value)}</h2>")
            elif kind == "p":
                body.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                headers, rows = value
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
                trs = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
                )
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "figure":
                path, caption = value
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                body.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(value)}</code></pre>")
        style = (
            "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
            "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
            "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}"
            "img{max-width:100%}pre{background:#f6f6f6;padding:.8rem;overflow-x:auto}figcaption{color:#555}"
        )
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{style}</style></head><body>"
            + "\n".join(body)
            + "</body></html>\n"
        )

    def write(self, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``out_dir``; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, page = out / "report.md", out / "report.html"
        md.write_text(self.to_markdown(out), encoding="utf-8")
        page.write_text(self.to_html(), encoding="utf-8")
        return md, page


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _read_json(path: Path) -> dict[str, Any]:
    from fimlora.errors import UsageError

    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"cannot read {path} ({type(e).__name__}); pass directories written by `fimlora train`"
        ) from None
    return data


def _read_rank_map(path: Path) -> Any:
    from fimlora.errors import UsageError
    from fimlora.rankmap import RankMap

    try:
        return RankMap.load_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{' '.join(str(e).split())}; pass a rank_map.json written by fimlora") from None


def compare_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``fimlora compare``: a table of metrics and rank-map agreement over ``fimlora train`` outputs.

    Args:
        run_dirs: two or more directories with ``metrics.json`` and ``rank_map.json``.
        out_dir: where to write ``report.md``, ``report.html``, ``curves.png`` and ``comparison.json``.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``{"runs": [...], "rank_agreement": [...]}`` (also printed by the CLI).
    """
    from fimlora.errors import UsageError
    from fimlora.io import OutputDir, write_provenance

    if len(run_dirs) < 1:
        raise UsageError("compare needs at least one run directory")
    output = OutputDir(out_dir, overwrite=overwrite) if out_dir is not None else None
    runs: list[dict[str, Any]] = []
    for d in map(Path, run_dirs):
        if not (d / "metrics.json").is_file():
            raise UsageError(f"{d} has no metrics.json; pass directories written by `fimlora train`")
        metrics = _read_json(d / "metrics.json")
        rank_map = _read_rank_map(d / "rank_map.json") if (d / "rank_map.json").is_file() else None
        history = _read_json(d / "history.json") if (d / "history.json").is_file() else {"losses": []}
        runs.append(
            {"dir": str(d), "name": d.name, "metrics": metrics, "rank_map": rank_map, "history": history}
        )
    rows = [_metrics_row(r) for r in runs]
    headers = [
        "run",
        "method",
        "eval accuracy",
        "eval loss",
        "LoRA params",
        "trainable params",
        "calib s",
        "train s",
    ]
    agreement = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            a, b = runs[i]["rank_map"], runs[j]["rank_map"]
            if a is not None and b is not None and set(a) == set(b):
                cmp = a.compare(b)
                agreement.append({"a": runs[i]["name"], "b": runs[j]["name"], **_comparison_dict(cmp)})
    result = {"runs": [dict(zip(headers, r, strict=True)) for r in rows], "rank_agreement": agreement}
    if output is not None:
        with output as staging:
            report = Report("fimlora comparison").table(headers, rows)
            if agreement:
                keys = list(agreement[0])
                report.heading("Rank-map agreement").table(keys, [[a[k] for k in keys] for a in agreement])
            curves = {r["name"]: [tuple(p) for p in r["history"].get("losses", [])] for r in runs}
            curves = {k: v for k, v in curves.items() if v}
            if curves:
                from fimlora.plot import plot_training_curves, smooth

                plot_training_curves(
                    {k: smooth(v) for k, v in curves.items()},
                    staging / "curves.png",
                    title="training loss (10-step mean)",
                )
                report.figure(staging / "curves.png", "Training loss")
            report.write(staging)
            (staging / "comparison.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            write_provenance(staging, {"runs": [str(d) for d in run_dirs]}, extra={"kind": "compare"})
    return result


def _comparison_dict(cmp: Any) -> dict[str, Any]:
    if hasattr(cmp, "__dataclass_fields__"):
        import dataclasses

        return {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in dataclasses.asdict(cmp).items()
            if not isinstance(v, (dict, list))
        }
    return {"comparison": str(cmp)}


def _metrics_row(run: Mapping[str, Any]) -> list[Any]:
    m = run["metrics"]
    ev = m.get("eval") or {}

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    return [
        run["name"],
        m.get("method", "?"),
        num(ev.get("accuracy"), ".4f"),
        num(ev.get("loss"), ".4f"),
        num(m.get("lora_params"), ","),
        num(m.get("trainable_params"), ","),
        num(m.get("calibration_seconds"), ".1f"),
        num(m.get("train_seconds"), ".1f"),
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
    rank_map = _read_rank_map(map_path)
    history = src / "history.json" if src.is_dir() else None
    output = OutputDir(out_dir, overwrite=overwrite)
    names = ["rank_map.png"]
    with output as staging:
        rank_map.plot_heatmap(staging / "rank_map.png", title=title or f"ranks ({map_path})")
        if history is not None and history.is_file():
            losses = [tuple(p) for p in _read_json(history).get("losses", [])]
            if losses:
                plot_training_curves(
                    {src.name: smooth(losses)}, staging / "curves.png", title="training loss"
                )  # type: ignore[arg-type]
                names.append("curves.png")
    return [output.path / n for n in names]
