"""The report document: blocks rendered as Markdown (``report.md``) and one self-contained, responsive HTML
page (``report.html``): a viewport meta tag, real tables that scroll inside their own box, figures embedded
as base64 PNGs at their natural size, each linking to the full-size file next to the report.
"""

from __future__ import annotations

import base64
import html
import math
import os
import statistics
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "format_mean_std", "markdown_table"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right-aligned)."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def format_mean_std(values: Sequence[float], fmt: str = ".4f", scale: float = 1.0) -> str:
    """``"0.8123"`` for one value, ``"0.8123 ± 0.0040"`` (sample std, n - 1) for several."""
    vals = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


# ---- the document ---------------------------------------------------------------------------------------


@dataclass
class Report:
    """Blocks of a report: headings, paragraphs, the conclusion, tables, figures, facts, code."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> Report:
        self.blocks.append(("h2", text))
        return self

    def paragraph(self, text: str) -> Report:
        self.blocks.append(("p", text))
        return self

    def conclusion(self, text: str) -> Report:
        """The plain-language answer, shown first and highlighted (``id="conclusion"`` in the HTML)."""
        self.blocks.append(("conclusion", text))
        return self

    def note(self, text: str) -> Report:
        """A small-print remark (how to read the block above)."""
        self.blocks.append(("note", text))
        return self

    def table(
        self,
        headers: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        caption: str | None = None,
        shade: Sequence[Sequence[float | None]] | None = None,
    ) -> Report:
        """A table; ``shade`` (same shape as ``rows``, values in [0, 1]) tints cells like a heatmap."""
        shading = [list(r) for r in shade] if shade is not None else None
        self.blocks.append(("table", (list(headers), [list(r) for r in rows], caption, shading)))
        return self

    def figure(self, path: str | os.PathLike[str], caption: str) -> Report:
        """A PNG; its path is stored relative to the report directory when written."""
        self.blocks.append(("figures", [(Path(path), caption)]))
        return self

    def gallery(self, figures: Sequence[tuple[str | os.PathLike[str], str]]) -> Report:
        """Several PNGs side by side on wide screens, stacked on narrow ones."""
        self.blocks.append(("figures", [(Path(p), c) for p, c in figures]))
        return self

    def facts(self, items: Sequence[tuple[str, str]]) -> Report:
        """Label: value pairs (a definition list)."""
        self.blocks.append(("facts", [(str(k), str(v)) for k, v in items]))
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
            elif kind == "conclusion":
                out += [f"**{value}**", ""]
            elif kind == "note":
                out += [f"*{value}*", ""]
            elif kind == "table":
                headers, rows, caption, _ = value
                out += [markdown_table(headers, rows), ""]
                if caption:
                    out += [f"*{caption}*", ""]
            elif kind == "figures":
                for path, caption in value:
                    out += [f"![{caption}]({_relative(path, base)})", "", f"*{caption}*", ""]
            elif kind == "facts":
                out += [f"- **{k}**: {v}" for k, v in value] + [""]
            elif kind == "code":
                out += ["```", value.rstrip("\n"), "```", ""]
        return "\n".join(out)

    def to_html(self, base: Path | None = None) -> str:
        """The self-contained page; links to full-size figures are relative to ``base`` (the report's dir)."""
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "h2":
                body.append(f'<h2 id="{_anchor(value)}">{esc(value)}</h2>')
            elif kind == "p":
                body.append(f"<p>{esc(value)}</p>")
            elif kind == "conclusion":
                body.append(f'<p class="conclusion" id="conclusion">{esc(value)}</p>')
            elif kind == "note":
                body.append(f'<p class="note">{esc(value)}</p>')
            elif kind == "table":
                body.append(_html_table(*value))
            elif kind == "figures":
                figures = "".join(_html_figure(path, caption, base) for path, caption in value)
                body.append(f'<div class="gallery">{figures}</div>' if len(value) > 1 else figures)
            elif kind == "facts":
                items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in value)
                body.append(f'<dl class="facts">{items}</dl>')
            elif kind == "code":
                body.append(f"<pre><code>{esc(value.rstrip(chr(10)))}</code></pre>")
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )

    def write(self, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``out_dir``; returns both paths."""
        from fimlora.io import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = atomic_write_text(out / "report.md", self.to_markdown(out))
        page = atomic_write_text(out / "report.html", self.to_html(out))
        return md, page


_STYLE = (
    "*{box-sizing:border-box}"
    "body{font:16px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:62rem;margin:0 auto;"
    "padding:1rem;color:#1b1b1b}"
    "h1{font-size:1.45rem;line-height:1.25;margin:.5rem 0 1rem}h2{font-size:1.2rem;margin-top:2rem;"
    "border-bottom:1px solid #ddd}"
    ".conclusion{border-left:5px solid #2563a8;background:#edf3fa;padding:.75rem 1rem;font-size:1.08rem}"
    ".note,.caption,figcaption{color:#555;font-size:.9rem}"
    ".table-scroll{overflow-x:auto;margin:.75rem 0 .25rem;max-width:100%}"
    "table{border-collapse:collapse;font-variant-numeric:tabular-nums}"
    "td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right;white-space:nowrap}"
    "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
    "figure{margin:1rem 0}img{display:block;max-width:100%;height:auto;border:1px solid #eee}"
    ".gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,24rem),1fr));gap:1rem}"
    "pre{background:#f5f5f5;padding:.75rem;white-space:pre-wrap;overflow-wrap:anywhere}"
    "dl.facts{display:grid;grid-template-columns:minmax(8rem,max-content) minmax(0,1fr);gap:.3rem 1rem}"
    "dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}"
    "@media (max-width:40rem){body{padding:.75rem}dl.facts{grid-template-columns:minmax(0,1fr)}"
    "dd{margin-bottom:.4rem}}"
)


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _html_table(
    headers: list[str], rows: list[list[Any]], caption: str | None, shade: list[list[float | None]] | None
) -> str:
    esc = html.escape
    head = "".join(f'<th scope="col">{esc(str(h))}</th>' for h in headers)
    trs = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            level = shade[i][j] if shade is not None and j < len(shade[i]) else None
            style = "" if level is None else f' style="background:rgba(37,99,168,{0.08 + 0.5 * level:.2f})"'
            cells.append(f"<td{style}>{esc(str(cell))}</td>")
        trs.append("<tr>" + "".join(cells) + "</tr>")
    body = "".join(trs)
    table = (
        f'<div class="table-scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )
    return table + (f'<p class="caption">{esc(caption)}</p>' if caption else "")


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (None if ``data`` is not a PNG)."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _html_figure(path: Path, caption: str, base: Path | None) -> str:
    esc = html.escape
    data = path.read_bytes()
    size = _png_size(data)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    encoded = base64.b64encode(data).decode("ascii")
    href = esc(_relative(path, base)) if base is not None else None
    img = f'<img alt="{esc(caption)}" src="data:image/png;base64,{encoded}"{dims}>'
    link = f' (<a href="{href}">full size</a>)' if href else ""
    if href:
        img = f'<a href="{href}">{img}</a>'
    return f"<figure>{img}<figcaption>{esc(caption)}{link}</figcaption></figure>"


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)
