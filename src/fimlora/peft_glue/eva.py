"""EVA with a budget in parameters: a replacement for a private step of PEFT's EVA, version-checked.

EVA (Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation",
2024) ranks every candidate component of every layer by explained variance and keeps the best ``r * n``:
a budget in *ranks*. Holding a budget in *parameters* instead needs a different choice inside PEFT's
``_get_eva_state_dict``, in a function nested there that cannot be replaced; :class:`CostWeightedEvaRanks`
stands in for the ``collections.Counter`` it calls (a global of ``peft.tuners.lora.eva``).

That reaches into PEFT's private code, so it is checked against the PEFT versions whose code it was
written for (:data:`EVA_PATCH_PEFT_VERSIONS`) and refuses others with a one-line error. PEFT's own EVA
(fimlora's ``budget_unit="ranks"``) needs none of this.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from typing import Any, cast

import torch
from torch import nn

from fimlora.allocate import select_within_budget
from fimlora.errors import UsageError
from fimlora.peft_glue.layers import lora_modules, module_shapes

__all__ = [
    "EVA_PATCH_PEFT_VERSIONS",
    "CostWeightedEvaRanks",
    "check_eva_patch_supported",
    "eva_state_dict_within_params",
]

EVA_PATCH_PEFT_VERSIONS = ">=0.15,<0.23"
"""PEFT versions whose EVA :class:`CostWeightedEvaRanks` may patch. Written for 0.21 (0.21.2) and tested
with 0.15.0 and 0.22.0 (CI's oldest and newest sets): the two names it replaces (``Counter`` as called by
``_get_rank_distribution``, and ``find_equal_values``) and the code around them are unchanged from 0.15.0 to
0.22.0 (``peft/tuners/lora/eva.py`` is byte-identical in 0.21.2 and 0.22.0). 0.23 and later are unknown
until checked: then widen this range."""


def check_eva_patch_supported() -> None:
    """Raise unless the installed PEFT is in :data:`EVA_PATCH_PEFT_VERSIONS`.

    Raises:
        UsageError: another PEFT version (or none); the message says which is installed and what to do.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        installed = metadata.version("peft")
    except metadata.PackageNotFoundError:  # e.g. imported from a source tree without metadata
        installed = "unknown"
    try:
        # Pre-releases count: 0.22.1.dev0 is inside the range, 0.23.0.dev0 is not (PEP 440's "<").
        supported = SpecifierSet(EVA_PATCH_PEFT_VERSIONS).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UsageError(
            f"EVA with budget_unit='params' patches PEFT's EVA internals, written for peft "
            f"{EVA_PATCH_PEFT_VERSIONS} but peft {installed} is installed: install a supported version "
            f"(pip install 'peft{EVA_PATCH_PEFT_VERSIONS}') or use budget_unit='ranks' (PEFT's own EVA)"
        )


def eva_state_dict_within_params(
    model: nn.Module,
    batches: list[dict[str, Any]],
    budget: int,
    *,
    unit: str = "params",
    forward_fn: Callable[[nn.Module, Mapping[str, Any]], Any],
    prepare_model_inputs_fn: Callable[..., torch.Tensor],
    prepare_layer_inputs_fn: Callable[..., torch.Tensor],
) -> dict[str, torch.Tensor]:
    """PEFT's EVA state dict (layer name -> A, shape (rank, in)) with ranks that hold ``budget``: parameters
    (``unit="params"``, a component of module m costs in_m + out_m) or a rank sum (``unit="ranks"``).

    Every component a module may get (round(rho * r), PEFT's maximum) is made a candidate by asking PEFT for
    rank round(rho * r) at rho = 1; :class:`CostWeightedEvaRanks` then chooses among them. The callables
    are PEFT's ``get_eva_state_dict`` arguments of the same names.

    Raises:
        UsageError: the installed PEFT is outside :data:`EVA_PATCH_PEFT_VERSIONS`.
    """
    from peft import get_eva_state_dict

    cfg: Any = copy.copy(cast(Any, model).peft_config["default"])
    most = round(int(cfg.r) * cfg.eva_config.rho)
    cfg.r = most
    cfg.eva_config = dataclasses.replace(cfg.eva_config, rho=1.0)
    mods = lora_modules(model)
    cost = {n: (i + j if unit == "params" else 1) for n, (i, j) in module_shapes(mods).items()}
    by_id = {id(m): n for n, m in mods.items()}
    costs = {full: cost[by_id[id(m)]] for full, m in model.named_modules() if id(m) in by_id}
    selection = CostWeightedEvaRanks(costs, budget, most)
    with selection.installed():
        state = get_eva_state_dict(
            model,
            batches,
            peft_config=cfg,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            show_progress_bar=False,
        )
    return selection.restore_choice(state)


