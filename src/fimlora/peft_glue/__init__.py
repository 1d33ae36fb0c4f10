"""Everything that touches PEFT internals lives here, so a PEFT change touches this package only.

* :mod:`.layers`: find a model's LoRA layers for an adapter (clear errors for non-PEFT models and
  data-parallel wrappers), their config, shapes, ranks and factors;
* :mod:`.resize`: rebuild LoRA layers at new ranks (re-initialised, or keeping chosen rank columns for
  training-time reallocation) and write ``rank_pattern``/``alpha_pattern`` with keys that match exactly
  one module; save and restore an adapter's layout;
* :mod:`.configs`: a rank map as a ``LoraConfig`` with patterns (to build a model at its ranks before
  sharding it) and as axolotl config keys;
* :mod:`.export`: export an adapter in the form a serving engine loads correctly: ``padded`` (scales
  folded into B, every module zero-padded to the largest rank; vLLM, SGLang), ``llama.cpp`` (own ranks,
  scales folded into B for llama.cpp's ``alpha / r_i``) or ``peft`` (as is), with a note naming the engines;
* :mod:`.adalora`: AdaLoRA's SVD-form layers and rank allocator, and its conversion to plain LoRA;
* :mod:`.compress_io`: read any LoRA (or AdaLoRA) adapter directory as factors and scales, and write one
  back at new ranks (for :func:`fimlora.compress_adapter`);
* :mod:`.eva`: EVA with a parameter budget (a version-checked replacement inside PEFT's EVA);
* :mod:`.saved_modules`: trained ``modules_to_save`` copies read and carried over, and adapters taken off a
  model without PEFT's version-dependent ``unload()``;
* :mod:`.verify`: run-time checks that a rewritten adapter computes what it should (each module's update on
  a fixed probe, through PEFT's own forward or at the scales PEFT builds from a config), raising ``AdapterCheckError`` with the versions.

Other fimlora modules may use PEFT's top-level API (``from peft import LoraConfig, get_peft_model``) but
never ``peft.tuners``/``peft.utils`` or a LoRA layer's attributes: they use the functions here.
PEFT is imported lazily, so importing this package does not import PEFT.
"""

from fimlora.peft_glue.configs import axolotl_lora_config, lora_config_dict, lora_config_with_ranks
from fimlora.peft_glue.export import export_adapter, export_uniform
from fimlora.peft_glue.layers import (
    current_ranks,
    data_parallel_inner,
    is_sharded,
    lora_config,
    lora_factor_params,
    lora_factors,
    lora_modules,
    module_shapes,
    sharded_resize_error,
)
from fimlora.peft_glue.resize import (
    apply_rank_map,
    drop_lora_modules,
    lora_layout,
    pattern_key,
    rank_patterns,
    resize_lora_modules,
    restore_lora_layout,
    scaled_alpha,
    set_rank_patterns,
)

__all__ = [
    "apply_rank_map",
    "axolotl_lora_config",
    "current_ranks",
    "data_parallel_inner",
    "drop_lora_modules",
    "export_adapter",
    "export_uniform",
    "is_sharded",
    "lora_config",
    "lora_config_dict",
    "lora_config_with_ranks",
    "lora_factor_params",
    "lora_factors",
    "lora_layout",
    "lora_modules",
    "module_shapes",
    "pattern_key",
    "rank_patterns",
    "resize_lora_modules",
    "restore_lora_layout",
    "scaled_alpha",
    "set_rank_patterns",
    "sharded_resize_error",
]
