"""The hub's web dashboard: a live log's lag to the page, a large log's page, 200 viewers.

`hpc-runner hub` runs as a process of its own on 127.0.0.1 (`python -m runner hub` from this
checkout), its dashboard behind a real login at an OpenID Connect provider (oidc-provider-mock,
`tests/fakes/oidc_provider.py`, in this process). The agent is the agents' client (`HubClient`)
registering a job and publishing its state and log, as `HubPublisher` does for a real agent's jobs.
Pages are opened in Debian's headless Chromium through Selenium (`tests/browser/conftest.py`'s
`start_chromium`, as the browser tests start it), logged in at the provider as a person would.

- live lag: the agent appends a line carrying its write time (`time.time()`) to a running job's
  log every 125 ms while the job's page is open; a MutationObserver injected into the page records
  when each line's element appears (`performance.timeOrigin + performance.now()`, the same
  machine's clock); lag = seen - written. Baseline, the same lines at the same time: a Python
  client following `GET /api/v1/jobs/ID/log?follow=1`, which is what the hub alone adds.
  Target: p99 < 1 s in the page.
- large log: a running job's page with a 100 MB log (compiler-like lines, colours, a group every
  few thousand lines), from `driver.get` until its last line is in the page and the document is
  complete (its script has run and opened the live stream); the first opening apart (the hub
  counts the lines before the tail once); baseline, the same for a 10 KB log, interleaved.
  Then "Load earlier": click until the previous lines are in the page. Target: < 2 s.
- viewers: N logged-in viewers following one running job's page events
  (`GET /jobs/ID/events`, server-sent events, one session cookie from one login) while the agent
  appends a line every 100 ms: the hub's CPU (% of one core) and peak RSS (VmHWM, reset before
  they connect), the viewers' lag; beside 1 viewer.

    /opt/hpc-runner/venv/bin/python bench/dashboard.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Measure the checkout's code, not the copies installed in the venv.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import aiohttp  # noqa: E402
from browser.conftest import start_chromium  # noqa: E402
from fakes.oidc_issuer import OidcIssuerEmulator  # noqa: E402
from fakes.oidc_provider import running_provider  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from bench._common import (  # noqa: E402
    BenchError,
    HubProcess,
    common_arguments,
    latency_ms,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    oidc_table,
    percentile,
    root_secret,
    rotated,
    write_results,
)
from runner.gateway import jobs_protocol as protocol  # noqa: E402
from runner.identity import Identity  # noqa: E402
from runner.job import new_job_id  # noqa: E402
from runner.sources.api.client import HubClient  # noqa: E402
from runner.web.pages import TAIL_BYTES  # noqa: E402

NAME = "dashboard"
AUDIENCE = "hpc-runner"
AGENT_TOKEN = "bench-agent-0123456789abcdef0123456789abcdef"
REPOSITORY = "octo-org/octo-repo"
CLIENT_ID = "hpc-dashboard"
USER = "alice"
GROUP = "climate"
JOB = {"name": "bench", "image": "test", "script": "make test\n", "resources": {"time": "10m"}}
# The page and the users' API both may see the job: the viewer's group, the token's repository.
MEMBERS = [f"idp:group:{GROUP}", f"github:repo:{REPOSITORY}"]
LIVE_INTERVAL_S = 0.125
CROWD_INTERVAL_S = 0.1
TARGET_LIVE_P99_S = 1.0
TARGET_PAGE_S = 2.0
MB = 1000 * 1000
SMALL_LOG_BYTES = 10 * 1000
WAIT_S = 60.0
# `seq=N t=WRITTEN`: the line's number in the run and the agent's time.time() at its append.
_STAMP = re.compile(r"seq=(\d+) t=(\d+\.\d+)")
# Records when each log line's element appears in the page (injected after load: the pages' own
# scripts are the dashboard's; the harness's come through WebDriver).
OBSERVER = """
window.benchSeen = [];
const lines = document.getElementById("log-lines");
new MutationObserver((records) => {
  const now = performance.timeOrigin + performance.now();
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (node.nodeType !== Node.ELEMENT_NODE) { continue; }
      const found = node.matches(".line") ? [node] : Array.from(node.querySelectorAll(".line"));
      for (const line of found) { window.benchSeen.push([line.textContent, now]); }
    }
  }
}).observe(lines, {childList: true, subtree: true});
"""
PAGE_READY = ("return document.readyState === 'complete' "
              "&& document.getElementById(arguments[0]) !== null;")
NAVIGATION = """
const n = performance.getEntriesByType("navigation")[0];
return {server_ms: n.responseStart - n.requestStart, transfer_ms: n.responseEnd - n.responseStart,
        dom_ms: n.domContentLoadedEventEnd - n.responseEnd, bytes: n.transferSize,
        lines: document.querySelectorAll("#log-lines .line").length};
