"""Debian's Chromium, headless: a page's screenshot and the text it renders, as a person would see them.

``--virtual-time-budget`` lets the page's scripts run (and their requests finish) before the
capture; ``--dump-dom`` prints the DOM after they ran, so a test reads what the page shows,
not the HTML the server sent.
"""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import tempfile

from tests.support.instrumented_processes import unavailable

#: Milliseconds of page time (timers fast-forwarded) before the capture: a single-page app's
#: scripts load, query their API and render.
VIRTUAL_TIME_BUDGET_MS = 15000
WINDOW_SIZE = (1600, 1000)


def require_chromium() -> str:
    """Chromium's path; missing fails under CI (``scripts/setup.sh`` installs it) and skips elsewhere."""
    path = shutil.which("chromium")
    if path is None:
        unavailable("chromium not found: install Debian's chromium package (scripts/setup.sh does, as root)")
    return path


def _chromium(url: str, *options: str, window_size: tuple[int, int] = WINDOW_SIZE, timeout: float = 90) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [
                require_chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
                f"--window-size={window_size[0]},{window_size[1]}",
                *options,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    assert result.returncode == 0, f"chromium {options} {url}: {result.stderr[-2000:]}"
    return result.stdout


class _TextExtractor(html.parser.HTMLParser):
    """Text nodes, one per element: ``<wbr>`` (a line-break hint inside a long key) does not split one."""

    SKIPPED = {"script", "style", "noscript", "template", "svg"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._text: list[str] = []
        self._skipping = 0

    def _flush(self) -> None:
        text = "".join(self._text).strip()
        if text:
            self.parts.append(text)
        self._text = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "wbr":
            return
        self._flush()
        if tag in self.SKIPPED:
            self._skipping += 1

    def handle_endtag(self, tag: str) -> None:
        self._flush()
        if tag in self.SKIPPED and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._text.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def visible_text(dom: str) -> str:
    """The text nodes of a rendered DOM, one per line (scripts and styles left out)."""
    extractor = _TextExtractor()
    extractor.feed(dom)
    extractor.close()
    return "\n".join(extractor.parts)


def capture(url: str, path: str, window_size: tuple[int, int] = WINDOW_SIZE) -> str:
    """``screenshot`` and ``rendered_text`` of ``url`` from one page load: what the PNG shows is what the text says."""
    if os.path.exists(path):
        os.remove(path)
    dom = _chromium(url, "--dump-dom", f"--screenshot={os.path.abspath(path)}", window_size=window_size)
    assert os.path.getsize(path) > 0, f"no screenshot of {url}"
    return visible_text(dom)
