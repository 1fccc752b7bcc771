"""The live web page in a real browser: Debian's Chromium driven by Playwright (no browser download).

Skips, loudly, when Playwright or /usr/bin/chromium is missing (`make test` installs both where it can).
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import pytest

from .conftest import Serve, evtool, http
from .test_web import utc_now, workload

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _skip(reason: str) -> None:
    print(f"\nSKIPPED LOUDLY: {reason}", file=sys.stderr)
    warnings.warn(reason, pytest.PytestWarning, stacklevel=2)
    pytest.skip(reason)


def test_page_shows_exact_totals_and_updates(dsn, tmp_path: Path):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _skip("the browser test needs Playwright (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        _skip("the browser test needs Chromium at /usr/bin/chromium (apt-get install chromium)")
    with Serve(tmp_path, "--read-token", "look-only") as serve:
        lines = workload(utc_now())
        status, _, _ = http(f"{serve.url}/liveEvent", "POST", b"\n".join(lines),
                            {"Authorization": "secret", "Content-Type": "application/x-ndjson"})
        assert status == 422  # the line without a value refuses the whole bulk
        status, _, _ = http(f"{serve.url}/liveEvent", "POST", b"\n".join(lines[:4]),
                            {"Authorization": "secret", "Content-Type": "application/x-ndjson"})
        assert status == 200
        evtool("process", cwd=tmp_path, check=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 1000})
                page.goto(f"{serve.url}/?refresh=1")
                page.fill("#token", "look-only")
                page.click("#login button")
                # (expect, not wait_for_function: the page's CSP forbids evaluating strings)
                expect(page.locator("#revenue")).to_have_text("1234567884.923456789", timeout=60_000)
                assert page.text_content("#added") == "1234567890.423456789"
                # serve stamped each event with its receive time: all are in the rolling window
                expect(page.locator("#window")).to_have_text(
                    "4 events, revenue 1234567884.923456789, 3 active users", timeout=30_000)
                page.fill("#user", "a")
                page.click("#lookup button")
                expect(page.locator("#found")).to_have_text("a: 0.3", timeout=30_000)
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
                print(f"\nscreenshot: {tmp_path / 'page.png'}", file=sys.stderr)
                one = b'{"userId": "a", "name": "add_revenue", "value": 0.01}'
                status, _, _ = http(f"{serve.url}/liveEvent", "POST", one,
                                    {"Authorization": "secret", "Content-Type": "application/json"})
                assert status == 200
                evtool("process", cwd=tmp_path, check=True)
                expect(page.locator("#revenue")).to_have_text("1234567884.933456789", timeout=60_000)
            finally:
                browser.close()
