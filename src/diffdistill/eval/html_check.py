"""Open a report page in a real headless browser (Chromium) and read back what rendered: the number of table rows
and each image's decoded size. Used by the compare test and ``scripts/check_report_html.py``; needs a
``chromium`` (Debian package ``chromium``) or ``google-chrome`` binary, nothing else."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Appended to a copy of the page: after load, write what the browser actually rendered into the DOM.
_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}; });
  var rows = document.querySelectorAll('table tbody tr').length;
  var cells = document.querySelectorAll('table tbody td').length;
  var pre = document.createElement('pre'); pre.id = 'render-check';
  pre.textContent = JSON.stringify({rows: rows, cells: cells, images: imgs, title: document.title});
  document.body.appendChild(pre);
});
</script>"""


def find_browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def render_check(page: Path, browser: str | None = None, screenshot: Path | None = None, timeout: float = 120) -> dict:
    """Load ``page`` in headless Chromium and return {rows, cells, images: [{alt, width, height, complete}], title}."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium/Chrome binary on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "page.html"
        text = Path(page).read_text()
        probe.write_text(text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000"]
        dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                             timeout=timeout).stdout
        if screenshot is not None:
            subprocess.run([browser, *flags, f"--screenshot={Path(screenshot).resolve()}", "--window-size=1280,2400",
                            probe.as_uri()], capture_output=True, timeout=timeout)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.S)
    if not m:
        raise RuntimeError(f"the browser did not run the page's load handler; DOM starts: {dom[:300]!r}")
    return json.loads(html.unescape(m.group(1)))
