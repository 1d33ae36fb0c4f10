"""Does the calibration score track what a module contributes? (``python -m bench.ablations contribution``)

Train one FIM-LoRA adapter, then remove each module's adapter in turn (its LoRA-B set to zero) and measure
the drop in test accuracy and the rise in test loss; correlate them (Spearman) with the module's
calibration score. Writes ``contribution.{json,md,png}``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.harness import RunSpec, commit_label, record_provenance
from fimlora.io import atomic_write_json, atomic_write_text
from fimlora.rankmap import kendall_tau_b, spearman

from .common import BASE_OVERRIDES, fmt_cell

__all__ = ["contribution"]


def contribution(task: str, seed: int, out: Path, *, r: int = 8) -> dict[str, Any]:
    """Train one FIM-LoRA adapter; ablate each module's adapter in turn; correlate drop with score."""
    import torch

    from bench.suites.run import train_spec

    started = time.perf_counter()
    spec = RunSpec("encoder", task, "minilm", "fim", f"r{r}", seed, BASE_OVERRIDES)
    prepared, result, eval_fn = train_spec(spec)
    assert eval_fn is not None
    model = result.model
    scores = dict(result.rank_map.metadata.get("scores") or {})
    if not scores:
        raise RuntimeError("the FIM rank map carries no scores; cannot correlate")
    from fimlora.peft_glue import current_ranks, lora_factors, lora_modules

    mods = lora_modules(model)
    ranks = current_ranks(model)
    full = eval_fn(model)
    rows = []
    for name, module in mods.items():
        weight = lora_factors(module)[1].weight  # B
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.zero_()
        metrics = eval_fn(model)
        with torch.no_grad():
            weight.copy_(saved)
        rows.append(
            {
                "module": name,
                "rank": ranks[name],
                "score": float(scores[name]),
                "accuracy_drop": full["accuracy"] - metrics["accuracy"],
                "loss_rise": metrics["loss"] - full["loss"],
            }
        )
        print(f"{name}: drop {rows[-1]['accuracy_drop']:+.4f} loss {rows[-1]['loss_rise']:+.4f}", flush=True)
    s = [r_["score"] for r_ in rows]
    drops = [r_["accuracy_drop"] for r_ in rows]
    rises = [r_["loss_rise"] for r_ in rows]
    corr = {
        "spearman_score_vs_accuracy_drop": spearman(s, drops),
        "spearman_score_vs_loss_rise": spearman(s, rises),
        "kendall_score_vs_loss_rise": kendall_tau_b(s, rises),
        "spearman_rank_vs_loss_rise": spearman([r_["rank"] for r_ in rows], rises),
    }
    payload = {
        "task": task,
        "seed": seed,
        "r": r,
        "overrides": BASE_OVERRIDES,
        "full": full,
        "modules": rows,
        "correlations": corr,
        "seconds": time.perf_counter() - started,
        "provenance": record_provenance(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "contribution.json", payload, indent=1)
    _write_contribution(payload, out)
    return payload


def _write_contribution(p: Mapping[str, Any], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = p["correlations"]
    lines = [
        f"# Does the calibration score track contribution? ({p['task']}, seed {p['seed']}, FIM-LoRA r{p['r']} budget)",
        "",
        f"Full adapter: accuracy {p['full']['accuracy']:.4f}, loss {p['full']['loss']:.4f} on {int(p['full'].get('n', 0))} test examples. "
        "Each row: that module's LoRA-B zeroed (its update removed), everything else kept.",
        "",
        f"Spearman(score, accuracy drop) = {fmt_cell(c['spearman_score_vs_accuracy_drop'])}; "
        f"Spearman(score, loss rise) = {fmt_cell(c['spearman_score_vs_loss_rise'])} "
        f"(Kendall {fmt_cell(c['kendall_score_vs_loss_rise'])}); Spearman(allocated rank, loss rise) = "
        f"{fmt_cell(c['spearman_rank_vs_loss_rise'])}.",
        "",
        "| module | rank | score | accuracy drop | loss rise |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(p["modules"], key=lambda r: -r["score"]):
        lines.append(
            f"| {r['module']} | {r['rank']} | {r['score']:.3g} | {r['accuracy_drop']:+.4f} | {r['loss_rise']:+.4f} |"
        )
    git = p["provenance"]["git"]
    lines += [
        "",
        f"_{p['seconds']:.0f} s on a shared 2-core CPU; git {commit_label(git, short=True)}. "
        "Command: `python -m bench.ablations contribution --task "
        f"{p['task']} --seed {p['seed']} --out docs/results/ablations`._",
        "",
    ]
    atomic_write_text(out / "contribution.md", "\n".join(lines))
    fig = Figure(figsize=(8, 3.4))
    FigureCanvasAgg(fig)
    for i, key in enumerate(("loss_rise", "accuracy_drop")):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter([r["score"] for r in p["modules"]], [r[key] for r in p["modules"]], s=14)
        ax.set_xscale("log")
        ax.set_xlabel("calibration score (fisher/mean)")
        ax.set_ylabel(key.replace("_", " "))
    fig.suptitle(f"{p['task']}: module score vs effect of removing its adapter")
    fig.tight_layout()
    fig.savefig(out / "contribution.png", dpi=120)
