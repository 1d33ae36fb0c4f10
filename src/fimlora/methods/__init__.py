"""Rank-allocation methods behind one protocol: uniform, fim, l1ra, lrlora, adalora, eva."""

from fimlora.methods.base import METHODS, RankMethod, get_method, register_method

__all__ = ["METHODS", "RankMethod", "get_method", "register_method"]
