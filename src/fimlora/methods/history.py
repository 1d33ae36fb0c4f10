"""Rank history of a training-time method: every change of a module's rank, as JSONL and as figures.

Each event is one line of JSON ``{"step", "module", "old_rank", "new_rank", "reason"}`` (extra keys are
allowed, e.g. how many columns were pruned and added). A run starts with one ``"init"`` event per module
(``old_rank`` = the LoRA config's rank), so the file alone is enough to rebuild every module's rank
trajectory. Used by L1RA (Singh et al., arXiv 2509.04884), LR-LoRA (Garg, Lucey, Saratchandran,
arXiv 2606.04325) and the AdaLoRA baseline (Zhang et al., ICLR 2023).

Figures reuse :mod:`fimlora.plot` (same figure style and DPI); the final map is drawn with
:meth:`fimlora.rankmap.RankMap.plot_heatmap`, the same heatmap FIM-LoRA's maps get.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fimlora.module_names import split_module_name
from fimlora.rankmap import RankMap

__all__ = ["RankEvent", "RankHistory"]


@dataclass(frozen=True)
class RankEvent:
    """One change (or initial setting) of a module's rank."""

    step: int
    module: str
    old_rank: int
    new_rank: int
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Flat JSON object: the five fields, then the extras."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RankEvent:
        core = ("step", "module", "old_rank", "new_rank", "reason")
        missing = [k for k in core if k not in data]
        if missing:
            raise ValueError(f"rank event is missing {missing}: {dict(data)!r}")
        return cls(
            step=int(data["step"]),
            module=str(data["module"]),
            old_rank=int(data["old_rank"]),
            new_rank=int(data["new_rank"]),
            reason=str(data["reason"]),
            extra={k: v for k, v in data.items() if k not in core},
        )


class RankHistory:
    """An append-only list of :class:`RankEvent`, optionally mirrored line by line to a JSONL file.

    Args:
        path: JSONL file to append each event to as it is logged (flushed per reallocation, so a killed
            run keeps every event up to the kill). ``None`` keeps events in memory only.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = pathlib.Path(path) if path is not None else None
        self.events: list[RankEvent] = []

    def log(self, events: Iterable[RankEvent]) -> None:
        """Record events (one reallocation) and append them to the JSONL file, if any."""
        batch = list(events)
        self.events.extend(batch)
        if self.path is not None and batch:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                for e in batch:
                    f.write(json.dumps(e.to_json(), sort_keys=True) + "\n")

    def log_changes(
        self,
        step: int,
        old: Mapping[str, int],
        new: Mapping[str, int],
        reason: str,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[RankEvent]:
        """Log one event per module whose rank differs between ``old`` and ``new``; return them."""
        events = [
            RankEvent(step, n, int(old[n]), int(new[n]), reason, dict((extra or {}).get(n, {})))
            for n in new
            if int(old[n]) != int(new[n])
        ]
        self.log(events)
        return events

    def write_jsonl(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Write all events to ``path`` (replacing it)."""
        out = pathlib.Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in self.events))
        return out

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike[str]) -> RankHistory:
        """Load a history written by :meth:`write_jsonl` or by logging with a ``path``."""
        history = cls()
        for i, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    history.events.append(RankEvent.from_json(json.loads(line)))
                except (ValueError, json.JSONDecodeError) as err:
                    raise ValueError(f"{path}:{i + 1}: {err}") from err
        return history

    def state_dict(self) -> list[dict[str, Any]]:
        """The events as JSON objects (for method checkpoints)."""
        return [e.to_json() for e in self.events]

    def load_state_dict(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Replace the in-memory events (the JSONL file, if any, is not rewritten)."""
        self.events = [RankEvent.from_json(e) for e in events]

    def trajectories(self) -> dict[str, list[tuple[int, int]]]:
        """Module -> ``[(step, rank), ...]``, one point per event, in logging order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for e in self.events:
            points = out.setdefault(e.module, [])
            if not points and e.reason != "init":
                points.append((0, e.old_rank))  # a history without init events still starts somewhere
            points.append((e.step, e.new_rank))
        return out

    def plot_trajectories(
        self,
        path: str | os.PathLike[str],
        *,
        last_step: int | None = None,
        title: str | None = None,
    ) -> pathlib.Path:
        """Save a step plot of every module's rank over training; one colour per module kind.

        Args:
            path: output PNG (parent directory created).
            last_step: extend every line to this step (e.g. the total number of steps).
            title: figure title.

        Raises:
            ValueError: no events.
            ImportError: matplotlib is missing (``pip install 'fimlora[plot]'``).
        """
        from fimlora.plot import new_figure, save_figure

        traj = self.trajectories()
        if not traj:
            raise ValueError("no rank events to plot")
        end = max([last_step or 0] + [s for pts in traj.values() for s, _ in pts])
        kinds = list(dict.fromkeys(split_module_name(n)[1] for n in traj))
        colour = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
        fig = new_figure(7.0, 4.2)
        ax = fig.subplots()
        labelled: set[str] = set()
        for name, points in traj.items():
            steps = [s for s, _ in points] + [end]
            ranks = [r for _, r in points] + [points[-1][1]]
            kind = split_module_name(name)[1]
            # One legend entry per kind: with dozens of modules, per-module labels are unreadable.
            label = kind if kind not in labelled else None
            labelled.add(kind)
            ax.plot(steps, ranks, drawstyle="steps-post", color=colour[kind], alpha=0.7, lw=1.2, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="module kind", title_fontsize=8)
        ax.set_title(title or f"rank trajectories ({len(traj)} modules)", fontsize=10)
        return save_figure(fig, path)

    @staticmethod
    def plot_final(
        rank_map: RankMap, path: str | os.PathLike[str], *, title: str | None = None
    ) -> pathlib.Path:
        """The final map as FIM-LoRA's layers x kinds heatmap."""
        return rank_map.plot_heatmap(path, title=title)
