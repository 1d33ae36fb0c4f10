"""fimlora: choose each LoRA module's rank from the empirical Fisher of its LoRA-B gradient.

FIM-LoRA (PEFT issue #3203): calibrate a freshly initialised LoRA adapter (B = 0) on a few batches,
score every module by the mean squared gradient (or variance) of its B factor, and redistribute a fixed
rank or parameter budget in proportion to the scores. The result is a plain PEFT LoRA adapter with
``rank_pattern``/``alpha_pattern``.
"""

from fimlora.allocate import allocate_ranks
from fimlora.config import FimConfig
from fimlora.initialize import initialize_lora_fim_ranks
from fimlora.peft_glue import apply_rank_map, export_uniform
from fimlora.rankmap import RankMap
from fimlora.scores import CalibrationError, ModuleStats, estimate_module_scores, fim_calibration

__all__ = [
    "CalibrationError",
    "FimConfig",
    "ModuleStats",
    "RankMap",
    "allocate_ranks",
    "apply_rank_map",
    "estimate_module_scores",
    "export_uniform",
    "fim_calibration",
    "initialize_lora_fim_ranks",
]

__version__ = "0.1.0"
