"""Rank-allocation methods behind one protocol: uniform, fim, l1ra, lrlora, adalora, eva."""

from fimlora.methods.base import METHODS, RankMethod, available_methods, get_method, register_method

__all__ = ["METHODS", "RankMethod", "available_methods", "get_method", "register_method"]