"""


@dataclass(frozen=True)
class Settings:
    live_lines: int
    large_log_mb: int
    page_rounds: int
    earlier_clicks: int
    viewers: int
    crowd_seconds: float


FULL = Settings(live_lines=320, large_log_mb=100, page_rounds=7, earlier_clicks=3, viewers=200,
                crowd_seconds=20)
QUICK = Settings(live_lines=16, large_log_mb=8, page_rounds=2, earlier_clicks=1, viewers=20,
                 crowd_seconds=2)


def stamped(seq: int) -> bytes:
    return b"seq=%06d t=%.6f \x1b[32mok\x1b[0m test_case_%d\n" % (seq, time.time(), seq)


def stamps(text: str) -> list[tuple[int, float]]:
    return [(int(match.group(1)), float(match.group(2))) for match in _STAMP.finditer(text)]


def large_log(size: int) -> bytes:
    """About `size` bytes of a build's log, ending with a newline: compiler lines, colours, groups."""
    parts: list[bytes] = []
    total, number = 0, 0
    while total < size:
        number += 1
        if number % 5000 == 1:
            line = b"--- :hammer: step %d\n" % (number // 5000 + 1)
        elif number % 97 == 0:
            line = b"\x1b[1;33mwarning\x1b[0m: src/module_%d.f90:%d: unused variable 'tmp'\n" % (
                number % 400, number % 1000)
        elif number % 31 == 0:
            line = b"\x1b[32mPASS\x1b[0m tests/test_case_%d.py::test_%d (%d.%03d s)\n" % (
                number % 700, number, number % 5, number % 1000)
        else:
            line = b"gfortran -O2 -fopenmp -c src/module_%d.f90 -o build/module_%d.o  # line %d\n" % (
                number % 400, number % 400, number)
        parts.append(line)
        total += len(line)
    return b"".join(parts)


# -- the site: the hub, the provider, the agent ----------------------------------------------------

@dataclass
class Site:
    hub: HubProcess
    issuer: OidcIssuerEmulator
    http: aiohttp.ClientSession     # the agent's and the API user's connections
    agent: HubClient

    def user_headers(self) -> dict[str, str]:
        token = self.issuer.mint("github", aud=AUDIENCE, repository=REPOSITORY,
                                 repository_owner=REPOSITORY.split("/")[0])
        return {"Authorization": f"Bearer {token}"}

    async def running_job(self, log: bytes = b"") -> tuple[str, int]:
        """A running job of the agent's with `log` published: its id and log length."""
        job_id = new_job_id()
        body = protocol.registration_body(JOB, Identity(source="local", user=USER), "bench", source="local",
                                          source_label="local queue")
        await self.agent.register(job_id, body)
        await self.agent.publish(job_id, "running", account=GROUP, grant=f"{GROUP}-grant",
                                 admins=[f"idp:user:{USER}"], members=MEMBERS)
        offset = 0
        while offset < len(log):
            offset = await self.agent.append_log(
                job_id, offset, log[offset:offset + protocol.MAX_LOG_APPEND_BYTES])
        return job_id, offset


@contextlib.asynccontextmanager
async def started_site(root: Path) -> AsyncIterator[Site]:
    secret = root_secret(root / "client-secret", "s3cret-of-the-dashboard-client\n")
    async with OidcIssuerEmulator() as issuer, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        with running_provider({USER: {"preferred_username": USER, "groups": [GROUP]}}) as provider:
            login = f'issuer = "{provider}"\nclient_id = "{CLIENT_ID}"\nclient_secret_file = "{secret}"\n'
            hub = HubProcess(root, oidc=oidc_table("github-actions", issuer.url, AUDIENCE, "github"),
                             agent_token=AGENT_TOKEN, login=login)
            try:
                await hub.ready(http)
                async with HubClient(hub.url, AGENT_TOKEN, session=http) as agent:
                    yield Site(hub, issuer, http, agent)
            finally:
                hub.stop()


def browser_log_in(driver: webdriver.Chrome, url: str) -> None:
    """Log in as a person does: the hub sends the browser to the provider, whose form says who."""
    driver.get(url + "/")
    wait(driver, lambda: bool(driver.find_elements(By.NAME, "sub")), "the provider's form")
    driver.find_element(By.NAME, "sub").send_keys(USER)
    driver.find_element(By.XPATH, "//button[text()='Authorize']").click()
    wait(driver, lambda: driver.current_url.startswith(url)
         and bool(driver.find_elements(By.CSS_SELECTOR, "header.top .viewer")), "the hub's list, logged in")


async def session_log_in(url: str) -> aiohttp.ClientSession:
    """An HTTP session logged in at the provider (the same redirects a browser follows)."""
    # Cookies of a bare IP address (127.0.0.1) are refused unless the jar is told otherwise.
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with http.get(url + "/login?next=/") as form:
            await form.read()
            authorize = form.url
        async with http.post(authorize, data={"sub": USER}) as back:
            text = await back.text()
            if back.status != 200 or not str(back.url).startswith(url) or USER not in text:
                raise BenchError(f"logging in ended at {back.url} with {back.status}")
    except BaseException:
        await http.close()
        raise
    return http


def wait(driver: webdriver.Chrome, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what} (browser at {driver.current_url})")
        time.sleep(0.01)


# -- a: a live line, from the job's write to the page ----------------------------------------------

async def live_lag(site: Site, driver: webdriver.Chrome, settings: Settings) -> dict[str, Any]:
    job_id, offset = await site.running_job(stamped(0))
    arrived: dict[int, float] = {}       # seq -> when the API follower read it
    written: dict[int, float] = {}

    async def follow() -> None:
        partial = b""
        async with site.http.get(f"{site.hub.url}{protocol.job_log_path(job_id)}?offset=0&follow=1",
                                 headers=site.user_headers(),
                                 timeout=aiohttp.ClientTimeout(total=None)) as response:
            if response.status != 200:
                raise BenchError(f"following the log was answered {response.status}")
            async for data in response.content.iter_any():
                now = time.time()
                *lines, partial = (partial + data).split(b"\n")
                for line in lines:
                    for seq, _ in stamps(line.decode()):
                        arrived[seq] = now

    follower = asyncio.create_task(follow())
    page = f"{site.hub.url}/jobs/{job_id}"
    await asyncio.to_thread(driver.get, page)
    await asyncio.to_thread(wait, driver, lambda: bool(driver.find_elements(By.ID, "L1")), "the job's page")
    await asyncio.to_thread(driver.execute_script, OBSERVER)
    cpu, start = site.hub.cpu_seconds(), time.monotonic()
    due = time.monotonic()
    for seq in range(1, settings.live_lines + 1):
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        due += LIVE_INTERVAL_S
        line = stamped(seq)
        written[seq] = stamps(line.decode())[0][1]
        offset = await site.agent.append_log(job_id, offset, line)
    elapsed, cpu = time.monotonic() - start, site.hub.cpu_seconds() - cpu
    seen: dict[int, float] = {}

    def collect() -> None:
        for text, when in driver.execute_script("return window.benchSeen.splice(0);"):
            for seq, _ in stamps(text):
                seen[seq] = when / 1000.0

    def all_seen() -> bool:
        collect()
        return len(seen) >= settings.live_lines and len(arrived) > settings.live_lines

    await asyncio.to_thread(wait, driver, all_seen, "every line in the page")
    await site.agent.publish(job_id, "succeeded", exit_status=0)
    await asyncio.wait_for(follower, WAIT_S)
    page_lags = [seen[seq] - written[seq] for seq in written]
    api_lags = [arrived[seq] - written[seq] for seq in written]
    return {"lines": settings.live_lines, "interval_s": LIVE_INTERVAL_S, "seconds": round(elapsed, 1),
            "page_lag_ms": latency_ms(page_lags), "api_follow_lag_ms": latency_ms(api_lags),
            "page_added_p50_ms": round(1000 * (percentile(page_lags, 50) - percentile(api_lags, 50)), 1),
            "hub_cpu_percent": round(100 * cpu / elapsed, 1),
            "target_met": percentile(page_lags, 99) < TARGET_LIVE_P99_S}


# -- b: a large log's page -------------------------------------------------------------------------

def fresh_tab(driver: webdriver.Chrome) -> None:
    """Go on in a new tab, the old one closed. Chromium keeps a page left by navigating in its
    back-forward cache with its live stream's connection open, and allows 6 HTTP/1.1 connections
    to a host: the 7th job page opened in one tab would wait for one of them."""
    old = driver.current_window_handle
    driver.switch_to.new_window("tab")
    new = driver.current_window_handle
    driver.switch_to.window(old)
    driver.close()
    driver.switch_to.window(new)


def open_page(driver: webdriver.Chrome, url: str, last_line: int) -> dict[str, Any]:
    """Open `url` in a fresh tab; seconds until its last line is in and the document complete."""
    fresh_tab(driver)
    start = time.perf_counter()
    driver.get(url)
    wait(driver, lambda: bool(driver.execute_script(PAGE_READY, f"L{last_line}")), f"line {last_line}")
    seconds = time.perf_counter() - start
    navigation: dict[str, Any] = driver.execute_script(NAVIGATION)
    return {"seconds": seconds, **{key: round(float(value), 1) for key, value in navigation.items()}}


def load_earlier(driver: webdriver.Chrome) -> tuple[float, int]:
    """Click "Load earlier" once: seconds until the line before the first shown is in the page."""
    first = driver.execute_script("return document.querySelector('#log-lines .line').id;")
    before = int(first[1:]) - 1
    start = time.perf_counter()
    driver.find_element(By.ID, "load-earlier").click()
    wait(driver, lambda: bool(driver.execute_script(
        "return document.getElementById(arguments[0]) !== null;", f"L{before}")), f"line {before}")
    seconds = time.perf_counter() - start
    count: int = driver.execute_script("return document.querySelectorAll('#log-lines .line').length;")
    return seconds, count


async def large_page(site: Site, driver: webdriver.Chrome, settings: Settings) -> dict[str, Any]:
    big = large_log(settings.large_log_mb * MB)
    small = large_log(SMALL_LOG_BYTES)
    publish_start = time.monotonic()
    big_id, _ = await site.running_job(big)
    publish_s = time.monotonic() - publish_start
    small_id, _ = await site.running_job(small)
    pages = {"large": (f"{site.hub.url}/jobs/{big_id}", big.count(b"\n")),
             "small": (f"{site.hub.url}/jobs/{small_id}", small.count(b"\n"))}
    # The first opening of each: the hub counts the lines before the large log's tail once.
    first = {name: await asyncio.to_thread(open_page, driver, url, last)
             for name, (url, last) in pages.items()}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pages}
    earlier: list[float] = []
    shown: list[int] = []
    for index in range(settings.page_rounds):
        for name in rotated(list(pages), index):
            url, last = pages[name]
            runs[name].append(await asyncio.to_thread(open_page, driver, url, last))
            if name == "large":
                for _ in range(settings.earlier_clicks):
                    seconds, count = await asyncio.to_thread(load_earlier, driver)
                    earlier.append(seconds)
                    shown.append(count)

    def stats(entries: list[dict[str, Any]]) -> dict[str, Any]:
        seconds = [entry["seconds"] for entry in entries]
        return {"n": len(seconds), **{key: round(1000 * percentile(seconds, q), 1)
                                      for key, q in (("median_ms", 50), ("p90_ms", 90), ("max_ms", 100))},
                "hub_answer_ms": round(percentile([e["server_ms"] for e in entries], 50), 1),
                "transfer_ms": round(percentile([e["transfer_ms"] for e in entries], 50), 1),
                "parse_to_dom_ready_ms": round(percentile([e["dom_ms"] for e in entries], 50), 1),
                "page_bytes": entries[-1]["bytes"], "lines_shown": entries[-1]["lines"]}

    large, small_stats = stats(runs["large"]), stats(runs["small"])
    return {"large_log_bytes": len(big), "large_log_lines": big.count(b"\n"), "small_log_bytes": len(small),
            "tail_bytes": TAIL_BYTES, "publish_s": round(publish_s, 1),
            "first_open_ms": {name: round(1000 * entry["seconds"], 1) for name, entry in first.items()},
            "large": large, "small": small_stats,
            "ratio_median_to_small": round(large["median_ms"] / small_stats["median_ms"], 2),
            "load_earlier_ms": {"n": len(earlier), **{key: round(1000 * percentile(earlier, q), 1)
                                for key, q in (("median", 50), ("p90", 90), ("max", 100))},
                                "lines_shown_after": max(shown)},
            "target_met": large["p90_ms"] < 1000 * TARGET_PAGE_S
            and 1000 * first["large"]["seconds"] < 1000 * TARGET_PAGE_S}


