"""A real headless Chromium for the web dashboard's tests, driven through Selenium.

Tests that take the ``browser`` fixture get a ``webdriver.Chrome`` running Debian's ``chromium``
through Debian's ``chromedriver`` (both installed by ``deploy/dev/setup.sh``), with a profile of
its own that no other test has touched. They are marked ``browser`` automatically, so
``-m "not browser"`` leaves them out. Without Chromium they are skipped on a developer's machine
and fail in CI (``CI`` or ``HPC_RUNNER_TEST_CLUSTER`` set), as the cluster tests do.

When such a test fails, a screenshot of the page and the browser's console log are saved under
``test-output/screenshots/`` at the repository root (its report names them); ``screenshot(name)``
saves one there on purpose. Pages are waited on with ``wait_until_page``, never with sleeps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from conftest import _cluster_required
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parent.parent.parent
SCREENSHOTS = REPO / "test-output" / "screenshots"
WINDOW_SIZE = (1400, 1000)
PAGE_LOAD_TIMEOUT = 30.0
SCRIPT_TIMEOUT = 10.0

T = TypeVar("T")


def _chromium_problems() -> list[str]:
    return [f"no {path} (Debian package {package})"
            for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
            if not os.access(path, os.X_OK)]


def chromium_options(profile: Path) -> webdriver.ChromeOptions:
    """Options for a headless Chromium with ``profile`` as its (fresh) user data directory."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.add_argument("--headless=new")
    if os.geteuid() == 0:
        # Chromium refuses to start as root with its sandbox on ("Running as root without
        # --no-sandbox is not supported"): the sandbox confines renderers by dropping privileges,
        # which it cannot promise for root. The suite runs as root (the cluster tests switch
        # users); the pages loaded here are the project's own, served on loopback.
        options.add_argument("--no-sandbox")
    # /dev/shm is small in containers; Chromium's shared memory then goes to /tmp instead of crashing.
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}")
    # Loopback only: every other address goes to a proxy on the discard port, where nothing listens,
    # so a page that reaches outside fails here as it would behind the dashboard's CSP. Chromium
    # never proxies loopback addresses (127.0.0.1, localhost), where the tests serve their pages.
    options.add_argument("--proxy-server=http://127.0.0.1:9")
    # No background requests of Chromium's own (component updates, first-run and sync services).
    for flag in ("--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check", "--disable-default-apps"):
        options.add_argument(flag)
    # The page's console (console.log, CSP violations, script errors), for get_log("browser").
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


def start_chromium(profile: Path, driver_log: Path) -> webdriver.Chrome:
    """A headless Chromium with a fresh profile in ``profile``; chromedriver logs to ``driver_log``.

    Both programs are named by path, so Selenium does not run Selenium Manager, which would look for
    (and download) a driver of its own; SE_OFFLINE keeps it offline should it run all the same.
    """
    profile.mkdir(parents=True, exist_ok=True)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(driver_log))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=service, options=chromium_options(profile))
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        driver.set_script_timeout(SCRIPT_TIMEOUT)
    except BaseException:
        driver.quit()
        raise
    return driver


def file_stem(node: pytest.Item) -> str:
    """The test's name as a file name (parameters such as ``[a/b]`` made safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", node.name).strip("-") or "test"


def save_screenshot(driver: webdriver.Chrome, stem: str) -> Path:
    """Save a PNG of the current page as ``test-output/screenshots/STEM.png``; its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{stem}.png"
    path.write_bytes(driver.get_screenshot_as_png())
    return path


def failure_artifacts(stem: str) -> tuple[Path, Path]:
    """Where a failed test's screenshot and console log go."""
    return SCREENSHOTS / f"{stem}-failure.png", SCREENSHOTS / f"{stem}-failure-console.log"


def console_messages(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The browser console's entries since the last call (each a dict with ``level`` and ``message``).

    Chromedriver hands each entry out once: a test that reads them takes them away from the log a
    failure saves.
    """
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return entries


def wait_until_page(
    driver: webdriver.Chrome,
    condition: Callable[[webdriver.Chrome], T | Literal[False]],
    what: str,
    timeout: float = 10.0,
) -> T:
    """Poll ``condition`` (for example ``expected_conditions.text_to_be_present_in_element(...)``)
    until it gives a true value, which is returned; after ``timeout`` seconds the test fails,
    naming ``what`` and the page the browser is on."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout:g} s waiting for {what} "
                    f"(browser at {driver.current_url!r}, title {driver.title!r})")


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Chromium's path, after checking that it and chromedriver are installed."""
    problems = _chromium_problems()
    if problems:
        message = "Chromium not usable: " + "; ".join(problems)
        if _cluster_required():
            pytest.fail(message + " (CI and HPC_RUNNER_TEST_CLUSTER forbid skipping)", pytrace=False)
        pytest.skip(message + "; run `sudo deploy/dev/setup.sh`, which installs both")
    return CHROMIUM


@pytest.fixture
def browser(chromium: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a profile of its own, quit after the test whatever happened.

    One browser a test: starting Chromium and chromedriver takes about 0.65 s on two cores (0.4 to
    0.9 s, quitting 0.1 s), cheap enough for a profile nothing else has touched, with no cookies,
    storage or cache to clear between tests.
    """
    # What an earlier failure of this test left would pass for this run's.
    for stale in failure_artifacts(file_stem(request.node)):
        stale.unlink(missing_ok=True)
    driver = start_chromium(tmp_path / "chromium-profile", tmp_path / "chromedriver.log")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(browser: webdriver.Chrome, request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """``screenshot(name)`` saves the page as ``test-output/screenshots/<test name>-<name>.png``
    and returns that path."""

    def take(name: str) -> Path:
        return save_screenshot(browser, f"{file_stem(request.node)}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}")

    return take


# --------------------------------------------------------------------------------------------
# Hooks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives a headless Chromium (Debian's chromium and chromium-driver)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs Chromium (the ``chromium`` fixture, which ``browser`` takes) with
    ``browser``."""
    for item in items:
        if "chromium" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """When a test with a browser fails, keep what the page looked like and what its console said."""
    report = yield
    driver = getattr(item, "funcargs", {}).get("browser")
    if not (report.failed and report.when in ("setup", "call") and isinstance(driver, webdriver.Chrome)):
        return report
    shot, console = failure_artifacts(file_stem(item))
    saved = []
    try:
        saved.append(f"screenshot: {save_screenshot(driver, shot.stem)}")
        lines = [f"{entry.get('level', '?')} {entry.get('message', '')}"
                 for entry in console_messages(driver)]
        console.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        saved.append(f"console log ({len(lines)} entries): {console}")
    except (WebDriverException, OSError) as exc:
        saved.append(f"could not save the page: {type(exc).__name__}: {exc}")
    report.sections.append(("browser", "\n".join(saved)))
    return report
