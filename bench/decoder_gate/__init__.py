"""The decoder gate (issue 40): does LoRA rank matter for SmolLM2-135M learning English -> German?

Before any method grid on a decoder, uniform LoRA at low and high rank must differ by clearly more than
seed noise, and maps at one budget must differ (the design notes' gate). The task: supervised translation
of gettext messages from the German catalogs Debian packages install (``pairs.py``, read by ``mo_files.py``),
split by program, loss on the target tokens only, scored by held-out loss per target token and chrF
(``chrf.py``). ``maps.py`` builds the maps at the r2 budget, ``protocol.py`` fixes the runs and their order,
``sft_run.py`` does one run, ``worker.py`` runs them all resumably; ``python -m bench.decoder_gate`` is the
command line. The pre-declared gate and its results: ``docs/results/decoder/gate.md``.
"""