class CostWeightedEvaRanks:
    """EVA's rank distribution with a budget in parameters, swapped into PEFT's EVA while installed.

    PEFT chooses EVA's ranks in ``_get_rank_distribution``, a function nested in ``_get_eva_state_dict``
    that cannot be replaced. It sorts every candidate component by explained-variance ratio, takes the
    first ``rank_budget`` and counts them per layer with ``collections.Counter``, looked up in the EVA
    module's globals. When every candidate fits in ``rank_budget`` (the caller asks for rank round(rho * r)
    at rho = 1), that ``Counter`` receives the layer name of *every* component in PEFT's order; standing in
    for it, this object keeps the components that fit in the parameter budget (:func:`select_within_budget`,
    cost in_m + out_m) and returns their counts. Everything else stays PEFT's: convergence is checked on the
    chosen components only, and a layer given 0 components is later put back to its base layer.

    One thing is undone afterwards: layers that see the same input share one SVD, and PEFT swaps their counts
    so that the layer holding the SVD has the largest (its convergence covers them all). With equal costs
    that is harmless; with different ones (LLaMA's k/v projections are narrower than q) it would change the
    parameter count, so :meth:`restore_choice` gives each layer back its chosen count, as a prefix of the
    shared components. ``find_equal_values`` is wrapped to learn those groups.
    """

    def __init__(self, costs: Mapping[str, int], budget: int, most: int) -> None:
        self.costs = dict(costs)  # PEFT layer name (with base_model.model.) -> in + out
        self.budget = budget
        self.most = most
        self.counts: dict[str, int] | None = None
        self.groups: list[list[str]] = []

    def __call__(self, ordered: Iterable[str]) -> Counter[str]:
        """``Counter(layer names of the chosen components)``, from the names of all components, best first."""
        names = list(ordered)
        if len(names) != self.most * len(self.costs) or not set(names) <= set(self.costs):
            raise RuntimeError(
                "EVA's rank distribution did not receive every candidate component; this PEFT version's EVA "
                "differs from the one fimlora's budget_unit='params' was written for (peft 0.21)"
            )
        scores = [float(len(names) - i) for i in range(len(names))]  # PEFT's order, best first
        keep = select_within_budget(scores, [self.costs[n] for n in names], self.budget)
        counts = Counter(n for n, k in zip(names, keep, strict=True) if k)
        self.counts = {n: counts.get(n, 0) for n in self.costs}
        return counts

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Stand in for PEFT EVA's ``Counter`` and record its equal-input groups; restored on exit or error.

        Raises:
            UsageError: the installed PEFT is outside :data:`EVA_PATCH_PEFT_VERSIONS` (nothing is patched).
        """
        check_eva_patch_supported()
        from peft.tuners.lora import eva

        counter, find_equal_values = eva.Counter, eva.find_equal_values
        if counter is not Counter:
            raise RuntimeError("PEFT's EVA rank distribution is already replaced (nested EVA runs?)")

        def record_groups(hashes: dict[str, Any]) -> dict[Any, list[str]]:
            groups = find_equal_values(hashes)
            self.groups = [list(names) for names in groups.values()]
            return groups

        setattr(eva, "Counter", self)  # noqa: B010 - a module global, replaced on purpose
        setattr(eva, "find_equal_values", record_groups)  # noqa: B010
        try:
            yield
        finally:
            setattr(eva, "Counter", counter)  # noqa: B010
            setattr(eva, "find_equal_values", find_equal_values)  # noqa: B010

    def restore_choice(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with every layer at its chosen count (undoing PEFT's swaps within equal-input groups).

        Raises:
            RuntimeError: the distribution never ran, or PEFT's ranks are not the chosen ones up to those swaps.
        """
        if self.counts is None:
            raise RuntimeError("EVA's rank distribution never ran (no layer computed an SVD)")
        counts = self.counts
        for group in self.groups:
            if sorted(state[n].shape[0] for n in group) != sorted(counts[n] for n in group):
                raise RuntimeError(f"EVA's ranks of the equal-input layers {group} are not the chosen ones")
            shared = state[max(group, key=lambda n: state[n].shape[0])]  # (most of the group, in)
            for name in group:
                state[name] = shared[: counts[name]].clone()
        wrong = sorted(n for n, u in state.items() if u.shape[0] != counts.get(n))
        if wrong or set(state) != set(counts):
            raise RuntimeError(
                f"EVA's ranks are not the chosen ones ({(wrong or sorted(set(state) ^ set(counts)))[:3]})"
            )
        return state
