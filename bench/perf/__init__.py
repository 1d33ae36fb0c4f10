"""Performance benchmarks (issue 6): each script prints one JSON record; see docs/performance.md."""
