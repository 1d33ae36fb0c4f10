"""Export an adapter in the form a serving engine loads correctly.

A fimlora adapter is plain PEFT LoRA with per-module ranks (``rank_pattern``) and per-module alphas
(``alpha_pattern``): module i computes ``s_i · B_i A_i x`` with ``s_i = α_i / r_i`` (rsLoRA: ``α_i / √r_i``).
Serving engines do not all read those patterns:

* vLLM pads every module to one rank and applies one scale ``lora_alpha / r`` to all of them; SGLang
  refuses per-module patterns. Both load the ``padded`` export: every scale folded into B and every module
  zero-padded to the largest rank, ``r = lora_alpha = R`` (scale 1 everywhere).
* llama.cpp (``convert_lora_to_gguf.py``) keeps each tensor's own rank but only one ``lora_alpha`` per
  adapter, and scales module i by ``lora_alpha / r_i`` (``r_i`` read from the tensor's shape). The raw
  adapter converts without a warning and is wrong wherever ``α_i ≠ lora_alpha``. The ``llama.cpp`` export
  keeps every module at its own rank and folds ``s_i · r_i / α`` into B, so ``α / r_i`` gives back ``s_i``
  exactly; it keeps ``rank_pattern`` and drops ``alpha_pattern``, so PEFT (which also scales by
  ``α / r_i`` then) loads it to the same outputs. It is smaller than the padded file.
* ``peft`` copies the adapter as it is (PEFT and transformers read the patterns).

Each export writes ``SERVING.md`` next to the adapter, naming the engines it is correct for.
The round trip through a real llama.cpp is ``tests/serving/test_llama_cpp_round_trip.py``
(``docs/serving.md`` has the measured figures).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.io import package_versions, staged_directory
from fimlora.peft_glue.compress_io import read_adapter_files
from fimlora.peft_glue.layers import PEFT_MODEL_PREFIX
from fimlora.peft_glue.verify import adapter_updates, check_updates

__all__ = ["ENGINES", "NOTE_FILE", "export_adapter", "export_uniform"]

ENGINES = ("padded", "llama.cpp", "peft")
"""Export forms: ``padded`` (vLLM, SGLang, llama.cpp, PEFT), ``llama.cpp`` (own ranks), ``peft`` (as is)."""

NOTE_FILE = "SERVING.md"
"""The note every export writes: which engines the files are correct for, and how they were made."""

_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def export_adapter(
    model_or_adapter_dir: nn.Module | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    engine: str = "padded",
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write a copy of a LoRA adapter that ``engine`` serves with the same outputs as PEFT.

    Args:
        model_or_adapter_dir: a PEFT model, or a directory written by ``save_pretrained``.
        out_dir: where to write; must not exist or be empty unless ``overwrite``.
        engine: ``"padded"`` (scales folded into B, every module zero-padded to the largest rank; for
            vLLM, SGLang, llama.cpp and PEFT), ``"llama.cpp"`` (every module at its own rank, scales folded
            into B for llama.cpp's ``lora_alpha / r_i``; for llama.cpp and PEFT, smaller than padded) or
            ``"peft"`` (the files as they are).
        adapter_name: which adapter of a model to export.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path, holding ``adapter_config.json``, ``adapter_model.safetensors`` and
        ``SERVING.md`` (plus, for ``"peft"``, every other file of the source directory).

    Raises:
        ValueError: unknown engine, an adapter the engine's form cannot hold (DoRA, LoRA on embeddings,
            ranks that disagree with the config), or a config or weights file that cannot be read.
        FileNotFoundError: the source is not a PEFT adapter directory.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        AdapterCheckError: the exported config and tensors, as the installed PEFT reads them, do not make
            the source adapter's updates; nothing is written.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; choose another directory or pass overwrite=True"
        )
    if isinstance(model_or_adapter_dir, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            model_or_adapter_dir.save_pretrained(  # type: ignore[operator]
                tmp, selected_adapters=[adapter_name]
            )
            src = Path(tmp) / adapter_name if adapter_name != "default" else Path(tmp)
            return _export_dir(src, out, engine, source_label="a PEFT model in memory")
    src = Path(model_or_adapter_dir)
    return _export_dir(src, out, engine, source_label=str(src))


def export_uniform(
    model_or_adapter_dir: nn.Module | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write an equivalent single-rank adapter: scale folded into B, every module zero-padded to the max rank.

    The same as ``export_adapter(..., engine="padded")``. The result has ``r = lora_alpha = max rank`` and
    no patterns (scale 1 everywhere), the form vLLM, SGLang and llama.cpp load correctly. Padding rows of A
    and columns of B are zero, so outputs are unchanged.

    Args:
        model_or_adapter_dir: a PEFT model, or a directory written by ``save_pretrained``.
        out_dir: where to write; must not exist or be empty unless ``overwrite``.
        adapter_name: which adapter of a model to export.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    return export_adapter(
        model_or_adapter_dir, out_dir, engine="padded", adapter_name=adapter_name, overwrite=overwrite
    )


@dataclass(frozen=True)
class _LoraModule:
    """One LoRA module of an adapter file: its tensor-key prefix, module name, rank and PEFT scale."""

    prefix: str
    name: str
    rank: int
    scale: float


def _lora_modules(src: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[_LoraModule]:
    """Every LoRA module with the scale PEFT gives it; refuses what a folded export cannot hold."""
    from peft.utils.other import get_pattern_key

    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{src}: only plain LoRA adapters (no DoRA) can be exported to a folded form")
    if any(".lora_embedding_" in k for k in tensors):
        raise ValueError(f"{src}: LoRA on embeddings can't be exported to a folded form")
    alpha, r0 = config["lora_alpha"], config["r"]
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    modules = []
    for a_key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        prefix = a_key[: -len(".lora_A.weight")]
        name = prefix[len(PEFT_MODEL_PREFIX) :] if prefix.startswith(PEFT_MODEL_PREFIX) else prefix
        r = int(tensors[a_key].shape[0])
        cfg_r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), r0)
        if cfg_r != r:
            raise ValueError(f"{src}: module {name} has rank {r} but the config says {cfg_r}")
        a_i = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), alpha)
        scale = a_i / math.sqrt(r) if config.get("use_rslora") else a_i / r
        modules.append(_LoraModule(prefix, name, r, scale))
    if not modules:
        raise ValueError(f"{src}: the adapter has no LoRA modules (no *.lora_A.weight tensors)")
    return modules


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    # Scaled in fp32 and cast back, so a bf16/fp16 adapter stays in its dtype with one rounding.
    return (t.float() * factor).to(t.dtype)


def _padded(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], modules: list[_LoraModule]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    r_max = max(m.rank for m in modules)
    out = dict(tensors)
    for m in modules:
        a, b = tensors[m.prefix + ".lora_A.weight"], tensors[m.prefix + ".lora_B.weight"]
        a_pad = torch.zeros(r_max, a.shape[1], dtype=a.dtype)
        b_pad = torch.zeros(b.shape[0], r_max, dtype=b.dtype)
        a_pad[: m.rank] = a
        b_pad[:, : m.rank] = _scaled(b, m.scale)
        out[m.prefix + ".lora_A.weight"], out[m.prefix + ".lora_B.weight"] = a_pad, b_pad
        if m.prefix + ".lora_B.bias" in tensors:
            out[m.prefix + ".lora_B.bias"] = _scaled(tensors[m.prefix + ".lora_B.bias"], m.scale)
    new_config = dict(config, r=r_max, lora_alpha=r_max, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return new_config, out


def _own_ranks(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], modules: list[_LoraModule]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    # llama.cpp scales module i by alpha / r_i (r_i from the tensor); fold s_i · r_i / alpha into B so the
    # product is s_i again. Any alpha != 0 works (llama.cpp reads 0 as "scale 1"); keeping the config's
    # leaves B unchanged for an adapter that already used one alpha.
    if any(k.endswith(".lora_B.bias") for k in tensors):
        raise ValueError(
            "llama.cpp has no LoRA bias (convert_lora_to_gguf.py stops at lora_B.bias tensors); "
            "export an adapter trained without lora_bias"
        )
    alpha = float(config["lora_alpha"]) or float(config["r"])
    out = dict(tensors)
    for m in modules:
        factor = m.scale * m.rank / alpha
        out[m.prefix + ".lora_B.weight"] = _scaled(tensors[m.prefix + ".lora_B.weight"], factor)
    # rank_pattern stays (PEFT needs it to build each module at its rank); with no alpha_pattern and no
    # rsLoRA, PEFT's scale is alpha / r_i too, so PEFT and llama.cpp both reproduce the source adapter.
    return dict(config, lora_alpha=alpha, use_rslora=False, alpha_pattern={}), out


def _export_dir(src: Path, out: Path, engine: str, *, source_label: str) -> Path:
    from safetensors.torch import save_file

    config, tensors = read_adapter_files(src)
    if engine == "peft":
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name != NOTE_FILE)
        ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_A.weight")})
        note = _note(engine, config, ranks, source_label, (src / _WEIGHTS).stat().st_size)
        with staged_directory(out) as staging:
            for path in files:
                shutil.copy2(path, staging / path.name)
            (staging / NOTE_FILE).write_text(note)
        return out
    modules = _lora_modules(src, config, tensors)
    new_config, new_tensors = (_padded if engine == "padded" else _own_ranks)(config, tensors, modules)
    # Written next to the destination and renamed, so a crash never leaves a half-written adapter.
    with staged_directory(out) as staging:
        weights = staging / _WEIGHTS
        save_file(
            {k: t.contiguous() for k, t in new_tensors.items()}, str(weights), metadata={"format": "pt"}
        )
        (staging / _CONFIG).write_text(json.dumps(new_config, indent=2, sort_keys=True))
        # The export, as the installed PEFT reads its config, must make the source's updates (padding and
        # folded scales change the files, never the outputs); a mismatch throws the staging directory away.
        what = f"the {engine} export"
        check_updates(
            adapter_updates(config, tensors), adapter_updates(new_config, new_tensors, what=what), what=what
        )
        ranks = sorted({int(new_tensors[m.prefix + ".lora_A.weight"].shape[0]) for m in modules})
        (staging / NOTE_FILE).write_text(
            _note(engine, new_config, ranks, source_label, weights.stat().st_size)
        )
    return out


def _has_patterns(config: dict[str, Any]) -> bool:
    return bool(config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"))


_PADDED_OK = [
    "vLLM (it pads every module to one rank and applies one scale, `lora_alpha / r` = 1 here)",
    "SGLang (it refuses per-module `rank_pattern`/`alpha_pattern`; this file has none)",
    "llama.cpp (`convert_lora_to_gguf.py`; it scales each module by `lora_alpha / rank` = 1 here)",
    "PEFT / transformers (`PeftModel.from_pretrained`)",
]
_OWN_RANKS_OK = [
    "llama.cpp (`convert_lora_to_gguf.py --base BASE_DIR`; it scales each module by `lora_alpha / r_i`, "
    "the tensor's own rank, and the scales are folded into B for exactly that)",
    "PEFT / transformers (`rank_pattern` builds each module at its rank; with no `alpha_pattern` PEFT "
    "scales by `lora_alpha / r_i` too)",
]
_OWN_RANKS_WRONG = [
    "vLLM (one scale `lora_alpha / r` for every module): use `fimlora export --engine padded`",
    "SGLang (refuses `rank_pattern`): use `fimlora export --engine padded`",
]
_PEFT_WRONG = [
    "vLLM (ignores `rank_pattern`/`alpha_pattern`, one scale `lora_alpha / r`): use `--engine padded`",
    "SGLang (refuses per-module patterns): use `--engine padded`",
    "llama.cpp (one `lora_alpha` per adapter, scale `lora_alpha / r_i`; the file converts without a "
    "warning and gives wrong outputs): use `--engine llama.cpp` (smaller) or `--engine padded`",
]


def _note(engine: str, config: dict[str, Any], ranks: list[int], source: str, weight_bytes: int) -> str:
    versions = package_versions(("fimlora", "peft"))
    rank_text = (
        "no LoRA-A tensors"
        if not ranks
        else f"rank {ranks[0]}"
        if len(ranks) == 1
        else f"ranks {ranks[0]}–{ranks[-1]}"
    )
    if engine == "padded":
        what = (
            f"Every module's scale is folded into `lora_B` and every module is zero-padded to rank "
            f"{ranks[-1]}: `r = lora_alpha = {config['r']}`, no `rank_pattern`/`alpha_pattern`, scale 1 "
            "everywhere. Padding rows of A and columns of B are zero, so outputs equal the source adapter's."
        )
        ok, wrong = _PADDED_OK, ["none known"]
    elif engine == "llama.cpp":
        what = (
            f"Every module keeps its own rank ({rank_text}, in `rank_pattern`); `lora_alpha = "
            f"{config['lora_alpha']:g}`, no `alpha_pattern`, and module i's `lora_B` holds "
            "`s_i · r_i / lora_alpha` times the source's, so `lora_alpha / r_i` gives back its scale `s_i`."
        )
        ok, wrong = _OWN_RANKS_OK, _OWN_RANKS_WRONG
    else:
        what = f"The source adapter's files, unchanged ({rank_text})."
        if _has_patterns(config) or config.get("peft_type") != "LORA" or not ranks:
            ok = [
                "PEFT / transformers (`PeftModel.from_pretrained`), which read `rank_pattern`/`alpha_pattern`"
            ]
            wrong = _PEFT_WRONG
        else:  # one rank, one alpha: every engine's single scale is the right one
            ok = ["PEFT / transformers", "vLLM", "SGLang", "llama.cpp (no patterns, no rsLoRA: one scale)"]
            wrong = ["none known"]
    lines = [
        f"# Serving this adapter (`fimlora export --engine {engine}`)",
        "",
        what,
        "",
        "Correct for:",
        *[f"- {x}" for x in ok],
        "",
        "Not correct for:",
        *[f"- {x}" for x in wrong],
        "",
        f"Source: {source}. Exported by fimlora {versions['fimlora']} (peft {versions['peft']}). `adapter_model.safetensors`: {weight_bytes:,} bytes.",
        "vLLM and SGLang behaviour is from their loaders; llama.cpp is checked by a round trip through "
        "llama.cpp itself in fimlora's CI (docs/serving.md).",
        "",
    ]
    return "\n".join(lines)
