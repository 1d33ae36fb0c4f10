"""Ablations of FIM-LoRA that the paper does not report, run through fimlora's own code on MiniLM.

Subcommands (each writes a Markdown table, a JSON file and a PNG under ``--out``):

* ``stability``: rank-map stability vs the number of calibration batches T in {1, 2, 4, 8, 16, 32}.
  For each seed, LoRA-B gradients of 64 consecutive training batches are captured once (the model in
  eval mode and LoRA-A frozen, as fimlora's calibration does); the statistics of any T are then formed
  from them by fimlora's own reduction, ``fimlora.calibration.batch_module_stats`` (F = mean g^2,
  V = F - mean(g)^2, then mean or sum over B's elements). Maps are allocated by fimlora's ``plan_rank_map`` (parameter budget of uniform r).
  Reported: Spearman / Kendall between the maps from two *disjoint* calibration sets (batches [0, T) vs
  [32, 32 + T)) with the same seed, and between maps of *different seeds* (different LoRA-A and head
  init, data order and training subsample) at the same T. Also, for T = 8, the agreement between score
  types (fisher/variance) and aggregations (mean/sum), and each one's rank-map summary.
* ``contribution``: does the score track what a module contributes? Train one FIM-LoRA adapter, then
  remove each module's adapter in turn (its LoRA-B set to zero, i.e. delta_W = 0) and measure the
  drop in test accuracy and the rise in test loss; correlate them (Spearman) with the module's
  calibration score.
* ``per-example``: batch vs per-example estimator (``FimConfig.estimator``). For T in {1, 2, 4, 8}, both
  estimators calibrate (through ``estimate_module_scores`` itself) on two *disjoint* sets of training
  batches, [0, T) and [8, 8 + T), of the same seed and model; reported: Spearman / Kendall tau-b between the
  two rank maps of each estimator (and between the two score vectors), per score type and aggregation,
  and the calibration seconds of each estimator on the same batches (equal T = equal forward/backward
  passes, so the time ratio is the estimator's overhead).
The r_min / r_max and T accuracy ablations are not subcommands here: they run as ordinary benchmark grids
(``bench/grids/ablations/*.yaml``) through ``python -m bench.run`` and land in the normal result store
(labels like ``fim[r_min=1]``).

Commands (see docs/results/README.md)::

    python -m bench.ablations stability --task trec6 --seeds 0 1 2 --out docs/results/ablations
    python -m bench.ablations contribution --task trec6 --seed 0 --out docs/results/ablations
    python -m bench.ablations per-example --tasks trec6 sms_spam --seeds 0 1 2 --threads 1 \
        --out docs/results/ablations

Layout: one module per ablation (``rank_stability``, ``module_contribution``, ``per_example``), the
calibration replay and table helpers they share (``common``), and the command line (``cli``, run by
``__main__``).
"""

from .cli import main
from .common import VARIANTS, capture_b_gradients, rank_maps_for, scores_from_gradients
from .module_contribution import contribution
from .per_example import ESTIMATORS, PE_T_VALUES, paired_counts, per_example_stability
from .rank_stability import T_VALUES, stability

__all__ = [
    "ESTIMATORS",
    "PE_T_VALUES",
    "T_VALUES",
    "VARIANTS",
    "capture_b_gradients",
    "contribution",
    "main",
    "paired_counts",
    "per_example_stability",
    "rank_maps_for",
    "scores_from_gradients",
    "stability",
]
