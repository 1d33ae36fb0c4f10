"""The demo and ``compare`` reports opened in headless Chromium, at desktop (1280 px) and phone (390 px) widths.

The reports come from real runs: ``fimlora demo`` on two seeds with 64 training examples (the embedded
MiniLM and movie-sentiment data, full test split), and ``fimlora compare`` of the demo's seed-0 runs (one
seed: the test-set, per-example paired path). Opt-in (``pytest -m browser``; ``scripts/ci_browser.sh``
installs Chromium and runs it in CI).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.browser import DESKTOP, PHONE, available, chromium, inspect_page

pytestmark = pytest.mark.browser

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
ENV.setdefault("OMP_NUM_THREADS", "1")


def _fimlora(*args: str | Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fimlora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    problem = available()
    if problem:
        pytest.fail(f"the browser check {problem}; scripts/ci_browser.sh installs both")
    root = tmp_path_factory.mktemp("reports")
    demo = root / "demo"
    _fimlora("demo", "--out", demo, "--seeds", "0", "1", "--max-train", "64", "--no-progress")
    cmp = root / "cmp"
    _fimlora("compare", demo / "seed-0" / "uniform", demo / "seed-0" / "fim", "--out", cmp)
    return {"demo": demo / "report.html", "compare": cmp / "report.html"}


@pytest.fixture(scope="module")
def driver():  # type: ignore[no-untyped-def]
    with chromium() as d:
        yield d


@pytest.mark.parametrize("which", ["demo", "compare"])
@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop-1280", "phone-390"])
def test_report_reads_in_a_browser(
    reports: dict[str, Path], driver: object, which: str, size: tuple[int, int, bool]
) -> None:
    page = reports[which]
    seen = inspect_page(driver, page, size)
    width, height, _ = size
    # The viewport meta is honoured: a phone lays the page out at its own width, not at 980 px.
    assert seen.inner_width == width
    assert seen.scroll_width <= width, f"page is {seen.scroll_width} px wide at {width} px"
    assert seen.overflowing == [], f"elements wider than the viewport: {seen.overflowing}"
    assert seen.errors == [], f"console errors: {seen.errors}"
    # Every figure loads and links to its full-size file next to the report.
    assert len(seen.images) >= 3
    for image in seen.images:
        assert image["complete"] and image["natural"] > 0, f"image did not load: {image['alt']}"
        assert 0 < image["shown"] <= width
        assert image["href"] and (page.parent / image["href"]).is_file(), image
    # The conclusion is on the first screen and says how large the difference is and whether it is noise.
    assert seen.conclusion is not None, "no conclusion"
    text = seen.conclusion["text"]
    assert re.search(r"FIM-LoRA (is \d+\.\d\d points (above|below)|ties with) uniform LoRA", text), text
    assert re.search(r"95% CI [−+]\d+\.\d\d to [−+]\d+\.\d\d points", text), text
    assert "noise" in text
    assert seen.conclusion["top"] < height, f"conclusion starts at y = {seen.conclusion['top']}"


def test_conclusions_are_computed_from_the_runs(reports: dict[str, Path]) -> None:
    """The sentence states the paired numbers the runs' metrics give (not a canned text)."""
    demo = reports["demo"].parent
    accs = {
        (seed, method): json.loads((demo / f"seed-{seed}" / method / "metrics.json").read_text())["eval"][
            "accuracy"
        ]
        for seed in (0, 1)
        for method in ("uniform", "fim")
    }
    mean = ((accs[0, "fim"] - accs[0, "uniform"]) + (accs[1, "fim"] - accs[1, "uniform"])) / 2
    sentence = json.loads((demo / "results.json").read_text())["conclusions"][0]
    assert "averaged over 2 seeds" in sentence
    if mean != 0:
        assert f"{100 * abs(mean):.2f} points {'above' if mean > 0 else 'below'}" in sentence
    compare = json.loads((reports["compare"].parent / "comparison.json").read_text())["comparisons"][0]
    assert compare["basis"] == "test set, paired" and compare["seeds"] == [0]
    assert compare["mean"] == pytest.approx(accs[0, "fim"] - accs[0, "uniform"])
    html = reports["demo"].read_text()
    assert "<pre><code>fimlora demo --out" in html and "--seeds 0 1 --max-train 64" in html
