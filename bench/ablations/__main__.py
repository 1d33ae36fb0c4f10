"""``python -m bench.ablations``: see :mod:`bench.ablations.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
