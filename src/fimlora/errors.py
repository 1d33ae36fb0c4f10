"""The exceptions fimlora raises for problems a user can fix.

Each message is one line that names the problem and how to fix it, so the CLI prints it as-is
(``fimlora: error: ...``, exit status 2) and a library caller can show it unchanged.
"""

from __future__ import annotations

__all__ = ["AdapterCheckError", "CalibrationError", "DataError", "UsageError"]


class UsageError(ValueError):
    """A problem the user can fix (bad path, option, column, existing output): one line, says what to do."""


class DataError(ValueError):
    """A data file or dataset is missing, malformed, or does not match the requested columns/labels."""


class CalibrationError(RuntimeError):
    """Calibration could not produce usable statistics (no batches, no loss, non-finite gradients)."""


class AdapterCheckError(RuntimeError):
    """A rewritten adapter (AdaLoRA -> LoRA, a resize, compress, export) does not compute what it should,
    which means the installed PEFT/transformers behave differently from the tested ones. Nothing has been
    written; a run's checkpoints are kept, so it can be resumed once a tested version is installed."""
