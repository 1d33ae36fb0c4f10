"""Export an adapter in the single-rank form serving engines load correctly.

vLLM, SGLang and llama.cpp ignore ``alpha_pattern`` or scale by tensor rank, so a per-module-rank adapter
is rewritten with every module's scale folded into B and every module zero-padded to the largest rank.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.io import staged_directory
from fimlora.peft_glue.layers import PEFT_MODEL_PREFIX

__all__ = ["export_uniform"]


def export_uniform(
    model_or_adapter_dir: nn.Module | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write an equivalent single-rank adapter: scale folded into B, every module zero-padded to the max rank.

    The result has ``r = lora_alpha = max rank`` and no patterns (scale 1 everywhere), the form vLLM,
    SGLang and llama.cpp load correctly (they ignore ``alpha_pattern`` or scale by tensor rank). Padding
    rows of A and columns of B are zero, so outputs are unchanged.

    Args:
        model_or_adapter_dir: a PEFT model, or a directory written by ``save_pretrained``.
        out_dir: where to write; must not exist or be empty unless ``overwrite``.
        adapter_name: which adapter of a model to export.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
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
            return _export_dir(src, out)
    return _export_dir(Path(model_or_adapter_dir), out)


def _export_dir(src: Path, out: Path) -> Path:
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file, save_file

    config_path, weights_path = src / "adapter_config.json", src / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{src} is not a PEFT adapter directory: it needs adapter_config.json and adapter_model.safetensors "
            "(save with `model.save_pretrained(dir)`)"
        )
    config: dict[str, Any] = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{src}: only plain LoRA adapters (no DoRA) can be exported to the uniform form")
    tensors = load_file(str(weights_path))
    if any(".lora_embedding_" in k for k in tensors):
        raise ValueError(f"{src}: LoRA on embeddings can't be exported to the uniform form")
    a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    ranks = {k: tensors[k].shape[0] for k in a_keys}
    r_max = max(ranks.values())
    alpha, r0 = config["lora_alpha"], config["r"]
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    out_tensors = dict(tensors)
    for a_key, r in ranks.items():
        prefix = a_key[: -len(".lora_A.weight")]
        name = prefix[len(PEFT_MODEL_PREFIX) :] if prefix.startswith(PEFT_MODEL_PREFIX) else prefix
        cfg_r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), r0)
        if cfg_r != r:
            raise ValueError(f"{src}: module {name} has rank {r} but the config says {cfg_r}")
        a_i = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), alpha)
        scale = a_i / math.sqrt(r) if config.get("use_rslora") else a_i / r
        a, b = tensors[a_key], tensors[prefix + ".lora_B.weight"]
        a_pad = torch.zeros(r_max, a.shape[1], dtype=a.dtype)
        b_pad = torch.zeros(b.shape[0], r_max, dtype=b.dtype)
        a_pad[:r] = a
        b_pad[:, :r] = (b.float() * scale).to(b.dtype)
        out_tensors[a_key], out_tensors[prefix + ".lora_B.weight"] = a_pad.contiguous(), b_pad.contiguous()
        bias_key = prefix + ".lora_B.bias"
        if bias_key in tensors:
            out_tensors[bias_key] = (tensors[bias_key].float() * scale).to(tensors[bias_key].dtype)
    new_config = dict(config, r=r_max, lora_alpha=r_max, use_rslora=False, rank_pattern={}, alpha_pattern={})
    # Written next to the destination and renamed, so a crash never leaves a half-written adapter.
    with staged_directory(out) as staging:
        save_file(out_tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True))
    return out