# -- c: many viewers following one log -------------------------------------------------------------

class Viewer:
    """One page's live stream of a job: when each stamped line's event arrived."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.reading = asyncio.Event()     # set once the warm-up line arrived

    async def follow(self, http: aiohttp.ClientSession, url: str) -> None:
        async with http.get(url, headers={"Accept": "text/event-stream"},
                            timeout=aiohttp.ClientTimeout(total=None)) as response:
            if response.status != 200:
                raise BenchError(f"{url} answered {response.status}")
            event = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "lines":
                    now = time.time()
                    for seq, written in stamps(line):
                        if seq == 0:
                            self.reading.set()
                        else:
                            self.lags.append(now - written)
                elif line == "" and event == "end":
                    return


async def viewers(site: Site, http: aiohttp.ClientSession, count: int, seconds: float) -> dict[str, Any]:
    job_id, offset = await site.running_job(b"the job starts\n")
    crowd = [Viewer() for _ in range(count)]
    url = f"{site.hub.url}/jobs/{job_id}/events?offset={offset}&number=2"
    site.hub.reset_peak_rss()
    following = [asyncio.create_task(viewer.follow(http, url)) for viewer in crowd]
    offset = await site.agent.append_log(job_id, offset, stamped(0))
    await asyncio.wait_for(asyncio.gather(*(viewer.reading.wait() for viewer in crowd)), WAIT_S)
    cpu, own, start = site.hub.cpu_seconds(), _own_cpu_seconds(), time.monotonic()
    lines, due = int(seconds / CROWD_INTERVAL_S), time.monotonic()
    for seq in range(1, lines + 1):
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        due += CROWD_INTERVAL_S
        offset = await site.agent.append_log(job_id, offset, stamped(seq))
    elapsed, cpu, own = time.monotonic() - start, site.hub.cpu_seconds() - cpu, _own_cpu_seconds() - own
    await site.agent.publish(job_id, "succeeded", exit_status=0)
    await asyncio.wait_for(asyncio.gather(*following), WAIT_S)
    lags = [lag for viewer in crowd for lag in viewer.lags]
    if len(lags) != lines * count:
        raise BenchError(f"the viewers had {len(lags)} lines of {lines * count}")
    return {"viewers": count, "lines": lines, "seconds": round(elapsed, 1), "lag_ms": latency_ms(lags),
            "hub_cpu_percent": round(100 * cpu / elapsed, 1), "hub_peak_rss_mb": site.hub.peak_rss_mb(),
            # The viewers and the agent share the machine's cores with the hub.
            "bench_process_cpu_percent": round(100 * own / elapsed, 1)}


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the run ---------------------------------------------------------------------------------------

async def measure_all(settings: Settings, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    async with started_site(root) as site:
        driver = await asyncio.to_thread(start_chromium, root / "chromium-profile", root / "chromedriver.log")
        try:
            browser = {"chromium": driver.capabilities.get("browserVersion"),
                       "chromedriver": driver.capabilities.get("chrome", {}).get("chromedriverVersion", "")}
            await asyncio.to_thread(browser_log_in, driver, site.hub.url)
            results: dict[str, Any] = {"live": await live_lag(site, driver, settings)}
            results["large_page"] = await large_page(site, driver, settings)
        finally:
            await asyncio.to_thread(driver.quit)
        http = await session_log_in(site.hub.url)
        try:
            one = await viewers(site, http, 1, settings.crowd_seconds)
            many = await viewers(site, http, settings.viewers, settings.crowd_seconds)
        finally:
            await http.close()
        results["viewers"] = {"one": one, "many": many}
        return results, {"hub": site.hub.argv, "browser": browser}


def report(results: dict[str, Any]) -> None:
    def met(flag: bool) -> str:
        return "met" if flag else "**missed**"

    def spread(stats: dict[str, Any], *keys: str) -> str:
        return " / ".join(f"{stats[key]}" for key in keys) + " ms"

    live, page, crowd = results["live"], results["large_page"], results["viewers"]
    lag_keys = ("p50", "p90", "p99", "max")
    page_keys = ("median_ms", "p90_ms", "max_ms")
    mb = page["large_log_bytes"] // MB
    rows = [
        [f"live line to the page ({live['lines']} lines)", spread(live["page_lag_ms"], *lag_keys),
         f"+{live['page_added_p50_ms']} ms p50 over the API", f"p99 < 1 s: {met(live['target_met'])}"],
        ["baseline: same lines, `GET .../log?follow=1`", spread(live["api_follow_lag_ms"], *lag_keys),
         "", ""],
        [f"job page, {mb} MB log ({page['large']['n']} runs)", spread(page["large"], *page_keys),
         f"{page['ratio_median_to_small']}× 10 KB; first {page['first_open_ms']['large']} ms",
         f"< 2 s: {met(page['target_met'])}"],
        ["baseline: job page, 10 KB log", spread(page["small"], *page_keys), "1×", ""],
        ["\"Load earlier\" (1 MiB more)", spread(page["load_earlier_ms"], "median", "p90", "max"), "", ""],
    ]
    for key in ("one", "many"):
        entry = crowd[key]
        rows.append([f"{entry['viewers']} viewer(s), a line every 100 ms", spread(entry["lag_ms"], *lag_keys),
                     f"hub {entry['hub_cpu_percent']}% CPU, {entry['hub_peak_rss_mb']} MB peak", "reported"])
    print(markdown_table(["variant", "p50 / p90 / p99 / max (or median / p90 / max)", "ratio, hub cost",
                          "target"], rows))


def measure(quick: bool, output: Path | None) -> int:
    started = time.monotonic()
    settings = QUICK if quick else FULL
    machine = machine_info()
    # The provider's web server would log every request of the logins to stderr.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hpc-runner-dashboard-bench-", dir="/var/tmp") as tmp:
        results, commands = asyncio.run(measure_all(settings, Path(tmp)))
    report(results)
    document = {"benchmark": NAME, "date": now_utc(), "quick": quick,
                "settings": {**dataclasses.asdict(settings), "live_interval_s": LIVE_INTERVAL_S,
                             "crowd_interval_s": CROWD_INTERVAL_S, "target_live_p99_s": TARGET_LIVE_P99_S,
                             "target_page_s": TARGET_PAGE_S},
                "machine": machine, "commands": commands, "results": results,
                "loadavg_at_end": [round(value, 2) for value in os.getloadavg()],
                "duration_seconds": round(time.monotonic() - started, 1)}
    path = write_results(output or REPO / "bench" / "results" / f"{NAME}.json", document)
    print(json.dumps(results["large_page"]["first_open_ms"]))
    print(f"results written to {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    common_arguments(parser, NAME)
    args = parser.parse_args()
    return main_guard(lambda: measure(args.quick, args.output))


if __name__ == "__main__":
    sys.exit(main())
