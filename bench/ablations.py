"""Ablations of FIM-LoRA that the paper does not report, run through fimlora's own code on MiniLM.

Subcommands (each writes a Markdown table, a JSON file and a PNG under ``--out``):

* ``stability``: rank-map stability vs the number of calibration batches T in {1, 2, 4, 8, 16, 32}.
  For each seed, LoRA-B gradients of 64 consecutive training batches are captured once (the model in
  eval mode and LoRA-A frozen, as fimlora's calibration does); the statistics of any T are then formed
  from them by fimlora's own reduction, ``fimlora.calibration.batch_module_stats`` (F = mean g^2,
  V = F - mean(g)^2, then mean or sum over B's elements). Maps are allocated by fimlora's ``plan_rank_map`` (parameter budget of uniform r).
  Reported: Spearman / Kendall between the maps from two *disjoint* calibration sets (batches [0, T) vs
  [32, 32 + T)) with the same seed, and between maps of *different seeds* (different LoRA-A and head
  init, data order and training subsample) at the same T. Also, for T = 8, the agreement between score
  types (fisher/variance) and aggregations (mean/sum), and each one's rank-map summary.
* ``contribution``: does the score track what a module contributes? Train one FIM-LoRA adapter, then
  remove each module's adapter in turn (its LoRA-B set to zero, i.e. delta_W = 0) and measure the
  drop in test accuracy and the rise in test loss; correlate them (Spearman) with the module's
  calibration score.
* ``per-example``: batch vs per-example estimator (``FimConfig.estimator``). For T in {1, 2, 4, 8}, both
  estimators calibrate (through ``estimate_module_scores`` itself) on two *disjoint* sets of training
  batches, [0, T) and [8, 8 + T), of the same seed and model; reported: Spearman / Kendall tau-b between the
  two rank maps of each estimator (and between the two score vectors), per score type and aggregation,
  and the calibration seconds of each estimator on the same batches (equal T = equal forward/backward
  passes, so the time ratio is the estimator's overhead).
* ``bounds``: r_min / r_max accuracy ablation through the benchmark grid machinery (one task, several
  seeds), written to the normal result store (labels like ``fim[r_min=1]``).

Commands (see docs/results/README.md)::

    python -m bench.ablations stability --task trec6 --seeds 0 1 2 --out docs/results/ablations
    python -m bench.ablations contribution --task trec6 --seed 0 --out docs/results/ablations
    python -m bench.ablations per-example --tasks trec6 sms_spam --seeds 0 1 2 --threads 1 \
        --out docs/results/ablations
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import RunSpec, commit_label, record_provenance
from fimlora.io import atomic_write_json, atomic_write_text
from fimlora.rankmap import kendall_tau_b, spearman

__all__ = [
    "capture_b_gradients",
    "contribution",
    "paired_counts",
    "per_example_stability",
    "rank_maps_for",
    "scores_from_gradients",
    "stability",
]

T_VALUES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
PE_T_VALUES: tuple[int, ...] = (1, 2, 4, 8)
ESTIMATORS: tuple[str, ...] = ("batch", "per_example")
VARIANTS: tuple[tuple[str, str], ...] = (
    ("fisher", "mean"),
    ("fisher", "sum"),
    ("variance", "mean"),
    ("variance", "sum"),
)
_BASE_OVERRIDES: dict[str, Any] = {
    "max_train": 1280,  # 80 batches of 16: enough for two disjoint sets of 32 batches
    "max_eval": 400,
    "max_length": 32,
    "batch_size": 16,
    "lr": 0.003,
    "device": "cpu",
}


def capture_b_gradients(
    spec: RunSpec, n_batches: int
) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int]]]:
    """LoRA-B gradients of the first ``n_batches`` training batches of a run, one dict per batch.

    Mirrors fimlora's calibration: the same batch order (``training.BatchPlan``), the same seeding of the
    LoRA init (``torch.manual_seed(seed)`` before wrapping, see :func:`_calibration_setup`), and the model
    in fimlora's own calibration state (``fimlora.calibration.calibration_mode``: eval mode, no dropout,
    only B trainable).

    Returns:
        ``(grads, shapes)``: ``grads[t][module]`` is a float64 CPU tensor of shape ``(out, r)``;
        ``shapes[module] = (in, out)``.
    """
    from fimlora.calibration import calibration_mode
    from fimlora.peft_glue import lora_factors, lora_modules, module_shapes

    model, stream = _calibration_setup(spec, n_batches)
    mods = lora_modules(model)
    shapes = module_shapes(mods)
    b_params = {n: lora_factors(m)[1].weight for n, m in mods.items()}
    grads = []
    with calibration_mode(model, b_params.values()):
        for batch in stream:
            model(**batch).loss.backward()
            grads.append({n: p.grad.detach().double().clone() for n, p in b_params.items()})
            for p in b_params.values():
                p.grad = None
    return grads, shapes


def scores_from_gradients(
    grads: Sequence[Mapping[str, Any]], shapes: Mapping[str, tuple[int, int]], kind: str, aggregation: str
) -> dict[str, float]:
    """Module scores from per-batch B gradients (float64 sums), reduced by fimlora's own
    ``batch_module_stats`` and ``ModuleStat.score``."""
    from fimlora.calibration import ModuleStats, batch_module_stats

    names = list(grads[0])
    sum_g = {n: sum(g[n] for g in grads) for n in names}
    sum_g2 = {n: sum(g[n] * g[n] for g in grads) for n in names}
    stats = ModuleStats(batch_module_stats(sum_g, sum_g2, len(grads), shapes), num_batches=len(grads))
    return stats.scores(kind, aggregation)


def rank_maps_for(
    scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], r: int, **fim: Any
) -> Any:
    """fimlora's rank map for ``scores`` under the parameter budget of uniform LoRA at ``r``."""
    from fimlora import FimConfig
    from fimlora.initialize import plan_rank_map

    cfg = FimConfig(budget_unit="params", show_progress=False, **fim)
    return plan_rank_map(scores, shapes, cfg, r=r)


