"""The planted-rank benchmark (issue 38): ground truth for rank allocation.

A teacher is the base model plus low-rank updates planted in chosen modules (:mod:`.patterns`,
:mod:`.teacher`); a LoRA student is trained to match it on real text with each map at the same parameter
budget (:mod:`.cell`, :mod:`.methods`); the fraction of the teacher gap it closes on held-out text, and its
map's agreement with the planted ranks, say whether a method finds where rank is needed (:mod:`.metrics`).
The oracle (the planted map scaled to the budget) is the upper bound, uniform the floor.

Run and report through ``python -m bench.planted`` (:mod:`.suite`, :mod:`.report`); results in
``docs/results/planted/``.
"""
