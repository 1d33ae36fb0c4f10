"""The per-issue studies: each reads a result store (or runs ``fimlora``) to answer one question an issue asked.

Unlike the harness and the suites, which any grid uses, each module here belongs to one step of the
benchmark's protocol (docs/results/full/README.md) or to one issue's evidence:

* ``selection``: the training length and each method's learning rate, chosen on the dev split (issue 12);
* ``variants``: allocation variants chosen on the dev split of three tasks (issue 13);
* ``below_r2``: FIM-LoRA that may drop modules, below the r2 budget, on the dev split (issue 13);
* ``full_report``: the test grid's report (issue 12, with issue 14's compression table);
* ``confirm``: the chosen variant on the test split, its held-out confirmation and the target (issue 13);
* ``compress_sft``: an SFT adapter on SmolLM2 compressed to fractions of its parameters (issue 14);
* ``one_budget``: every method's final rank sum and parameters at one budget (issue 37).

What they share (the splits each step reads, the tasks and seeds, the dev-only and test-only checks, the
paired difference by task and seed) is stated once, in ``protocol``, which they all import.

Run each as ``python -m bench.studies.<name>``. Records made before the move name the commit that made
them; at that commit the same study ran as ``python -m bench.<name>``.
"""
