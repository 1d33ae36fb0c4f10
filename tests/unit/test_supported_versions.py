"""The supported range is declared once and tested: pyproject's lower bounds are the versions CI installs
from constraints/oldest.txt, and the error messages name the same oldest versions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fimlora.peft_glue.verify import TESTED_VERSIONS

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_EXTRAS = ("plot", "cli", "gguf")  # what users install; dev/browser are our tools


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in RUNTIME_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    bounds: dict[str, str] = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", req.strip())
        assert m, f"{req!r}: every runtime dependency needs a plain lower bound (>=X) that CI tests"
        name = m.group(1).lower().replace("_", "-")
        assert bounds.get(name, m.group(2)) == m.group(2), f"{name} has two lower bounds"
        bounds[name] = m.group(2)
    return bounds


def _oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_every_lower_bound_is_pinned_in_the_oldest_constraints() -> None:
    pins = _oldest_pins()
    for name, bound in _lower_bounds().items():
        assert pins.get(name) == bound, (
            f"pyproject says {name}>={bound}, constraints/oldest.txt {pins.get(name)}"
        )


def test_the_errors_name_the_oldest_tested_versions() -> None:
    pins = _oldest_pins()
    for name, (oldest, newest) in TESTED_VERSIONS.items():
        assert pins[name] == oldest
        assert tuple(map(int, oldest.split("."))) <= tuple(map(int, newest.split(".")))
