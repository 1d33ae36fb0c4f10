"""Open a generated report in headless Chromium and measure what a reader would see.

Used by ``tests/browser`` (``pytest -m browser``) and, as a script, to take the screenshots in
``docs/screenshots``::

    python tests/helpers/browser.py out/demo/report.html docs/screenshots

Chromium and chromedriver are Debian's (``apt-get install chromium chromium-driver``; ``scripts/
ci_browser.sh`` installs them), driven by Selenium (``pip install -e '.[browser]'``). The flags below
keep a headless Chromium off the network (no background updates, sync or QUIC), which the closed network
here needs. Phone widths are emulated with Chrome's device metrics (``mobile=True``), under which a page
without a viewport meta tag lays out at 980 px, as on a real phone.
"""

from __future__ import annotations

import base64
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DESKTOP = (1280, 900, False)
PHONE = (390, 844, True)

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# Every element whose box leaves the viewport horizontally, unless an ancestor clips or scrolls it (a
# table inside its own scroll box is fine; the scroll box itself must fit).
_OVERFLOW_JS = """
const width = window.innerWidth;
const clipped = (el) => {
  for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX;
    if (o === 'auto' || o === 'scroll' || o === 'hidden' || o === 'clip') return true;
  }
  return false;
};
const out = [];
for (const el of document.body.querySelectorAll('*')) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 && r.height === 0) continue;
  if ((r.right > width + 1 || r.left < -1) && !clipped(el)) {
    out.push(`${el.tagName.toLowerCase()}${el.className ? '.' + el.className : ''} `
             + `[${Math.round(r.left)}, ${Math.round(r.right)}]`);
  }
}
return {inner: width, scroll: document.documentElement.scrollWidth, offenders: out.slice(0, 20)};
"""

_IMAGES_JS = """
return Array.from(document.images).map((img) => ({
  alt: img.alt, complete: img.complete, natural: img.naturalWidth, shown: img.getBoundingClientRect().width,
  href: img.closest('a') ? img.closest('a').getAttribute('href') : null,
}));
"""

_CONCLUSION_JS = """
const el = document.getElementById('conclusion');
if (!el) return null;
const r = el.getBoundingClientRect();
return {text: el.innerText, top: r.top + window.scrollY, height: r.height, screen: window.innerHeight};
"""


@dataclass
class PageReport:
    """What one page looked like at one width."""

    width: int
    inner_width: int
    scroll_width: int
    overflowing: list[str]
    images: list[dict[str, Any]]
    console: list[dict[str, Any]]
    conclusion: dict[str, Any] | None
    screenshots: list[Path] = field(default_factory=list)

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Console messages of level SEVERE (script errors, resources that failed to load)."""
        return [m for m in self.console if m.get("level") == "SEVERE"]


def available() -> str | None:
    """Why the browser check cannot run here, or None when it can."""
    if not Path(CHROMIUM).is_file() or not Path(CHROMEDRIVER).is_file():
        return f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[browser]')"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Selenium WebDriver) with a fresh profile, closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="fimlora-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def inspect_page(
    driver: Any,
    page: Path,
    size: tuple[int, int, bool],
    *,
    screenshot_stem: Path | None = None,
) -> PageReport:
    """Load ``page`` at ``size`` = (width, height, mobile) and measure it (and save screenshots).

    Screenshots, when ``screenshot_stem`` is given: ``<stem>-first-screen.png`` (what the reader sees
    first) and ``<stem>-full.png`` (the whole page).
    """
    width, height, mobile = size
    scale = 2 if mobile else 1
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
    )
    driver.get_log("browser")  # drop messages of earlier pages
    driver.get(page.resolve().as_uri())
    driver.execute_script("return document.readyState")
    overflow = driver.execute_script(_OVERFLOW_JS)
    result = PageReport(
        width=width,
        inner_width=int(overflow["inner"]),
        scroll_width=int(overflow["scroll"]),
        overflowing=list(overflow["offenders"]),
        images=list(driver.execute_script(_IMAGES_JS)),
        console=list(driver.get_log("browser")),
        conclusion=driver.execute_script(_CONCLUSION_JS),
    )
    if screenshot_stem is not None:
        screenshot_stem.parent.mkdir(parents=True, exist_ok=True)
        first = screenshot_stem.with_name(screenshot_stem.name + "-first-screen.png")
        first.write_bytes(driver.get_screenshot_as_png())
        full_height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": full_height, "scale": 1 / scale},
            },
        )
        full = screenshot_stem.with_name(screenshot_stem.name + "-full.png")
        full.write_bytes(base64.b64decode(shot["data"]))
        result.screenshots = [first, full]
    return result


def main(argv: list[str]) -> int:
    """``browser.py REPORT.html OUT_DIR [NAME]``: desktop and phone screenshots plus the checks' verdict."""
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    page, out = Path(argv[0]), Path(argv[1])
    name = argv[2] if len(argv) == 3 else "demo-report"
    problem = available()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    with chromium() as driver:
        for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
            r = inspect_page(driver, page, size, screenshot_stem=out / f"{name}-{label}")
            broken = [i["alt"] for i in r.images if not (i["complete"] and i["natural"] > 0)]
            where = f"at y = {r.conclusion['top']:.0f}" if r.conclusion else "missing"
            print(
                f"{label} {r.width} px: layout width {r.inner_width}, page width {r.scroll_width}, "
                f"{len(r.images)} images ({len(broken)} broken), {len(r.overflowing)} elements wider than "
                f"the viewport, {len(r.errors)} console errors, conclusion "
                f"{where}; "
                f"wrote {', '.join(map(str, r.screenshots))}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
