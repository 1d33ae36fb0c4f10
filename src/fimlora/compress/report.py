"""What a compression kept, module by module: the record, its Markdown table and its figure.

Torch-free: a :class:`CompressionReport` holds plain numbers, so it can be saved, loaded and compared
without the adapter. The figure needs matplotlib (imported lazily through :mod:`fimlora.plot`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fimlora.io import atomic_write_text
from fimlora.module_names import split_module_name

__all__ = ["FORMAT", "CompressionReport", "ModuleCompression", "plot_compression"]

FORMAT = "fimlora.compression/1"
"""Value of the ``"format"`` field of ``compression.json``."""


@dataclass(frozen=True)
class ModuleCompression:
    """One module: its shape, its rank before and after, and its update's energy before and after.

    Attributes:
        in_features: Input size ``in`` (a rank costs ``in + out`` parameters).
        out_features: Output size ``out``.
        source_rank: Rank in the source adapter.
        rank: Rank kept (0: dropped from ``target_modules``).
        energy: Squared Frobenius norm of the source update ``||s B A||_F^2``.
        kept_energy: Energy of the kept directions (``sum`` of the kept ``sigma**2``).
        singular_values: The source update's singular values, largest first.
    """

    in_features: int
    out_features: int
    source_rank: int
    rank: int
    energy: float
    kept_energy: float
    singular_values: list[float] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        """Fraction of the update's energy kept (1.0 for an update of zero energy)."""
        return self.kept_energy / self.energy if self.energy > 0 else 1.0

    @property
    def params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def source_params(self) -> int:
        return self.source_rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class CompressionReport:
    """The result of :func:`fimlora.compress_adapter`.

    Attributes:
        modules: Module name -> what it kept, in the source adapter's order.
        budget: The budget asked for: ``{"fraction"|"budget_params"|"budget_ranks": value, "min_rank": k}``
            plus ``"params"``/``"ranks"``: the budget in the unit the selection used.
        source: The adapter compressed (a path, or ``"<model>"``) and its PEFT type.
        seconds: Wall time of reading, decomposing, selecting and building the factors (not writing).
        out_dir: Where it was written (``<out_dir>/adapter`` is the adapter), or None.
    """

    modules: dict[str, ModuleCompression]
    budget: dict[str, Any]
    source: dict[str, Any]
    seconds: float = 0.0
    out_dir: str | None = None

    # ---- totals -------------------------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, int]:
        """Module -> kept rank (0 for dropped modules)."""
        return {n: m.rank for n, m in self.modules.items()}

    @property
    def lora_params(self) -> int:
        """LoRA parameters of the compressed adapter, ``sum_m k_m (in_m + out_m)``."""
        return sum(m.params for m in self.modules.values())

    @property
    def source_lora_params(self) -> int:
        return sum(m.source_params for m in self.modules.values())

    @property
    def kept_energy_fraction(self) -> float:
        """Energy kept over all modules (sum of kept over sum of total)."""
        total = math.fsum(m.energy for m in self.modules.values())
        kept = math.fsum(m.kept_energy for m in self.modules.values())
        return kept / total if total > 0 else 1.0

    @property
    def adapter_dir(self) -> Path | None:
        return Path(self.out_dir) / "adapter" if self.out_dir is not None else None

    # ---- output -------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Totals: parameters before/after, slack, ranks, energy kept, modules dropped."""
        unit_budget = self.budget.get("params")
        return {
            "source_lora_params": self.source_lora_params,
            "lora_params": self.lora_params,
            "param_fraction": self.lora_params / self.source_lora_params if self.source_lora_params else None,
            "budget_slack_params": unit_budget - self.lora_params if unit_budget is not None else None,
            "source_total_rank": sum(m.source_rank for m in self.modules.values()),
            "total_rank": sum(self.ranks.values()),
            "kept_energy_fraction": self.kept_energy_fraction,
            "modules": len(self.modules),
            "modules_dropped": sorted(n for n, m in self.modules.items() if m.rank == 0),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "budget": self.budget,
            "summary": self.summary(),
            "seconds": self.seconds,
            "modules": {n: {**asdict(m), "kept_fraction": m.kept_fraction} for n, m in self.modules.items()},
        }

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> CompressionReport:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (format {data.get('format')!r})")
        modules = {
            n: ModuleCompression(**{k: v for k, v in m.items() if k != "kept_fraction"})
            for n, m in data["modules"].items()
        }
        return cls(modules, data["budget"], data["source"], data.get("seconds", 0.0))

    def format_table(self) -> str:
        """A Markdown table: one row per module (rank before -> after, energy kept), then the totals."""
        rows = [
            "| module | in | out | rank | kept rank | energy kept |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in self.modules.items():
            rows.append(
                f"| {name} | {m.in_features} | {m.out_features} | {m.source_rank} | {m.rank} | "
                f"{100 * m.kept_fraction:.2f} % |"
            )
        s = self.summary()
        rows.append(
            f"| **total** | | | {s['source_total_rank']} | {s['total_rank']} | "
            f"{100 * s['kept_energy_fraction']:.2f} % |"
        )
        rows.append("")
        rows.append(
            f"LoRA parameters {s['source_lora_params']} -> {s['lora_params']} "
            f"({100 * (s['param_fraction'] or 0):.1f} %); modules dropped: {len(s['modules_dropped'])}."
        )
        return "\n".join(rows)


def _label(name: str) -> str:
    layer, kind = split_module_name(name)
    return kind if layer is None else f"{layer}.{kind}"


def plot_compression(
    report: CompressionReport, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Two panels over the modules: rank before and after (bars), and the fraction of energy kept.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from fimlora.plot import new_figure, save_figure

    names = list(report.modules)
    n = len(names)
    fig = new_figure(min(4.0 + 0.2 * n, 60.0), 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = list(range(n))
    source = [report.modules[k].source_rank for k in names]
    kept = [report.modules[k].rank for k in names]
    top.bar([i - 0.2 for i in x], source, width=0.4, color="C7", label="source rank")
    top.bar([i + 0.2 for i in x], kept, width=0.4, color="C0", label="kept rank")
    top.set_ylabel("rank")
    top.yaxis.get_major_locator().set_params(integer=True)
    top.legend(fontsize=8)
    top.grid(axis="y", alpha=0.3)
    s = report.summary()
    top.set_title(
        f"{s['lora_params']} of {s['source_lora_params']} LoRA parameters "
        f"({100 * (s['param_fraction'] or 0):.1f} %), {100 * s['kept_energy_fraction']:.1f} % of the energy",
        fontsize=10,
    )
    bottom.bar(x, [report.modules[k].kept_fraction for k in names], width=0.8, color="C2")
    bottom.set_ylim(0, 1.02)
    bottom.set_ylabel("energy kept")
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(x, labels=[_label(k) for k in names], rotation=90, fontsize=7 if n <= 60 else 5)
    bottom.set_xlim(-0.7, n - 0.3)
    for ax in (top, bottom):
        ax.set_axisbelow(True)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
