"""No module of ``fimlora`` or ``bench`` imports another module's private (``_name``) names: what two modules
share is public in the module that defines it (tests may still reach in)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_private_names_imported_across_modules() -> None:
    found = []
    for path in sorted([*(ROOT / "src" / "fimlora").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("fimlora", "bench"):
                found += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, found
