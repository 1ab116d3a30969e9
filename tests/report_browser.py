"""Open an HTML file in Debian's headless Chromium (selenium + chromium-driver, both from
apt: nothing is downloaded) and say what it drew: every Plotly plot's size on the page and
the page's rendered text; optionally a full-page PNG screenshot.

Used by tests/test_report_html.py and, through it, to make docs/img/report.png.
"""

from __future__ import annotations

import base64
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: JavaScript: the bounding box of each Plotly plot's main SVG, with its plot's div id
_PLOTS_JS = """
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(function (plot) {
  var svg = plot.querySelector('.main-svg');
  var r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {id: plot.id, width: r.width, height: r.height,
          traces: plot.querySelectorAll('.trace, .hm').length};
});
"""


@dataclass
class Rendered:
    """What Chromium drew: ``plots`` (id, width, height in CSS px, number of drawn trace
    groups: bars, lines, heat maps), the page's visible text, and the console's severe
    messages."""

    plots: list[dict[str, Any]]
    text: str
    errors: list[str]


def _driver(width: int, height: int) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}",
                "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or CHROMEDRIVER),
                            options=opts)


def render(page: Path, *, screenshot: Path | None = None, width: int = 1400,
           wait_s: float = 60.0) -> Rendered:
    """Load ``page`` (file://, so any request to the network would fail), wait until every
    Plotly plot has drawn its SVG, and read what is on the page."""
    drv = _driver(width, 900)
    try:
        drv.get(page.resolve().as_uri())
        deadline = time.monotonic() + wait_s
        plots: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            plots = drv.execute_script(_PLOTS_JS)
            expected = drv.execute_script(
                "return document.querySelectorAll('.plotly-graph-div').length")
            if plots and len(plots) == expected and all(p["width"] > 0 for p in plots):
                break
            time.sleep(0.2)
        text = str(drv.execute_script("return document.body.innerText"))
        logs = [str(e.get("message")) for e in drv.get_log("browser")]
        if screenshot is not None:
            height = int(drv.execute_script(
                "return document.documentElement.scrollHeight"))
            shot = drv.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return Rendered(plots=plots, text=text, errors=logs)
    finally:
        drv.quit()
