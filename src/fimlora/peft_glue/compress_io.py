"""Read any PEFT LoRA (or AdaLoRA) adapter directory as factors and scales; write one back at new ranks.

What :func:`fimlora.compress_adapter` needs from an adapter on disk, with no model and no base weights:
``adapter_config.json`` and ``adapter_model.safetensors`` read with json/safetensors, and PEFT's rules for
what they mean (which ``rank_pattern``/``alpha_pattern`` key applies to a module, the scale ``alpha / r``
or rsLoRA's ``alpha / sqrt(r)``, AdaLoRA's ``alpha / (init_r + 1e-5)``, which variants change the forward
pass). Those rules are PEFT internals, so they live here.

Orientation: PEFT stores ``lora_A`` as ``(r, in)`` and ``lora_B`` as ``(out, r)`` for every linear layer,
GPT-2's ``Conv1D`` (``fan_in_fan_out``) included (its ``in``/``out`` are read from the base weight's
transposed shape), so the update is ``s * B @ A`` of shape ``(out, in)`` everywhere.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fimlora.peft_glue.layers import PEFT_MODEL_PREFIX
from fimlora.peft_glue.resize import pattern_key, scaled_alpha
from fimlora.peft_glue.verify import adapter_updates, check_updates, factor_update

__all__ = [
    "ADAPTER_FILES",
    "AdapterFactors",
    "LoraModuleFactors",
    "check_compressible_config",
    "module_alpha",
    "module_scale",
    "read_adapter_factors",
    "read_adapter_files",
    "write_lora_adapter",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The two files that make a PEFT adapter directory (what is read, and what is written)."""

# Inits that rewrite the base weights when PEFT builds the layer (also on reload): the adapter is only
# correct on top of the rewritten base, which depends on the rank, so a re-ranked copy would be wrong.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")
_ADALORA_EPS = 1e-5  # AdaLoRA divides by (ranknum + 1e-5); ranknum is init_r (not saved)


@dataclass(frozen=True)
class LoraModuleFactors:
    """One module of an adapter on disk: its update is ``scale * b @ a``.

    Attributes:
        a: LoRA-A as stored (AdaLoRA: ``E * A``), shape ``(r, in)``.
        b: LoRA-B as stored, shape ``(out, r)``.
        scale: The scale PEFT applies to ``b @ a``.
        key_prefix: The tensors' key without ``.lora_A.weight`` (e.g. ``base_model.model.<name>``).
        ref_alpha: With ``ref_rank``, the scale convention a rebuilt module keeps: at rank ``k`` it gets
            ``alpha = scaled_alpha(ref_alpha, ref_rank, k)``, so its scale is this module's (LoRA) or the
            config's nominal ``lora_alpha / init_r`` (AdaLoRA).
        ref_rank: See ``ref_alpha``.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    key_prefix: str
    ref_alpha: float
    ref_rank: int

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(in, out)``."""
        return int(self.a.shape[1]), int(self.b.shape[0])


@dataclass
class AdapterFactors:
    """An adapter directory read as factors (see :func:`read_adapter_factors`).

    Attributes:
        path: The directory read.
        peft_type: ``"LORA"`` or ``"ADALORA"`` (the latter converted to LoRA's form on reading).
        config: The LoRA config (a dict as in ``adapter_config.json``) the output starts from.
        modules: Module name (no ``base_model.model.`` prefix) -> its factors, in file order.
        other_tensors: Every other tensor (``modules_to_save`` copies, trainable tokens), carried over as-is.
        use_rslora: Whether scales are ``alpha / sqrt(r)``.
    """

    path: Path
    peft_type: str
    config: dict[str, Any]
    modules: dict[str, LoraModuleFactors]
    other_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    use_rslora: bool = False


def _module_name(key_prefix: str) -> str:
    return key_prefix[len(PEFT_MODEL_PREFIX) :] if key_prefix.startswith(PEFT_MODEL_PREFIX) else key_prefix


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter directory (no adapter_config.json); pass a directory written by "
            "save_pretrained or a `fimlora train` output"
        )
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is damaged ({e}); restore it or save the adapter again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not an object")
    return config


