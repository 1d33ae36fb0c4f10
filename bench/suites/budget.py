"""Budgets: a spec's ``budget`` label -> the LoRA rank r of the uniform baseline and each method's options.

A budget ``"rN"`` means *the trainable LoRA parameters of uniform LoRA at rank N on every targeted
linear layer*, ``P = N * sum_m (in_m + out_m)``. Each method is configured to spend exactly that:

==================  =======================================================================
uniform             r = N everywhere (defines P)
fim and controls    ``FimConfig(budget_unit="params")``: sum r_m (in_m + out_m) <= P, least slack
                    (fim, fim-variance, and the controls random and fim-shuffled)
l1ra, lrlora        ``budget_unit="params"`` (their reallocation holds P exactly)
adalora, eva        ``budget_unit="params"``: PEFT's choice made cost-weighted, sum r_m
                    (in_m + out_m) <= P, slack below one rank of any module left out;
                    the record stores their actual LoRA parameters, and the report
                    flags a deviation from P above 2 %.
gora                ``budget_unit="params"``: fimlora's exact allocator, as fim
warmstart           ``budget_unit="params"``: compress's selection of directions after the warm-up
fim-spectrum        ``budget_unit="params"``: exact global selection of directions (as
                    ``fimlora compress``), slack below one rank of the cheapest module that
                    could still grow
==================  =======================================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bench.harness import check_methods

__all__ = [
    "FIM_KEYS",
    "PARAM_BUDGET_OPTION_METHODS",
    "PROTOCOL_FIM",
    "PROTOCOL_OPTIONS",
    "budget_rank",
    "method_settings",
]

_BUDGET = re.compile(r"r(\d+)")

FIM_KEYS = (
    "calibration_batches",
    "score",
    "aggregation",
    "r_min",
    "r_max",
    "adjust_scaling_factors",
    "score_power",
    "normalize",
    "estimator",
)
"""Spec overrides that are passed to :class:`fimlora.FimConfig` (fim / fim-variance only)."""

PROTOCOL_FIM: dict[str, Any] = {
    "calibration_batches": 8,
    "aggregation": "mean",
    "score_power": 1.0,
    "normalize": "none",
    "estimator": "batch",
    "adjust_scaling_factors": True,
}
"""FimConfig's allocation settings as the benchmark protocol fixed them (fimlora's defaults when the grids were
written), set explicitly for ``fim`` and its controls. A later change of a library default (issue 13 makes the
chosen variant the default) then cannot change what an existing spec runs: ``fim`` in a grid stays plain
FIM-LoRA, and a variant says what it changes in its overrides."""

PROTOCOL_OPTIONS: dict[str, dict[str, Any]] = {
    "fim": {"gradient_init": False},
    "fim-spectrum": {"normalize": True},
    "l1ra": {"start": "uniform"},
}
"""Method options fixed the same way: the knobs that the allocation variants of issue 13 turn."""

PARAM_BUDGET_OPTION_METHODS: tuple[str, ...] = (
    "l1ra",
    "lrlora",
    "adalora",
    "eva",
    "gora",
    "fim-spectrum",
    "warmstart",
)
"""Training-time methods whose options take ``budget_unit``; the bench sets it to ``"params"``. A
deliberate selection (the methods with that option), each checked against fimlora's registry."""


def budget_rank(budget: str) -> int:
    """``"r8"`` -> 8.

    Raises:
        ValueError: a label that is not ``r<N>`` with N >= 1.
    """
    match = _BUDGET.fullmatch(budget)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"`budget` must look like 'r8' (uniform LoRA rank on every layer), got {budget!r}")
    return int(match.group(1))


def method_settings(
    method: str, overrides: Mapping[str, Any], *, show_progress: bool = False
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The fimlora method name, ``RunConfig.fim`` and ``RunConfig.method_options`` for a bench method.

    Args:
        method: Bench method (``"fim-variance"`` is fimlora's ``fim`` with ``score="variance"``).
        overrides: Spec overrides; :data:`FIM_KEYS` go to the FIM config, ``method_options`` (a mapping) to
            the method's constructor.
        show_progress: Calibration progress bar.

    Raises:
        ValueError: a method that is neither in fimlora's method registry nor a bench variant, or
            ``fim-variance`` with another score.
    """
    check_methods([method], "method")
    check_methods(PARAM_BUDGET_OPTION_METHODS, "PARAM_BUDGET_OPTION_METHODS")
    fim: dict[str, Any] = {}
    name = "fim" if method == "fim-variance" else method
    options: dict[str, Any] = {
        **PROTOCOL_OPTIONS.get(name, {}),
        **dict(overrides.get("method_options") or {}),
    }
    if method in ("fim", "fim-variance", "random", "fim-shuffled"):
        # The controls take fim's FimConfig (same bounds and budget); only fim-variance is renamed.
        fim = {**PROTOCOL_FIM, "budget_unit": "params", "show_progress": show_progress}
        fim["score"] = "variance" if method == "fim-variance" else "fisher"
        for key in FIM_KEYS:
            if key in overrides:
                fim[key] = overrides[key]
        if method == "fim-variance" and overrides.get("score", "variance") != "variance":
            raise ValueError("fim-variance fixes score='variance'; use method 'fim' for other scores")
        if method == "fim-shuffled" and options.get("source", "fim") in PARAM_BUDGET_OPTION_METHODS:
            # a shuffle of another method's map: the control hands its own budget (fim's, above) to that
            # method; the source's other options are fixed here
            source_options = dict(PROTOCOL_OPTIONS.get(options["source"], {}))
            options["source_options"] = {**source_options, **dict(options.get("source_options") or {})}
    elif method in PARAM_BUDGET_OPTION_METHODS:
        options.setdefault("budget_unit", "params")
    elif method != "uniform":
        # Registered in fimlora, but the bench does not know how to hold its parameter budget.
        raise ValueError(
            f"unknown bench method {method!r}: fimlora has it, but bench.suites.budget does not know how "
            "to give it the budget (add it to PARAM_BUDGET_OPTION_METHODS if it takes budget_unit)"
        )
    return name, fim, options
