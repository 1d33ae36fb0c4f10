"""A rank map as the configuration trainers accept: a PEFT ``LoraConfig`` with patterns, or axolotl keys.

For models that are sharded before training (FSDP2, ``accelerate``, DeepSpeed), ranks cannot be changed
in place: the adapter is built at its ranks on a fresh model, then sharded. :func:`lora_config_with_ranks`
turns a base ``LoraConfig`` and a rank map into the config to build it with (``get_peft_model`` reads
``rank_pattern``/``alpha_pattern``). :func:`lora_config_dict` and :func:`axolotl_lora_config` write that
config for ``LoraConfig(**json)`` and for axolotl's YAML, whose ``lora_rank_pattern``/``lora_alpha_pattern``
it forwards to PEFT (``src/axolotl/utils/schemas/peft.py``: ``dict[str, PositiveInt]`` each).

Keys are ``^<escaped module name>$`` (:func:`~fimlora.peft_glue.resize.pattern_key`): PEFT matches a key
``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` and takes the first that matches, and silently ignores a
key that matches nothing, so each key here matches exactly one module and names are checked against the
model when one is given.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from fimlora.peft_glue.layers import PEFT_MODEL_PREFIX, lora_modules
from fimlora.peft_glue.resize import rank_patterns, scaled_alpha

__all__ = ["axolotl_lora_config", "lora_config_dict", "lora_config_with_ranks"]


def lora_config_with_ranks(
    base_config: Any,
    rank_map: Mapping[str, int],
    *,
    model: nn.Module | None = None,
    adapter_name: str = "default",
    adjust_scaling_factors: bool = True,
) -> Any:
    """A copy of ``base_config`` whose ``rank_pattern``/``alpha_pattern`` give each module its rank.

    When the map drops modules (rank 0), ``target_modules`` becomes the exact list of the modules kept.

    The flow for a model that is sharded to train::

        stats = estimate_module_scores(sharded_peft_model, my_batches, cfg)        # every process
        rank_map = plan_rank_map(stats.scores(), stats.shapes(), cfg, r=base.r)
        model = get_peft_model(fresh_base_model, lora_config_with_ranks(base, rank_map))
        # ... fully_shard(model) / accelerator.prepare(model), train, save ...

    Args:
        base_config: the ``peft.LoraConfig`` calibrated with (its ``r`` and ``lora_alpha`` set the scale);
            not modified. Its own ``rank_pattern``/``alpha_pattern`` are replaced.
        rank_map: module name (as in a :class:`~fimlora.RankMap`, without ``base_model.model.``) -> rank.
        model: optional check of the names: a PEFT model (sharded or not) whose LoRA modules the map must
            cover exactly, or the plain model to be wrapped, which must contain every module named.
        adapter_name: the adapter of ``model`` to check against (PEFT models only).
        adjust_scaling_factors: keep every module's scale alpha/r (rsLoRA: alpha/sqrt(r)) by writing
            alpha_i = alpha*r_i/r (alpha*sqrt(r_i/r)) to ``alpha_pattern``; False leaves it empty (every
            module uses ``lora_alpha``, so its scale changes with its rank).

    Returns:
        A new ``LoraConfig``; ``get_peft_model(base_model, it)`` builds LoRA layers at the map's ranks.

    Raises:
        TypeError: ``base_config`` is not a ``LoraConfig``.
        ValueError: a rank that is not an integer >= 0, every rank 0, or names that do not match ``model``.
    """
    from peft import LoraConfig

    if not isinstance(base_config, LoraConfig):
        raise TypeError(
            f"base_config must be a peft.LoraConfig, got {type(base_config).__name__}: pass the config "
            "the calibrated model was built with"
        )
    all_ranks: dict[str, int] = {}
    for name, r in rank_map.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rank of module {name!r} must be an integer >= 0 (0: dropped), got {r!r}")
        if name.startswith(PEFT_MODEL_PREFIX):
            name = name[len(PEFT_MODEL_PREFIX) :]
        all_ranks[name] = int(r)
    if not all_ranks:
        raise ValueError("the rank map is empty: pass the map computed on the calibrated model")
    if model is not None:
        _check_names(all_ranks, model, adapter_name)
    ranks = {n: r for n, r in all_ranks.items() if r > 0}
    if not ranks:
        raise ValueError("every rank in the map is 0, which leaves no LoRA module; raise the budget")
    alphas = None
    if adjust_scaling_factors:
        alphas = {
            n: scaled_alpha(base_config.lora_alpha, base_config.r, r, use_rslora=base_config.use_rslora)
            for n, r in ranks.items()
        }
    config = copy.deepcopy(base_config)
    config.rank_pattern, config.alpha_pattern = rank_patterns(ranks, alphas)
    if len(ranks) < len(all_ranks):  # modules at rank 0: target exactly the others
        config.target_modules = sorted(ranks)
    return config


def _check_names(ranks: Mapping[str, int], model: nn.Module, adapter_name: str) -> None:
    try:
        expected: set[str] | None = set(lora_modules(model, adapter_name))
    except TypeError:  # not a PEFT model: the plain model about to be wrapped
        expected = None
    if expected is not None:
        missing = sorted(expected - set(ranks))
        unknown = sorted(set(ranks) - expected)
        if missing or unknown:
            raise ValueError(
                "the rank map does not match the model's LoRA modules: "
                + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} " if missing else "")
                + (f"unknown {unknown[:3]}{' ...' if len(unknown) > 3 else ''}" if unknown else "")
                + "; compute the map on a model built with the same LoraConfig"
            )
        return
    names = dict(model.named_modules())
    unknown = sorted(n for n in ranks if n not in names)
    if unknown:
        raise ValueError(
            f"the model has no modules {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: PEFT would silently "
            "ignore their patterns; compute the map on this architecture (module names without "
            f"{PEFT_MODEL_PREFIX!r})"
        )


def lora_config_dict(config: Any) -> dict[str, Any]:
    """A ``LoraConfig`` as JSON-ready data, as PEFT's ``save_pretrained`` writes it (sets as sorted lists).

    Load it back with ``LoraConfig(**LoraConfig.from_json_file(path))``.
    """
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
        elif hasattr(value, "value") and type(value).__module__.startswith("peft"):  # enums
            data[key] = value.value
    return dict(data)


def axolotl_lora_config(config: Any) -> dict[str, Any]:
    """The axolotl config keys that reproduce a ``LoraConfig`` with per-module ranks and alphas.

    axolotl builds its ``LoraConfig`` from ``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules`` (or ``lora_target_linear: true``), ``peft_use_rslora``, ``peft_use_dora``,
    ``lora_fan_in_fan_out``, ``peft_layers_to_transform`` and ``lora_modules_to_save``, and forwards
    ``lora_rank_pattern``/``lora_alpha_pattern`` to PEFT's ``rank_pattern``/``alpha_pattern``.

    Raises:
        ValueError: an alpha that is not a whole number: axolotl's schema takes integers only
            (``lora_alpha: int``, ``lora_alpha_pattern: dict[str, PositiveInt]``); choose a ``lora_alpha``
            that is a multiple of ``r`` (alpha_i = alpha*r_i/r is then whole; rsLoRA's alpha*sqrt(r_i/r)
            rarely is).
    """
    out: dict[str, Any] = {"adapter": "lora", "lora_r": int(config.r)}
    out["lora_alpha"] = _whole(config.lora_alpha, "lora_alpha")
    out["lora_dropout"] = float(config.lora_dropout)
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        out["lora_target_linear"] = True
    elif isinstance(targets, str):
        out["lora_target_modules"] = targets  # a regex, as PEFT reads it
    elif targets:
        out["lora_target_modules"] = sorted(targets)
    if config.use_rslora:
        out["peft_use_rslora"] = True
    if config.use_dora:
        out["peft_use_dora"] = True
    if config.fan_in_fan_out:
        out["lora_fan_in_fan_out"] = True
    if config.layers_to_transform is not None:
        layers = config.layers_to_transform
        out["peft_layers_to_transform"] = [layers] if isinstance(layers, int) else list(layers)
    if config.modules_to_save:
        out["lora_modules_to_save"] = list(config.modules_to_save)
    if config.rank_pattern:
        out["lora_rank_pattern"] = {k: int(v) for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        out["lora_alpha_pattern"] = {k: _whole(v, f"alpha of {k}") for k, v in config.alpha_pattern.items()}
    return out


def _whole(value: float, what: str) -> int:
    if float(value) != int(value) or value <= 0:
        raise ValueError(
            f"{what} = {value} is not a positive whole number, and axolotl reads integer alphas only; "
            "choose a lora_alpha that is a multiple of r (then alpha*r_i/r is whole), or use lora_config.json"
        )
    return int(value)
