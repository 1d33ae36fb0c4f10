"""Shared pytest set-up: ``tests/`` is on ``sys.path`` (rootdir conftest), so tests import
``helpers.tiny_models`` (tiny random models from configs) and ``helpers.data_files`` (tiny data sets);
``bench`` is importable from the repository root."""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))