def _corr(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float]:
    names = list(a)
    x, y = [a[n] for n in names], [b[n] for n in names]
    return spearman(x, y), kendall_tau_b(x, y)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def stability(task: str, seeds: Sequence[int], out: Path, *, r: int = 8) -> dict[str, Any]:
    """Rank-map stability vs T (disjoint calibration sets, different seeds) and score-type agreement."""
    started = time.perf_counter()
    per_seed = {}
    shapes: dict[str, tuple[int, int]] = {}
    for seed in seeds:
        spec = RunSpec("encoder", task, "minilm", "fim", f"r{r}", seed, _BASE_OVERRIDES)
        per_seed[seed], shapes = capture_b_gradients(spec, 2 * max(T_VALUES))
        print(f"captured 64 batches for seed {seed}", flush=True)
    variants = [("fisher", "mean"), ("fisher", "sum"), ("variance", "mean"), ("variance", "sum")]
    rows = []
    maps: dict[tuple[int, int, str, str, str], Any] = {}
    for kind, agg in variants:
        for t in T_VALUES:
            for seed in seeds:
                for half, start in (("a", 0), ("b", max(T_VALUES))):
                    s = scores_from_gradients(per_seed[seed][start : start + t], shapes, kind, agg)
                    maps[(t, seed, half, kind, agg)] = (s, rank_maps_for(s, shapes, r))
            disjoint = [
                maps[(t, s, "a", kind, agg)][1].compare(maps[(t, s, "b", kind, agg)][1]) for s in seeds
            ]
            cross = [
                maps[(t, s1, "a", kind, agg)][1].compare(maps[(t, s2, "a", kind, agg)][1])
                for i, s1 in enumerate(seeds)
                for s2 in seeds[i + 1 :]
            ]
            score_disjoint = [
                _corr(maps[(t, s, "a", kind, agg)][0], maps[(t, s, "b", kind, agg)][0]) for s in seeds
            ]
            rows.append(
                {
                    "score": kind,
                    "aggregation": agg,
                    "T": t,
                    "disjoint_spearman": _mean([c.spearman for c in disjoint]),
                    "disjoint_kendall": _mean([c.kendall for c in disjoint]),
                    "disjoint_l1_moved": _mean([c.l1_normalised for c in disjoint]),
                    "disjoint_score_spearman": _mean([c[0] for c in score_disjoint]),
                    "seed_spearman": _mean([c.spearman for c in cross]),
                    "seed_kendall": _mean([c.kendall for c in cross]),
                    "seed_l1_moved": _mean([c.l1_normalised for c in cross]),
                }
            )
    # Score-type / aggregation agreement at the default T = 8 (seed-averaged), and map summaries.
    agreement = []
    for i, (k1, a1) in enumerate(variants):
        for k2, a2 in variants[i + 1 :]:
            comps = [maps[(8, s, "a", k1, a1)][1].compare(maps[(8, s, "a", k2, a2)][1]) for s in seeds]
            agreement.append(
                {
                    "a": f"{k1}/{a1}",
                    "b": f"{k2}/{a2}",
                    "spearman": _mean([c.spearman for c in comps]),
                    "kendall": _mean([c.kendall for c in comps]),
                    "l1_moved": _mean([c.l1_normalised for c in comps]),
                }
            )
    summaries = {}
    for kind, agg in variants:
        rm = maps[(8, seeds[0], "a", kind, agg)][1]
        by_type: dict[str, list[int]] = {}
        for name, rank in rm.items():
            by_type.setdefault(
                name.split(".")[-1] if "attention.output" not in name else "attention.output.dense", []
            ).append(rank)
        summaries[f"{kind}/{agg}"] = {
            "min": min(rm.values()),
            "max": max(rm.values()),
            "by_module_type": {k: round(sum(v) / len(v), 2) for k, v in sorted(by_type.items())},
            "ranks": dict(rm),
        }
    result = {
        "task": task,
        "seeds": list(seeds),
        "r": r,
        "T_values": list(T_VALUES),
        "overrides": _BASE_OVERRIDES,
        "stability": rows,
        "score_agreement_T8": agreement,
        "rank_maps_T8_seed0": summaries,
        "seconds": time.perf_counter() - started,
        "provenance": record_provenance(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "stability.json", result, indent=1)
    _write_stability_md(result, out / "stability.md")
    _plot_stability(rows, out / "stability.png", task)
    return result


def _f(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _write_stability_md(result: Mapping[str, Any], path: Path) -> None:
    lines = [
        f"# Rank-map stability vs calibration batches T ({result['task']}, MiniLM-L6, budget r{result['r']}, "
        f"seeds {result['seeds']})",
        "",
        "Disjoint: maps from calibration batches [0, T) vs [32, 32+T), same seed (mean over seeds). "
        "Seeds: maps from different seeds at the same T (mean over seed pairs). `moved` = fraction of the "
        "rank budget that differs (L1 / total rank).",
        "",
        "| score | agg | T | disjoint Spearman | disjoint Kendall | disjoint moved | seeds Spearman | seeds Kendall | seeds moved | disjoint score Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["stability"]:
        lines.append(
            f"| {r['score']} | {r['aggregation']} | {r['T']} | {_f(r['disjoint_spearman'])} | {_f(r['disjoint_kendall'])} | "
            f"{_f(r['disjoint_l1_moved'])} | {_f(r['seed_spearman'])} | {_f(r['seed_kendall'])} | {_f(r['seed_l1_moved'])} | "
            f"{_f(r['disjoint_score_spearman'])} |"
        )
    lines += ["", "## Agreement between score types / aggregations (T = 8, same seed and batches)", ""]
    lines += ["| a | b | Spearman | Kendall | moved |", "|---|---|---|---|---|"]
    for a in result["score_agreement_T8"]:
        lines.append(
            f"| {a['a']} | {a['b']} | {_f(a['spearman'])} | {_f(a['kendall'])} | {_f(a['l1_moved'])} |"
        )
    lines += ["", "## Mean rank by module type (T = 8, seed 0)", ""]
    types = sorted({t for s in result["rank_maps_T8_seed0"].values() for t in s["by_module_type"]})
    lines += ["| score/agg | min | max | " + " | ".join(types) + " |", "|---" * (3 + len(types)) + "|"]
    for name, s in result["rank_maps_T8_seed0"].items():
        cells = " | ".join(str(s["by_module_type"].get(t, "–")) for t in types)
        lines.append(f"| {name} | {s['min']} | {s['max']} | {cells} |")
    git = result["provenance"]["git"]
    lines += [
        "",
        f"_{result['seconds']:.0f} s on a shared 2-core CPU; git {commit_label(git, short=True)}. "
        "Command: `python -m bench.ablations stability --task "
        f"{result['task']} --seeds {' '.join(map(str, result['seeds']))} --out docs/results/ablations`._",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _plot_stability(rows: Sequence[Mapping[str, Any]], path: Path, task: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(
        (("disjoint_spearman", "disjoint calibration sets"), ("seed_spearman", "different seeds"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for kind, agg in (("fisher", "mean"), ("fisher", "sum"), ("variance", "mean"), ("variance", "sum")):
            sel = [r for r in rows if r["score"] == kind and r["aggregation"] == agg]
            ax.plot([r["T"] for r in sel], [r[key] for r in sel], marker="o", label=f"{kind}/{agg}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration batches T")
        ax.set_ylabel("Spearman of rank maps")
        ax.set_title(f"{task}: {title}")
        ax.set_ylim(-0.2, 1.05)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def contribution(task: str, seed: int, out: Path, *, r: int = 8) -> dict[str, Any]:
    """Train one FIM-LoRA adapter; ablate each module's adapter in turn; correlate drop with score."""
    import torch

    from bench.suites.run import train_spec

    started = time.perf_counter()
    spec = RunSpec("encoder", task, "minilm", "fim", f"r{r}", seed, _BASE_OVERRIDES)
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
        "overrides": _BASE_OVERRIDES,
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
        f"Spearman(score, accuracy drop) = {_f(c['spearman_score_vs_accuracy_drop'])}; "
        f"Spearman(score, loss rise) = {_f(c['spearman_score_vs_loss_rise'])} "
        f"(Kendall {_f(c['kendall_score_vs_loss_rise'])}); Spearman(allocated rank, loss rise) = "
        f"{_f(c['spearman_rank_vs_loss_rise'])}.",
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


def _calibration_setup(spec: RunSpec, n_batches: int) -> tuple[Any, list[dict[str, Any]]]:
    """A fresh PEFT model (B = 0) and the run's first ``n_batches`` training batches, as the run sees them."""
    import torch
    from peft import get_peft_model

    from bench.suites.run import prepare_spec
    from fimlora.tasks import collator_for
    from fimlora.training import BatchPlan

    prepared = prepare_spec(spec)
    torch.manual_seed(spec.seed)
    model = get_peft_model(prepared.model, prepared.lora_config)
    collate = collator_for("classification", prepared.tokenizer)
    plan = BatchPlan(len(prepared.train_rows), prepared.train_config.batch_size, spec.seed)
    if plan.steps_per_epoch < n_batches:
        raise ValueError(f"{n_batches} batches requested, the training set has {plan.steps_per_epoch}")
    stream = [collate([prepared.train_rows[i] for i in plan.indices(step)]) for step in range(n_batches)]
    return model, stream


def _sd(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2:
        return float("nan")
    m = sum(finite) / len(finite)
    return math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1))


def per_example_stability(
    tasks: Sequence[str], seeds: Sequence[int], out: Path, *, r: int = 8
) -> dict[str, Any]:
    """Disjoint-set rank-map stability of the batch and per-example estimators at equal T, and their cost."""
    from fimlora import FimConfig, estimate_module_scores
    from fimlora.peft_glue import lora_modules, module_shapes

    started = time.perf_counter()
    second = max(PE_T_VALUES)  # the second calibration set starts where the largest first one ends
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    for task in tasks:
        per_seed: dict[tuple[str, int, str, str], list[tuple[float, float, float, float]]] = {}
        seconds: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
        cross: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
        for seed in seeds:
            spec = RunSpec("encoder", task, "minilm", "fim", f"r{r}", seed, _BASE_OVERRIDES)
            model, stream = _calibration_setup(spec, 2 * second)
            shapes = module_shapes(lora_modules(model))
            for estimator in ESTIMATORS:  # warm-up (allocator, kernels), not timed
                estimate_module_scores(
                    model,
                    stream[:1],
                    FimConfig(calibration_batches=1, estimator=estimator, show_progress=False),  # type: ignore[arg-type]
                )
            for t in PE_T_VALUES:
                stats: dict[tuple[str, str], Any] = {}
                for i, (half, start) in enumerate((("a", 0), ("b", second))):
                    # Alternate which estimator goes first, so drift on a shared machine hits both.
                    order = ESTIMATORS if i % 2 == 0 else tuple(reversed(ESTIMATORS))
                    for estimator in order:
                        cfg = FimConfig(calibration_batches=t, estimator=estimator, show_progress=False)  # type: ignore[arg-type]
                        st = estimate_module_scores(model, stream[start : start + t], cfg)
                        stats[(estimator, half)] = st
                        seconds[estimator].append(st.seconds / t)
                for kind, agg in VARIANTS:
                    maps = {}
                    for estimator in ESTIMATORS:
                        sa = stats[(estimator, "a")].scores(kind, agg)
                        sb = stats[(estimator, "b")].scores(kind, agg)
                        maps[estimator] = rank_maps_for(sa, shapes, r)
                        comp = maps[estimator].compare(rank_maps_for(sb, shapes, r))
                        per_seed.setdefault((estimator, t, kind, agg), []).append(
                            (comp.spearman, comp.kendall, comp.l1_normalised, _corr(sa, sb)[0])
                        )
                    # Do the two estimators allocate alike? (same batches [0, T), same seed)
                    both = maps["batch"].compare(maps["per_example"])
                    cross.setdefault((t, kind, agg), []).append((both.spearman, both.kendall))
            print(f"{task} seed {seed}: done ({time.perf_counter() - started:.0f} s)", flush=True)
        for (estimator, t, kind, agg), values in per_seed.items():
            sp, kt, moved, score_sp = (list(v) for v in zip(*values, strict=True))
            rows.append(
                {
                    "task": task,
                    "estimator": estimator,
                    "T": t,
                    "score": kind,
                    "aggregation": agg,
                    "spearman": _mean(sp),
                    "spearman_sd": _sd(sp),
                    "kendall": _mean(kt),
                    "kendall_sd": _sd(kt),
                    "l1_moved": _mean(moved),
                    "score_spearman": _mean(score_sp),
                    "per_seed_spearman": sp,
                    "per_seed_kendall": kt,
                }
            )
        for (t, kind, agg), values in cross.items():
            agreement.append(
                {
                    "task": task,
                    "T": t,
                    "score": kind,
                    "aggregation": agg,
                    "spearman": _mean([v[0] for v in values]),
                    "kendall": _mean([v[1] for v in values]),
                }
            )
        per_batch = {e: _mean(v) for e, v in seconds.items()}
        timing.append(
            {
                "task": task,
                "seconds_per_batch": per_batch,
                "ratio_per_example_to_batch": per_batch["per_example"] / per_batch["batch"],
                "batches_timed": {e: len(v) for e, v in seconds.items()},
            }
        )
    result = {
        "command": (
            f"python -m bench.ablations per-example --tasks {' '.join(tasks)} --seeds "
            f"{' '.join(map(str, seeds))} --threads 1 --out docs/results/ablations"
        ),
        "tasks": list(tasks),
        "seeds": list(seeds),
        "r": r,
        "T_values": list(PE_T_VALUES),
        "second_set_start": second,
        "overrides": _BASE_OVERRIDES,
        "stability": rows,
        "batch_vs_per_example_maps": agreement,
        "timing": timing,
        "seconds": time.perf_counter() - started,
        "provenance": record_provenance(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "per_example.json", result, indent=1)
    _write_per_example_md(result, out / "per_example.md")
    _plot_per_example(result, out / "per_example.png")
    return result


def paired_counts(batch: Sequence[float], per_example: Sequence[float]) -> tuple[int, int, int]:
    """(higher, equal, lower): seeds where the per-example Spearman beats, ties or trails the batch one.

    A seed where either is undefined (nan: a constant rank map) is not counted.
    """
    counts = [0, 0, 0]
    for b, p in zip(batch, per_example, strict=True):
        if math.isnan(b) or math.isnan(p):
            continue
        counts[0 if p > b + 1e-12 else 1 if abs(p - b) <= 1e-12 else 2] += 1
    return counts[0], counts[1], counts[2]


def _write_per_example_md(result: Mapping[str, Any], path: Path) -> None:
    git = result["provenance"]["git"]
    lines = [
        "# Batch vs per-example gradient estimator: rank-map stability at equal T",
        "",
        f"Command: `{result['command']}`",
        "",
        f"MiniLM-L6, budget r{result['r']} (parameters of uniform LoRA), batch size "
        f"{result['overrides']['batch_size']}, max length {result['overrides']['max_length']}, seeds "
        f"{result['seeds']}. For each seed, both estimators calibrate on training batches [0, T) and, "
        f"disjoint, [{result['second_set_start']}, {result['second_set_start']} + T); the table gives the "
        "agreement of the two rank maps (mean ± sd over seeds). Equal T = the same forward/backward passes.",
        "",
    ]
    lines += [
        "Paired comparison (same seed, same batches): in how many of the (task, seed) pairs the per-example "
        "map's disjoint-set Spearman is higher / equal / lower than the batch map's.",
        "",
        "| score/agg | " + " | ".join(f"T={t}" for t in result["T_values"]) + " | all |",
        "|---" * (len(result["T_values"]) + 2) + "|",
    ]
    for kind, agg in VARIANTS:
        cells, total = [], [0, 0, 0]
        for t in result["T_values"]:
            wins = [0, 0, 0]
            for task in result["tasks"]:
                sel = {
                    r["estimator"]: r["per_seed_spearman"]
                    for r in result["stability"]
                    if r["task"] == task and r["T"] == t and r["score"] == kind and r["aggregation"] == agg
                }
                wins = [
                    a + b for a, b in zip(wins, paired_counts(sel["batch"], sel["per_example"]), strict=True)
                ]
            total = [a + b for a, b in zip(total, wins, strict=True)]
            cells.append("/".join(map(str, wins)) if any(wins) else "–")
        lines.append(f"| {kind}/{agg} | " + " | ".join(cells) + f" | {'/'.join(map(str, total))} |")
    lines += [
        "",
        "With T = 1 the batch estimator's variance is E[g^2] - E[g]^2 of a single gradient, which fimlora "
        "sets to exactly zero (rather than keep fp32 rounding noise): every score is zero, the allocation "
        "falls back to uniform, and its agreement is undefined (–) and not counted above. The per-example "
        "variance at T = 1 is a real variance over the batch's examples.",
        "",
    ]
    for kind, agg in VARIANTS:
        lines += [f"## {kind}/{agg}", ""]
        lines += [
            "| task | T | batch Spearman | per-example Spearman | batch Kendall | per-example Kendall | "
            "batch moved | per-example moved | batch score Spearman | per-example score Spearman |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for task in result["tasks"]:
            for t in result["T_values"]:
                sel = {
                    r["estimator"]: r
                    for r in result["stability"]
                    if r["task"] == task and r["T"] == t and r["score"] == kind and r["aggregation"] == agg
                }
                b, p = sel["batch"], sel["per_example"]
                lines.append(
                    f"| {task} | {t} | {_f(b['spearman'])} ± {_f(b['spearman_sd'])} | "
                    f"{_f(p['spearman'])} ± {_f(p['spearman_sd'])} | {_f(b['kendall'])} ± {_f(b['kendall_sd'])} | "
                    f"{_f(p['kendall'])} ± {_f(p['kendall_sd'])} | {_f(b['l1_moved'])} | {_f(p['l1_moved'])} | "
                    f"{_f(b['score_spearman'])} | {_f(p['score_spearman'])} |"
                )
        lines.append("")
    lines += ["## Do the two estimators allocate alike? (batches [0, T), same seed; mean over seeds)", ""]
    lines += [
        "| score/agg | task | " + " | ".join(f"T={t} Spearman / Kendall" for t in result["T_values"]) + " |",
        "|---" * (len(result["T_values"]) + 2) + "|",
    ]
    for kind, agg in VARIANTS:
        for task in result["tasks"]:
            cells = []
            for t in result["T_values"]:
                a = next(
                    x
                    for x in result["batch_vs_per_example_maps"]
                    if x["task"] == task and x["T"] == t and x["score"] == kind and x["aggregation"] == agg
                )
                cells.append(f"{_f(a['spearman'])} / {_f(a['kendall'])}")
            lines.append(f"| {kind}/{agg} | {task} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["## Calibration time (same batches, same machine, interleaved)", ""]
    lines += ["| task | batch s/batch | per-example s/batch | ratio |", "|---|---|---|---|"]
    for tm in result["timing"]:
        s = tm["seconds_per_batch"]
        lines.append(
            f"| {tm['task']} | {s['batch']:.3f} | {s['per_example']:.3f} | "
            f"{tm['ratio_per_example_to_batch']:.2f} |"
        )
    lines += [
        "",
        f"_{result['seconds']:.0f} s, --threads 1 on a 2-core CPU shared with a benchmark; git "
        f"{commit_label(git, short=True)}._",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _plot_per_example(result: Mapping[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = result["tasks"]
    fig = Figure(figsize=(4.5 * len(tasks), 3.6))
    FigureCanvasAgg(fig)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for estimator, style in (("batch", "-o"), ("per_example", "--s")):
            for kind, agg in (("fisher", "mean"), ("fisher", "sum")):
                sel = [
                    r
                    for r in result["stability"]
                    if r["task"] == task
                    and r["estimator"] == estimator
                    and r["score"] == kind
                    and r["aggregation"] == agg
                ]
                ax.errorbar(
                    [r["T"] for r in sel],
                    [r["spearman"] for r in sel],
                    yerr=[0.0 if math.isnan(r["spearman_sd"]) else r["spearman_sd"] for r in sel],
                    fmt=style,
                    capsize=2,
                    label=f"{estimator} {kind}/{agg}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration batches T")
        ax.set_ylabel("Spearman, disjoint calibration sets")
        ax.set_title(task)
        ax.set_ylim(0.7, 1.02)  # every mean here is above 0.85: a full [-1, 1] axis hides the differences
        ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.ablations {stability,contribution,per-example} ...``."""
    parser = argparse.ArgumentParser(prog="python -m bench.ablations")
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stability", help="rank-map stability vs T; score type / aggregation agreement")
    st.add_argument("--task", default="trec6")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    st.add_argument("--out", type=Path, default=Path("docs/results/ablations"))
    co = sub.add_parser("contribution", help="score vs accuracy drop when a module's adapter is removed")
    co.add_argument("--task", default="trec6")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--out", type=Path, default=Path("docs/results/ablations"))
    pe = sub.add_parser(
        "per-example", help="batch vs per-example estimator: disjoint-set rank-map stability and time"
    )
    pe.add_argument("--tasks", nargs="+", default=["trec6", "sms_spam"])
    pe.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    pe.add_argument("--out", type=Path, default=Path("docs/results/ablations"))
    for p in (st, co, pe):
        p.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.cmd == "stability":
        stability(args.task, args.seeds, args.out)
    elif args.cmd == "per-example":
        per_example_stability(args.tasks, args.seeds, args.out)
    else:
        contribution(args.task, args.seed, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
