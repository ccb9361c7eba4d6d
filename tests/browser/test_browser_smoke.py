"""The browser tests' machinery against a real page: Chromium runs a page's own script file under
the Content-Security-Policy the dashboard sends, refuses the page's inline script, and a screenshot
(on request, and by itself when a test fails) is a PNG of the page."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from fakes.background_loop import BackgroundLoop
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions

from browser.conftest import (
    REPO,
    SCREENSHOTS,
    WINDOW_SIZE,
    console_messages,
    failure_artifacts,
    wait_until_page,
)

# The dashboard's policy: scripts only from the hub's own files, never inline.
CSP = "default-src 'self'; script-src 'self'"
PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>browser smoke</title></head>
<body>
<h1 id="status">as served</h1>
<p id="inline">inline script did not run</p>
<script>document.getElementById("inline").textContent = "inline script ran";</script>
<script src="/static/app.js"></script>
</body>
</html>
"""
# Runs after the inline script above (scripts run in document order), so once its text shows, the
# inline script has had its chance.
APP_JS = 'document.getElementById("status").textContent = "changed by app.js";\n'
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PageServer:
    """The page at / (with the CSP) and /without-csp (without), and /static/app.js, on 127.0.0.1,
    served from a loop of their own while the test's Selenium calls block."""

    def __init__(self) -> None:
        self.loop = BackgroundLoop(timeout=30)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/without-csp", self._page)
        app.router.add_get("/static/app.js", self._script)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _page(self, request: web.Request) -> web.Response:
        headers = {} if request.path == "/without-csp" else {"Content-Security-Policy": CSP}
        return web.Response(text=PAGE, content_type="text/html", headers=headers)

    async def _script(self, request: web.Request) -> web.Response:
        return web.Response(text=APP_JS, content_type="text/javascript",
                            headers={"Content-Security-Policy": CSP})

    def start(self) -> None:
        self.url = self.loop.run(self._start())

    def stop(self) -> None:
        if self.runner is not None:
            self.loop.run(self.runner.cleanup())
        self.loop.stop()


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    server = PageServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header chunk."""
    assert data.startswith(PNG_SIGNATURE), f"not a PNG: {data[:16]!r}"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_page_scripts_run_under_the_csp_and_inline_scripts_are_refused(
    browser: webdriver.Chrome, page_server: PageServer, screenshot: Callable[[str], Path]
) -> None:
    browser.get(page_server.url + "/")

    wait_until_page(browser, expected_conditions.text_to_be_present_in_element((By.ID, "status"),
                                                                                "changed by app.js"),
                    "/static/app.js to change the heading")
    assert browser.find_element(By.ID, "inline").text == "inline script did not run"
    refusals = [entry["message"] for entry in console_messages(browser)
                if "Content Security Policy" in entry["message"]]
    assert any("inline script" in message for message in refusals), refusals

    path = screenshot("csp")
    assert path == SCREENSHOTS / "test_page_scripts_run_under_the_csp_and_inline_scripts_are_refused-csp.png"
    # The visible part of the page (the window less what headless Chromium keeps for its own frame).
    viewport = browser.execute_script("return [window.innerWidth, window.innerHeight];")
    assert png_size(path.read_bytes()) == tuple(viewport)
    assert viewport[0] == WINDOW_SIZE[0]

    # The same page without the header runs its inline script: what the CSP refused above.
    browser.get(page_server.url + "/without-csp")
    wait_until_page(browser, expected_conditions.text_to_be_present_in_element((By.ID, "inline"),
                                                                                "inline script ran"),
                    "the inline script to run on the page without a CSP")


FAILING_TEST = '''
def test_a_page_that_fails_its_test(browser):
    browser.get("data:text/html,<title>broken</title><script>console.error('logged by the page')</script>"
                "<p>what the page showed</p>")
    assert browser.title == "fixed"
'''


def test_a_failing_browser_test_leaves_a_screenshot_and_the_console_log(
    chromium: Path, tmp_path: Path
) -> None:
    """A test of its own that fails, run by a pytest of its own with this directory's fixtures and
    hooks as a plugin: its report names the screenshot, which holds the page it left."""
    shot, console = failure_artifacts("test_a_page_that_fails_its_test")
    for path in (shot, console):
        path.unlink(missing_ok=True)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_failing.py").write_text(FAILING_TEST)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "browser.conftest", "-q",
             "test_failing.py"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "1 failed" in result.stdout, result.stdout
        assert f"screenshot: {shot}" in result.stdout, result.stdout
        assert png_size(shot.read_bytes())[0] == WINDOW_SIZE[0]
        assert "logged by the page" in console.read_text(), console.read_text()
    finally:
        for path in (shot, console):
            path.unlink(missing_ok=True)
