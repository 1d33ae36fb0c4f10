"""Figures for rank maps and training runs (optional: needs ``pip install 'fimlora[plot]'``).

matplotlib is imported inside each function, so ``import fimlora`` never pays for it or needs it.
Figures are built with :class:`matplotlib.figure.Figure` directly rather than ``pyplot``: that
touches no global state (no backend switch in the caller's notebook, no figure registry to leak
into), and a figure not registered with pyplot is freed when it goes out of scope.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fimlora.module_names import split_module_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "TabularRanks",
    "new_figure",
    "plot_rank_bars",
    "plot_rank_heatmap",
    "plot_training_curves",
    "rank_heatmap_figure",
    "save_figure",
    "smooth",
]


class TabularRanks(Protocol):
    """What the heatmap needs of a rank map (:class:`fimlora.RankMap` is one): its size, its rank sum and its
    layer x kind table (``.layers``, ``.kinds``, ``.cells``)."""

    def __len__(self) -> int: ...

    @property
    def total_rank(self) -> int: ...

    def table(self) -> Any: ...


_DPI = 120


def new_figure(width: float, height: float) -> Figure:
    """Create a standalone matplotlib Figure, or explain how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "fimlora's plots need matplotlib, which is not installed: pip install 'fimlora[plot]'"
        ) from err
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write ``fig`` as PNG to ``path`` (creating the parent directory) and return the path."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI, format="png")
    return out


def _cell_font(n_rows: int) -> int:
    """Cell text size: legible up to ~40 layers, shrinking as rows get denser."""
    return 8 if n_rows <= 16 else 6 if n_rows <= 32 else 5


def _grid_heatmap(
    fig: Figure,
    ax: Axes,
    grid: list[list[float]],
    *,
    row_labels: list[str],
    col_labels: list[str],
    fmt: str,
    cmap_name: str,
    colorbar_label: str,
    integer_ticks: bool,
) -> None:
    """Draw one annotated heatmap; nan cells are grey and unlabelled."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    data = np.ma.masked_invalid(np.array(grid, dtype=np.float64))
    # Absent modules (nan) are masked and drawn in light grey, distinct from any rank's colour.
    cmap = colormaps[cmap_name].with_extremes(bad="0.88")
    image = ax.imshow(data, cmap=cmap, aspect="auto", interpolation="nearest")
    n_rows, n_cols = data.shape
    ax.set_xticks(range(n_cols), labels=col_labels, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_rows), labels=row_labels)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    font = _cell_font(n_rows)
    ax.tick_params(axis="y", labelsize=font + 1)
    ax.tick_params(axis="x", labelsize=8)
    # Scale each value the way imshow did, to pick the cell colour for the text contrast.
    scaled = np.ma.filled(np.asarray(image.norm(data), dtype=np.float64), np.nan)
    for i in range(n_rows):
        for j in range(n_cols):
            value = grid[i][j]
            if math.isnan(value):
                continue
            # Dark text on light cells, white on dark ones.
            r, g, b, _ = cmap(float(scaled[i, j]))
            colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=font, color=colour)
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label(colorbar_label)
    if integer_ticks:
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()


def plot_rank_heatmap(
    rank_map: TabularRanks,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    scores: Mapping[str, float] | None = None,
) -> pathlib.Path:
    """Save a heatmap of ranks: layers (rows) x module kinds (columns), each cell annotated.

    Layout comes from :meth:`RankMap.table`; cells with no module are grey. A module allocated rank
    0 (dropped: it carries no LoRA layer) is drawn hatched and labelled 0, outside the colour scale,
    so it reads neither as "no such module" nor as a small rank. With ``scores``, a second panel
    shows each module's score in the same layout, so rank and evidence sit side by side (modules
    missing from ``scores`` are grey there).

    Args:
        rank_map: The ranks to draw.
        path: Output PNG path; the parent directory is created.
        title: Figure title.
        scores: Optional module name -> score (e.g. the Fisher score the ranks came from).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``rank_map`` is empty.
    """
    return save_figure(rank_heatmap_figure(rank_map, title=title, scores=scores), path)


def rank_heatmap_figure(
    rank_map: TabularRanks,
    *,
    title: str | None = None,
    scores: Mapping[str, float] | None = None,
) -> Figure:
    """The figure :func:`plot_rank_heatmap` saves (same arguments, less the path)."""
    if len(rank_map) == 0:
        raise ValueError("cannot plot an empty RankMap")
    table = rank_map.table()
    n_rows, n_cols = len(table.layers), len(table.kinds)
    row_labels = ["other" if layer is None else str(layer) for layer in table.layers]
    panel_width = 1.6 + 0.75 * n_cols
    height = 1.8 + 0.24 * n_rows
    n_panels = 1 if scores is None else 2
    fig = new_figure(panel_width * n_panels + 0.6, height)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    nan = float("nan")
    # Dropped cells (rank 0) leave the colour scale (masked like absent ones), then get their own mark.
    ranks = [[nan if v is None or v == 0 else float(v) for v in row] for row in table.values]
    dropped_cells = [(i, j) for i, row in enumerate(table.values) for j, v in enumerate(row) if v == 0]
    _grid_heatmap(
        fig,
        axes[0],
        ranks,
        row_labels=row_labels,
        col_labels=table.kinds,
        fmt=".0f",
        cmap_name="viridis",
        colorbar_label="rank",
        integer_ticks=True,
    )
    _mark_dropped(axes[0], dropped_cells, n_rows)
    kept = f"{len(rank_map)} modules" + (
        f", {len(dropped_cells)} dropped (rank 0, hatched)" if dropped_cells else ""
    )
    axes[0].set_title(f"rank (total {rank_map.total_rank}, {kept})", fontsize=10)
    if scores is not None:
        grid = [
            [nan if name is None or name not in scores else float(scores[name]) for name in row]
            for row in table.modules
        ]
        _grid_heatmap(
            fig,
            axes[1],
            grid,
            row_labels=row_labels,
            col_labels=table.kinds,
            fmt=".2g",
            cmap_name="magma",
            colorbar_label="score",
            integer_ticks=False,
        )
        axes[1].set_title("score", fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def _mark_dropped(ax: Axes, cells: Sequence[tuple[int, int]], n_rows: int) -> None:
    """Cover each (row, column) cell with a white, hatched square labelled 0."""
    from matplotlib.patches import Rectangle

    font = _cell_font(n_rows)
    for i, j in cells:
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5), 1.0, 1.0, facecolor="white", edgecolor="0.55", hatch="///", linewidth=0.0
            )
        )
        ax.text(
            j,
            i,
            "0",
            ha="center",
            va="center",
            fontsize=font,
            color="black",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6},
        )


def _short_label(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``3.mlp.up_proj``: enough to tell bars apart."""
    layer, kind = split_module_name(name)
    return kind if layer is None else f"{layer}.{kind}"


