"""No import circles in ``bench`` or ``fimlora``, function-local imports included (grimp, import-linter's
graph library, reads both): a circle hidden inside a function is still a circle."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")


@pytest.mark.parametrize("package", ["bench", "fimlora"])
def test_no_import_circles(package: str) -> None:
    graph = grimp.build_graph(package)
    circles = sorted(
        (a, b)
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if b.split(".")[0] == package and graph.chain_exists(importer=b, imported=a)
    )
    assert not circles, f"import circles (module -> module that imports it back): {circles[:5]}"
