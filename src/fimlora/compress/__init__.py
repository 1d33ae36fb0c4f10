"""Rank allocation after training: compress a trained LoRA adapter to a budget, ranks from its own spectrum.

* :mod:`.spectrum`: the math, pure torch (no PEFT): the exact SVD of ``s * B @ A`` from QR decompositions
  of the factors (never the ``out x in`` matrix), the global choice of singular directions under a rank or
  parameter budget, and the new factors;
* :mod:`.adapter`: :func:`compress_adapter`, which reads an adapter (through
  :mod:`fimlora.peft_glue.compress_io`), compresses it and writes a plain PEFT adapter with a report;
* :mod:`.report`: :class:`CompressionReport` (per module: rank kept, energy kept), its table and figure.

See ``docs/compress.md``.
"""

from fimlora.compress.adapter import compress_adapter
from fimlora.compress.report import CompressionReport, ModuleCompression, plot_compression
from fimlora.compress.spectrum import (
    FactorSpectrum,
    balanced_factors,
    factor_svd,
    kept_energy,
    select_directions,
)

__all__ = [
    "CompressionReport",
    "FactorSpectrum",
    "ModuleCompression",
    "balanced_factors",
    "compress_adapter",
    "factor_svd",
    "kept_energy",
    "plot_compression",
    "select_directions",
]
