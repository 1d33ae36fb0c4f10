"""fimlora: choose each LoRA module's rank from the empirical Fisher of its LoRA-B gradient.

FIM-LoRA (PEFT issue #3203): calibrate a freshly initialised LoRA adapter (B = 0) on a few batches,
score every module by the mean squared gradient (or variance) of its B factor, and redistribute a fixed
rank or parameter budget in proportion to the scores. The result is a plain PEFT LoRA adapter with
``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fimlora.allocate import allocate_ranks
    from fimlora.calibration import ModuleStats, estimate_module_scores, fim_calibration
    from fimlora.compress import compress_adapter
    from fimlora.config import FimConfig
    from fimlora.errors import AdapterCheckError, CalibrationError
    from fimlora.initialize import initialize_lora_fim_ranks
    from fimlora.peft_glue import apply_rank_map, export_adapter, export_uniform, lora_config_with_ranks
    from fimlora.rankmap import RankMap

# Public name -> the module that defines it. Loaded on first use (PEP 562), so that importing a torch-free
# part of the package (fimlora.rankmap, fimlora.allocate, fimlora.io) does not import torch and PEFT.
_HOMES = {
    "AdapterCheckError": "fimlora.errors",
    "CalibrationError": "fimlora.errors",
    "FimConfig": "fimlora.config",
    "ModuleStats": "fimlora.calibration",
    "RankMap": "fimlora.rankmap",
    "allocate_ranks": "fimlora.allocate",
    "apply_rank_map": "fimlora.peft_glue",
    "compress_adapter": "fimlora.compress",
    "estimate_module_scores": "fimlora.calibration",
    "export_adapter": "fimlora.peft_glue",
    "export_uniform": "fimlora.peft_glue",
    "fim_calibration": "fimlora.calibration",
    "initialize_lora_fim_ranks": "fimlora.initialize",
    "lora_config_with_ranks": "fimlora.peft_glue",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'fimlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "AdapterCheckError",
    "CalibrationError",
    "FimConfig",
    "ModuleStats",
    "RankMap",
    "allocate_ranks",
    "apply_rank_map",
    "compress_adapter",
    "estimate_module_scores",
    "export_adapter",
    "export_uniform",
    "fim_calibration",
    "initialize_lora_fim_ranks",
    "lora_config_with_ranks",
]

__version__ = "0.1.0"
