"""Benchmarks for fimlora, kept outside the installed package.

``bench.harness`` holds the torch-free machinery (experiment grids, an atomic result store, provenance
records, paired statistics, aggregation into reports). Suite code that actually trains models builds on
it and is the only place that imports torch.
"""
