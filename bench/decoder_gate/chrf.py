"""chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation"), corpus level.

No package in the environment provides it (sacrebleu is not installed), and the formula is short:

* white space is removed from every sentence; character n-grams of orders 1..``max_order`` (6) are
  counted with multiplicity;
* per order n, over the whole corpus: matches = sum over sentences of the clipped overlap
  ``sum_g min(count_hyp(g), count_ref(g))``; precision P_n = matches / hypothesis n-grams, recall
  R_n = matches / reference n-grams (orders with no n-grams on either side are left out);
* chrP and chrR are the means of P_n and R_n over the orders used, and
  ``chrF_beta = (1 + beta^2) chrP chrR / (beta^2 chrP + chrR)`` with beta = 2 (recall weighs more),
  reported in percent.

This is the paper's averaging (precision and recall averaged over orders, then combined); sacrebleu
averages per-order F-scores instead, which can differ by a fraction of a point.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

__all__ = ["char_ngrams", "corpus_chrf"]


def char_ngrams(text: str, n: int) -> Counter[str]:
    """Character n-grams of ``text`` with white space removed, with their counts."""
    chars = "".join(text.split())
    return Counter(chars[i : i + n] for i in range(len(chars) - n + 1))


def corpus_chrf(
    hypotheses: Sequence[str], references: Sequence[str], *, max_order: int = 6, beta: float = 2.0
) -> float:
    """Corpus chrF in percent (0..100) of hypotheses against one reference each.

    Raises:
        ValueError: different numbers of hypotheses and references, or an empty corpus.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("chrF of an empty corpus is undefined")
    matches = [0] * max_order
    hyp_total = [0] * max_order
    ref_total = [0] * max_order
    for hyp, ref in zip(hypotheses, references, strict=True):
        for k in range(max_order):
            h, r = char_ngrams(hyp, k + 1), char_ngrams(ref, k + 1)
            matches[k] += sum((h & r).values())
            hyp_total[k] += sum(h.values())
            ref_total[k] += sum(r.values())
    orders = [k for k in range(max_order) if hyp_total[k] > 0 and ref_total[k] > 0]
    if not orders:
        return 0.0
    precision = sum(matches[k] / hyp_total[k] for k in orders) / len(orders)
    recall = sum(matches[k] / ref_total[k] for k in orders) / len(orders)
    if precision + recall == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)