def plot_rank_bars(
    rank_map: Mapping[str, float],
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, float] | None = None,
    title: str | None = None,
    label: str = "allocated",
    reference_label: str = "reference",
    samples: Sequence[Mapping[str, float]] = (),
    sample_label: str = "each seed",
) -> pathlib.Path:
    """Save a horizontal bar chart of the rank of every module, one row per module, grouped by layer.

    Rows run top to bottom in the map's order, with a rule between layers, so the chart grows in height
    (about 0.2 inch per module) and its labels stay horizontal and readable at any module count.

    Args:
        rank_map: The ranks to draw (may be fractional, e.g. a mean over seeds).
        path: Output PNG path; the parent directory is created.
        reference: Optional second map (e.g. uniform rank) drawn as a thin grey bar under each module's
            bar; modules it lacks get none.
        title: Figure title.
        label: Legend label of ``rank_map``'s bars.
        reference_label: Legend label of ``reference``'s bars.
        samples: Optional maps drawn as dots on each bar (e.g. every seed's ranks behind a mean).
        sample_label: Legend label of the dots.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``rank_map`` is empty.
    """
    if len(rank_map) == 0:
        raise ValueError("cannot plot an empty RankMap")
    names = list(rank_map)
    n = len(names)
    per_row = 0.2 if n <= 120 else 0.12
    fig = new_figure(6.4, 1.3 + per_row * n)
    ax = fig.subplots()
    y = list(range(n))
    ax.barh(y, [float(rank_map[k]) for k in names], height=0.45, color="C0", label=label, zorder=3)
    if reference is not None:  # wide and pale, behind: the allocated bar stays readable on top of it
        ref = [float(reference[k]) if k in reference else float("nan") for k in names]
        ax.barh(y, ref, height=0.85, color="0.85", label=reference_label, zorder=2)
    for i, sample in enumerate(samples):
        xs = [float(sample[k]) for k in names if k in sample]
        ys = [j for j, k in enumerate(names) if k in sample]
        ax.plot(xs, ys, "o", ms=3, color="C1", alpha=0.8, label=sample_label if i == 0 else None, zorder=4)
    layers = [split_module_name(k)[0] for k in names]
    for j in range(1, n):
        if layers[j] != layers[j - 1]:
            ax.axhline(j - 0.5, color="0.6", linewidth=0.6)
    font = 8 if n <= 120 else 6
    ax.set_yticks(y, labels=[_short_label(k) for k in names], fontsize=font)
    ax.set_ylim(n - 0.4, -0.6)  # first module on top
    ax.set_xlabel("rank")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title)
    if reference is not None or samples:  # below the axes: a legend inside would hide long bars
        fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return save_figure(fig, path)


def plot_training_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    *,
    ylabel: str = "loss",
    title: str | None = None,
    groups: Mapping[str, str] | None = None,
) -> pathlib.Path:
    """Save a line plot with one line per named run (x = step, y = value).

    Args:
        curves: Run name -> ``[(step, value), ...]``; points are drawn in step order.
        path: Output PNG path; the parent directory is created.
        ylabel: Label of the y axis.
        title: Figure title.
        groups: Optional run name -> group (e.g. the method): runs of a group share a colour and differ
            by line style (e.g. one per seed). Without it every run gets its own colour.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``curves`` is empty.
    """
    if not curves:
        raise ValueError("no curves to plot")
    fig = new_figure(7.0, 4.2)
    ax = fig.subplots()
    colour: dict[str, str] = {}
    seen: dict[str, int] = {}
    styles = ("-", "--", ":", "-.")
    for name, points in curves.items():
        ordered = sorted(points, key=lambda p: p[0])
        group = groups.get(name, name) if groups is not None else name
        colour.setdefault(group, f"C{len(colour) % 10}")
        k = seen[group] = seen.get(group, -1) + 1
        ax.plot(
            [p[0] for p in ordered],
            [p[1] for p in ordered],
            label=name,
            linewidth=1.4,
            color=colour[group],
            linestyle=styles[k % len(styles)],
        )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def smooth(points: Sequence[tuple[int, float]], window: int = 10) -> list[tuple[int, float]]:
    """Trailing moving average of a loss curve (for plots; the raw curve stays in history.json)."""
    out, acc = [], 0.0
    for i, (step, value) in enumerate(points):
        acc += value
        if i >= window:
            acc -= points[i - window][1]
        out.append((step, acc / min(i + 1, window)))
    return out
