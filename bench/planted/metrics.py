"""How a student and a rank map are scored against the planted ground truth. Pure numpy.

* **Fraction of the teacher gap closed** on held-out text: ``1 - L(student, teacher) / L(base, teacher)``,
  where ``L`` is the student loss (MSE of last hidden states, or KL of next-token distributions) averaged
  over the held-out tokens. 0: the student is no closer to the teacher than the untouched base; 1: it
  matches the teacher exactly. It can be negative (a student further away than the base).
* **Map agreement**: Spearman's rho between a map's ranks and the planted ranks over all modules
  (:func:`fimlora.rankmap.spearman`, ties averaged), and the AUC of "planted" (planted rank > 0) by the
  map's rank: the probability that a planted module gets a higher rank than an unplanted one (ties 1/2;
  Mann-Whitney's U divided by the number of pairs). Both are ``nan`` where the planted map has nothing to
  rank (the homogeneous control).
* **Fraction of the uniform -> oracle gap recovered**: ``(m - u) / (o - u)`` for a method's gap closed ``m``,
  uniform's ``u`` and the oracle's ``o``; reported from the means over seeds (a per-seed ratio is unstable
  where ``o - u`` is small). ``nan`` when the oracle does not beat uniform.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fimlora.rankmap import spearman

__all__ = ["gap_closed", "gap_recovered", "map_agreement", "planted_auc"]


def gap_closed(student_loss: float, base_loss: float) -> float:
    """``1 - student_loss / base_loss``: the fraction of the base -> teacher gap the student closed.

    Raises:
        ValueError: ``base_loss`` not > 0 (the teacher equals the base: no gap), or a negative or non-finite
            ``student_loss``.
    """
    if not math.isfinite(base_loss) or base_loss <= 0.0:
        raise ValueError(
            f"`base_loss` must be finite and > 0 (a teacher that differs from the base), got {base_loss}"
        )
    if not math.isfinite(student_loss) or student_loss < 0.0:
        raise ValueError(f"`student_loss` must be finite and >= 0, got {student_loss}")
    return 1.0 - student_loss / base_loss


def gap_recovered(method: float, uniform: float, oracle: float, *, min_gap: float = 1e-9) -> float:
    """``(method - uniform) / (oracle - uniform)``; ``nan`` when ``oracle - uniform <= min_gap``.

    Args:
        method, uniform, oracle: fractions of the teacher gap closed (means over seeds).
        min_gap: the smallest oracle advantage over uniform that the ratio is reported for.
    """
    span = oracle - uniform
    if not span > min_gap:
        return math.nan
    return (method - uniform) / span


def planted_auc(scores: Sequence[float], planted: Sequence[bool]) -> float:
    """AUC of ``planted`` by ``scores``: P(score of a planted module > score of an unplanted one), ties 1/2.

    Args:
        scores: a map's rank (or score) per module, shape (n,).
        planted: whether each module holds a planted update, shape (n,).

    Returns:
        AUC in [0, 1]; ``nan`` when every module or none is planted.
    """
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(planted, dtype=bool)
    if s.ndim != 1 or s.shape != p.shape:
        raise ValueError(f"expected two 1-D sequences of one length, got shapes {s.shape} and {p.shape}")
    pos, neg = s[p], s[~p]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def map_agreement(chosen: Mapping[str, float], planted: Mapping[str, int]) -> dict[str, float]:
    """Spearman's rho and the planted AUC of a map (module -> rank or score) against the planted ranks.

    Args:
        chosen: module -> the map's rank (or score); must cover every planted module.
        planted: module -> planted rank (0: nothing planted).

    Returns:
        ``{"spearman": rho, "auc": auc}`` (either ``nan`` where undefined).

    Raises:
        ValueError: the two maps name different modules.
    """
    if set(chosen) != set(planted):
        differ = sorted(set(chosen) ^ set(planted))
        raise ValueError(f"the map and the planted ranks name different modules: {differ[:3]}")
    names = sorted(planted)
    a = [float(chosen[n]) for n in names]
    b = [float(planted[n]) for n in names]
    return {"spearman": spearman(a, b), "auc": planted_auc(a, [planted[n] > 0 for n in names])}