def _variant_fields() -> list[str]:
    """LoraConfig fields that switch on a LoRA variant, whose forward pass is not ``s * B @ A @ x`` (DoRA
    and others): PEFT tags them ``is_lora_variant``, so a variant added to PEFT is refused too. PEFT before
    0.20 tags none, so the variants those releases have are named here as well."""
    import dataclasses

    from peft import LoraConfig

    tagged = [f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")]
    known = ("use_dora", "use_qalora", "alora_invocation_tokens", "arrow_config")  # peft 0.15 to 0.19
    return tagged + [name for name in known if name not in tagged]


def _require_weights_file(path: Path) -> None:
    if not (path / "adapter_model.safetensors").is_file():
        extra = (
            " (only adapter_model.bin: save it again with safe_serialization=True)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"{path} has no adapter_model.safetensors{extra}")


def read_adapter_files(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter directory's ``adapter_config.json`` (a dict) and ``adapter_model.safetensors`` (tensors by
    saved name): the one reader of adapter files, for export and compress alike.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors`` (the message says
            which, and what to pass instead).
        ValueError: a config that is not a JSON object, or weights that cannot be read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = _read_config(path)
    _require_weights_file(path)
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"cannot read the adapter weights in {path} ({e}); pass an undamaged adapter"
        ) from None
    return config, tensors


def check_compressible_config(path: str | Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` and refuse what compression cannot represent exactly; cheap (no weights).

    Returns:
        The config.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors``.
        ValueError: another PEFT type, a LoRA variant (DoRA, ...), ``lora_bias``, LoRA on parameters
            (``target_parameters``), or an init that rewrites the base weights (PiSSA, OLoRA, ...).
    """
    path = Path(path)
    config = _read_config(path)
    _require_weights_file(path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "ADALORA":
        return config
    if peft_type != "LORA":
        raise ValueError(
            f"{path} holds a {config.get('peft_type')} adapter; compress handles LoRA adapters (and AdaLoRA, "
            "converted to LoRA)"
        )
    variants = [name for name in _variant_fields() if config.get(name)]
    if variants:
        label = "DoRA (use_dora)" if variants == ["use_dora"] else ", ".join(variants)
        raise ValueError(
            f"{path} is a LoRA variant adapter ({label}): its update is not scale * B @ A, so a compressed "
            "copy cannot reproduce it; compress plain LoRA adapters"
        )
    if config.get("lora_bias"):
        raise ValueError(
            f"{path} trains a bias in LoRA-B (lora_bias): compress handles plain LoRA factors only"
        )
    if config.get("target_parameters"):
        raise ValueError(
            f"{path} applies LoRA to parameters (target_parameters); compress handles layers only"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"{path} was initialised with init_lora_weights={init!r}, which rewrites the base weights at load "
            "time for its rank; convert it to plain LoRA first (save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    return config


def read_adapter_factors(path: str | Path) -> AdapterFactors:
    """Every LoRA module of an adapter directory as ``(A, B, scale)``, plus the tensors that are not LoRA.

    LoRA: the rank and alpha of each module follow PEFT (``rank_pattern``/``alpha_pattern`` matched as
    ``get_pattern_key`` does, else ``r``/``lora_alpha``); the scale is ``alpha / r`` or ``alpha / sqrt(r)``.
    AdaLoRA (the conversion of :func:`fimlora.peft_glue.adalora.adalora_to_lora`, from the saved tensors):
    ``A' = E * A`` over the kept triplets (PEFT saves only those), scale ``alpha / (init_r + 1e-5)``;
    modules with no kept triplet are left out.

    Raises:
        FileNotFoundError / ValueError: see :func:`check_compressible_config`; also a tensor file that
            cannot be read, LoRA on embeddings or convolutions, a rank the config contradicts, or
            ``lora_alpha <= 0``.
    """
    from peft.utils.other import get_pattern_key

    path = Path(path)
    config = check_compressible_config(path)
    _, tensors = read_adapter_files(path)
    if any(".lora_embedding_" in k for k in tensors):
        raise ValueError(f"{path}: LoRA on embedding layers can't be compressed (linear layers only)")
    peft_type = str(config["peft_type"]).upper()
    modules: dict[str, LoraModuleFactors] = {}
    used: set[str] = set()
    if peft_type == "LORA":
        use_rslora = bool(config.get("use_rslora"))
        r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
        rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
        alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            prefix = key[: -len(".lora_A.weight")]
            b_key = prefix + ".lora_B.weight"
            a, b = tensors[key], tensors.get(b_key)
            if b is None or a.dim() != 2 or b.dim() != 2:
                raise ValueError(
                    f"{path}: module {prefix} is not a linear LoRA pair (convolution or missing lora_B); "
                    "compress handles LoRA on linear layers only"
                )
            name = _module_name(prefix)
            r = int(a.shape[0])
            cfg_r = int(rank_pattern.get(get_pattern_key(list(rank_pattern), name), r0))
            if cfg_r != r or b.shape[1] != r:
                raise ValueError(
                    f"{path}: module {name} has rank {r} in its tensors but the config says {cfg_r}"
                )
            alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), alpha0))
            if not (math.isfinite(alpha) and alpha > 0):
                raise ValueError(f"{path}: module {name} has lora_alpha {alpha}; compress needs alpha > 0")
            scale = alpha / math.sqrt(r) if use_rslora else alpha / r
            modules[name] = LoraModuleFactors(a, b, scale, prefix, ref_alpha=alpha, ref_rank=r)
            used |= {key, b_key}
        out_config = dict(config)
    else:
        use_rslora = False
        init_r = int(config["init_r"])
        alpha = float(config.get("lora_alpha") or 0) or float(init_r)  # PEFT: alpha if alpha > 0 else r
        scale = alpha / (init_r + _ADALORA_EPS)
        for key in tensors:
            if not key.endswith(".lora_A"):
                continue
            prefix = key[: -len(".lora_A")]
            a, e_col, b = tensors[key], tensors.get(prefix + ".lora_E"), tensors.get(prefix + ".lora_B")
            if e_col is None or b is None:
                raise ValueError(f"{path}: AdaLoRA module {prefix} lacks lora_E or lora_B")
            used |= {key, prefix + ".lora_E", prefix + ".lora_B"}
            if a.shape[0] == 0:  # every triplet pruned: nothing to keep
                continue
            a_eff = (a.float() * e_col.float()).to(
                a.dtype
            )  # (k, in): E folded into A, as adalora_to_lora does
            modules[_module_name(prefix)] = LoraModuleFactors(
                a_eff, b, scale, prefix, ref_alpha=alpha, ref_rank=init_r
            )
        out_config = _lora_config_from_adalora(config, r=init_r, alpha=alpha)
    if not modules:
        raise ValueError(f"{path}: the adapter has no LoRA modules with a non-zero rank")
    other = {k: v for k, v in tensors.items() if k not in used}
    return AdapterFactors(path, peft_type, out_config, modules, other, use_rslora)


def _lora_config_from_adalora(config: Mapping[str, Any], *, r: int, alpha: float) -> dict[str, Any]:
    """The LoRA config an AdaLoRA adapter becomes: its targets, dropout, bias, modules to save and task."""
    from peft import LoraConfig

    keep = (
        "base_model_name_or_path",
        "revision",
        "task_type",
        "target_modules",
        "exclude_modules",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
    )
    fields = {k: config[k] for k in keep if config.get(k) is not None}
    lora_alpha: Any = int(alpha) if float(alpha).is_integer() else alpha  # LoraConfig types it int
    plain = LoraConfig(r=r, lora_alpha=lora_alpha, **fields).to_dict()
    return json.loads(json.dumps(plain, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def write_lora_adapter(
    directory: str | Path,
    source: AdapterFactors,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> dict[str, Any]:
    """Write a plain LoRA adapter that vanilla PEFT loads: the given modules at their new ranks.

    Modules of ``source`` not in ``factors`` are dropped: ``target_modules`` becomes the exact list of the
    kept modules' names (PEFT cannot hold rank 0). Every kept module gets an exact-match key in
    ``rank_pattern`` and ``alpha_pattern``; ``r``, ``lora_alpha`` and ``use_rslora`` stay the source's (AdaLoRA:
    ``init_r`` and its alpha). Other tensors (``modules_to_save``) and other files of the source directory
    (tokenizer, model card) are copied unchanged.

    Args:
        directory: An existing, empty directory (e.g. a staging directory).
        source: What :func:`read_adapter_factors` returned.
        factors: module name -> ``(A (k, in), B (out, k), alpha)``.

    Returns:
        The config written to ``adapter_config.json``.

    Raises:
        AdapterCheckError: the written config and tensors, as the installed PEFT reads them, do not make
            the updates ``factors`` describe (:func:`fimlora.peft_glue.verify.adapter_updates`); write into
            a staging directory that is thrown away on error.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    if not factors:
        raise ValueError("the budget keeps no LoRA module; raise the budget or set min_rank >= 1")
    unknown = [n for n in factors if n not in source.modules]
    if unknown:
        raise ValueError(f"modules {unknown[:3]} are not in the source adapter")
    tensors: dict[str, torch.Tensor] = dict(source.other_tensors)
    names = [n for n in source.modules if n in factors]
    for name in names:
        a, b, _ = factors[name]
        prefix = source.modules[name].key_prefix
        tensors[prefix + ".lora_A.weight"] = a.contiguous()
        tensors[prefix + ".lora_B.weight"] = b.contiguous()
    config = dict(source.config)
    config["target_modules"] = names
    config["rank_pattern"] = {pattern_key(n): int(factors[n][0].shape[0]) for n in names}
    config["alpha_pattern"] = {pattern_key(n): factors[n][2] for n in names}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    intended = {
        n: factor_update(
            factors[n][0],
            factors[n][1],
            module_scale(factors[n][2], int(factors[n][0].shape[0]), use_rslora=source.use_rslora),
        )
        for n in names
    }
    what = "writing the compressed adapter"
    check_updates(intended, adapter_updates(config, tensors, what=what), what=what)
    for item in source.path.iterdir():
        if item.is_file() and item.name not in (*ADAPTER_FILES, "adapter_model.bin"):
            shutil.copy2(item, out / item.name)
    return config


def module_alpha(module: LoraModuleFactors, k: int, *, use_rslora: bool) -> float | int:
    """The alpha of ``module`` rebuilt at rank ``k``: its scale convention kept (see ``ref_alpha``)."""
    return scaled_alpha(module.ref_alpha, module.ref_rank, k, use_rslora=use_rslora)


def module_scale(alpha: float, k: int, *, use_rslora: bool) -> float:
    """The scale PEFT computes for a module of rank ``k`` and ``alpha`` (``alpha / r`` or ``/ sqrt(r)``)."""
    return alpha / math.sqrt(k) if use_rslora else alpha / k
