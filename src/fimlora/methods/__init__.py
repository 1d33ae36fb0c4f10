"""Rank-allocation methods behind one protocol: uniform, fim, l1ra, lrlora, adalora, eva.

One module per method (``uniform``, ``fim``, ``l1ra``, ``lrlora``, ``adalora``, ``eva``), registered when
:func:`get_method` or :func:`available_methods` first runs; ``base`` holds the protocol and registry,
``budget`` and ``gates`` the pieces several methods share, ``history`` and ``optim_state`` the rank log
and the optimizer-state carry-over.
"""

from fimlora.methods.base import METHODS, RankMethod, available_methods, get_method, register_method

__all__ = ["METHODS", "RankMethod", "available_methods", "get_method", "register_method"]
