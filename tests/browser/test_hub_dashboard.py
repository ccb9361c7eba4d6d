"""The hub's dashboard in a real headless Chromium: logging in at a real OpenID Connect provider
(oidc-provider-mock), the jobs of one's own account and no other's, a running job's log growing
in the page, its groups, line anchors, raw download, and cancel.

The hub runs as a process of its own (`python -m runner hub`), as in production. Its jobs come
from an agent: the agent's own client (`HubClient`) registers them and publishes their states and
logs, as `HubPublisher` does for a real agent's jobs, on an event loop of its own thread, since
Selenium's calls block. Screenshots of the list and of a job page are saved under
`test-output/screenshots/`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakes.background_loop import BackgroundLoop
from fakes.oidc_issuer import OidcIssuerEmulator
from fakes.oidc_provider import running_provider
from integration.test_gateway import TOKEN, GatewayProcess, Site, write_secret
from selenium import webdriver
from selenium.webdriver.common.by import By

from runner.gateway.jobs_protocol import registration_body
from runner.identity import Identity
from runner.job import new_job_id
from runner.sources.api.client import HubClient

from .conftest import wait_until_page

CLIENT_ID = "hpc-dashboard"
USERS: dict[str, dict[str, object]] = {
    "alice": {"preferred_username": "alice", "groups": ["climate"]},
    "bob": {"preferred_username": "bob", "groups": ["ocean"]},
}
JOB = {"name": "unit-tests", "image": "hpc-runner-test", "script": "make test\n",
       "resources": {"time": "10m", "nodes": 1, "tasks": 2, "cpus_per_task": 1}}
LOG_START = (b"--- :hammer: build\n"
             b"\x1b[32mcompiling\x1b[0m src/model.f90\n"
             b"+++ :test_tube: tests\n"
             b"\x1b[1;31mFAIL\x1b[0m test_ocean_mixing\n"
             b"ok test_radiation\n")


@dataclass
class HubDashboard:
    """A hub process serving the dashboard at `url`, and an agent publishing jobs to it."""

    url: str
    loop: BackgroundLoop
    agent: HubClient
    logs: dict[str, bytes]

    def job(self, job_id: str, *, account: str, group: str, log: bytes = LOG_START,
            state: str = "running", admin: str = "alice") -> str:
        """A job of the agent's local queue on `account`, whose members are `group`'s people and
        whose admin is `admin`."""
        identity = Identity(source="local", user="alice")
        body = registration_body(JOB, identity, "dev", source="local", source_label="local queue")

        async def publish() -> None:
            await self.agent.register(job_id, body)
            await self.agent.publish(job_id, state, account=account, grant=f"{account}-grant",
                                     admins=[f"idp:user:{admin}"], members=[f"idp:group:{group}"],
                                     slurm_job_id="4711")
            await self.agent.append_log(job_id, 0, log)
        self.loop.run(publish())
        self.logs[job_id] = log
        return job_id

    def write(self, job_id: str, data: bytes) -> None:
        """What the job writes next to its log."""
        offset = len(self.logs[job_id])
        self.loop.run(self.agent.append_log(job_id, offset, data))
        self.logs[job_id] += data

    def cancel_requested(self, job_id: str) -> bool:
        return self.loop.run(self.agent.show(job_id)).cancel_requested

    def end(self, job_id: str, state: str) -> None:
        self.loop.run(self.agent.publish(job_id, state, exit_status=None))


@pytest.fixture
def hub(tmp_path: Path, unused_tcp_port: int) -> Iterator[HubDashboard]:
    loop = BackgroundLoop()
    issuer: OidcIssuerEmulator = loop.call(OidcIssuerEmulator)
    loop.run(issuer.start())
    site = Site(tmp_path / "hub", unused_tcp_port)
    site.root.mkdir()
    secret = site.root / "client-secret"
    write_secret(secret, "s3cret-of-the-dashboard-client\n")
    try:
        with running_provider(USERS) as provider:
            site.write(issuer=issuer.url, public_url=site.url, extra=(
                f'\n[login]\nissuer = "{provider}"\nclient_id = "{CLIENT_ID}"\n'
                f'client_secret_file = "{secret}"\n'))
            process = GatewayProcess(site, tmp_path / "hub.log", "hub")
            try:
                loop.run(process.ready())
                agent = HubClient(site.url, TOKEN)
                yield HubDashboard(site.url, loop, agent, {})
                loop.run(agent.close())
            finally:
                process.kill()
    finally:
        with contextlib.suppress(Exception):
            loop.run(issuer.close())
        loop.stop()


def log_in(browser: webdriver.Chrome, hub: HubDashboard, user: str, path: str = "/") -> None:
    """Open `path` as `user`: the hub sends the browser to the provider, whose form says who."""
    browser.get(hub.url + path)
    field = wait_until_page(browser, lambda page: page.find_elements(By.NAME, "sub"), "the provider's form")
    field[0].send_keys(user)
    browser.find_element(By.XPATH, "//button[text()='Authorize']").click()
    wait_until_page(browser, lambda page: page.current_url.startswith(hub.url)
                    and page.find_elements(By.CSS_SELECTOR, "header.top .viewer"), f"{user} back at the hub")


def visible_rows(browser: webdriver.Chrome) -> list[str]:
    return [row.get_attribute("data-job") or "" for row in browser.find_elements(By.CSS_SELECTOR, "tr.job")]


def fetch(browser: webdriver.Chrome, url: str) -> tuple[int, bytes]:
    """A URL as the page's own session downloads it."""
    answer: list[Any] = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
           fetch(arguments[0], {credentials: "same-origin"}).then(async (response) => {
             const bytes = new Uint8Array(await response.arrayBuffer());
             let text = ""; for (const b of bytes) { text += String.fromCharCode(b); }
             done([response.status, btoa(text)]);
           });""", url)
    return int(answer[0]), base64.b64decode(answer[1])


def raw_log(browser: webdriver.Chrome, job_id: str) -> tuple[int, bytes]:
    """The raw log as the page's own session downloads it."""
    return fetch(browser, f"/jobs/{job_id}/log/raw")


def test_a_member_sees_their_accounts_jobs_and_follows_one_live_to_its_cancel(
        browser: webdriver.Chrome, hub: HubDashboard, screenshot: Callable[[str], Path]) -> None:
    ours = hub.job(new_job_id(), account="climate", group="climate")
    theirs = hub.job(new_job_id(), account="ocean", group="ocean", admin="bob",
                     log=b"the ocean account's secret plans\n")

    log_in(browser, hub, "alice")

    wait_until_page(browser, lambda page: visible_rows(page) == [ours],
                    "alice's list: her account's job only")
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-job='{ours}']").text
    assert "running" in row and "climate" in row and "unit-tests" in row and "4711" in row
    assert theirs not in browser.page_source
    screenshot("list")

    browser.find_element(By.LINK_TEXT, "unit-tests").click()
    wait_until_page(browser, lambda page: page.find_elements(By.ID, "L5"), "the job's log")
    # Colours are classes; groups collapse; line numbers link to themselves.
    failed = browser.find_element(By.CSS_SELECTOR, "#L4 .text span")
    assert failed.text == "FAIL" and "ansi31" in (failed.get_attribute("class") or "")
    build = browser.find_element(By.CSS_SELECTOR, "details.group-collapsed")
    assert build.get_attribute("open") is None and not browser.find_element(By.ID, "L2").is_displayed()
    tests = browser.find_element(By.CSS_SELECTOR, "details.group-expanded")
    assert tests.get_attribute("open") is not None and browser.find_element(By.ID, "L4").is_displayed()

    # The job writes on: the new line shows up in the page without a reload.
    hub.write(ours, b"ok test_\xc3\xa9vaporation\n\x1b[33mwarning\x1b[0m: slow\n")
    wait_until_page(browser, lambda page: "vaporation" in page.find_element(By.ID, "log-lines").text,
                    "the job's new line in the page")
    assert "test_\u00e9vaporation" in browser.find_element(By.ID, "L6").text
    assert browser.find_element(By.CSS_SELECTOR, "#L7 .text span.ansi33").text == "warning"
    screenshot("job")

    # Collapse a group with a click; a line's anchor opens its group and marks it.
    browser.find_element(By.CSS_SELECTOR, "details.group-expanded > summary").click()
    wait_until_page(browser, lambda page: not page.find_element(By.ID, "L4").is_displayed(),
                    "the tests group to collapse")
    browser.get(f"{hub.url}/jobs/{ours}#L2")
    wait_until_page(browser, lambda page: page.find_element(By.ID, "L2").is_displayed()
                    and "target" in (page.find_element(By.ID, "L2").get_attribute("class") or ""),
                    "line 2, inside a collapsed group, shown by its anchor")
    screenshot("job-anchor")

    status, raw = raw_log(browser, ours)
    assert (status, raw) == (200, hub.logs[ours])

    # Cancel: the agent hears of it at the hub, cancels the job, and the page shows its end.
    browser.find_element(By.ID, "cancel").click()
    browser.switch_to.alert.accept()
    wait_until_page(browser, lambda page: hub.cancel_requested(ours), "the cancel to reach the hub")
    hub.end(ours, "cancelled")
    wait_until_page(browser, lambda page: page.find_element(By.ID, "job-state").text == "cancelled",
                    "the page to show the job cancelled", timeout=15)
    assert not browser.find_elements(By.ID, "cancel")


def test_another_accounts_member_gets_neither_the_job_nor_its_page_nor_its_log(
        browser: webdriver.Chrome, hub: HubDashboard) -> None:
    ours = hub.job(new_job_id(), account="climate", group="climate")

    log_in(browser, hub, "bob")

    wait_until_page(browser, lambda page: page.find_elements(By.CSS_SELECTOR, "tr.empty"), "bob's empty list")
    assert ours not in browser.page_source
    for path in (f"/jobs/{ours}", f"/jobs/{ours}/log/raw", f"/jobs/{ours}/events?offset=0&number=1",
                 f"/jobs/{ours}/log/earlier?before=10&number=2"):
        status: int = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {credentials: 'same-origin'}).then((r) => done(r.status));", path)
        assert status == 404, path
    browser.get(f"{hub.url}/jobs/{ours}")
    assert "compiling" not in browser.page_source


def test_one_tab_opens_one_running_job_after_another_without_running_out_of_connections(
        browser: webdriver.Chrome, hub: HubDashboard) -> None:
    # A browser allows six connections per host over HTTP/1.1; a page kept in the back/forward
    # cache with its live stream open would hold one, and the seventh job's page would wait.
    jobs = [hub.job(new_job_id(), account="climate", group="climate") for _ in range(8)]
    log_in(browser, hub, "alice")
    for job_id in jobs:
        browser.get(f"{hub.url}/jobs/{job_id}")
        wait_until_page(browser, lambda page: page.find_elements(By.ID, "L5"), f"job {job_id}'s page")


def test_a_finished_jobs_page_shows_what_ran_and_its_output_downloads(
        browser: webdriver.Chrome, hub: HubDashboard, screenshot: Callable[[str], Path],
        tmp_path: Path) -> None:
    job_id = hub.job(new_job_id(), account="climate", group="climate", log=b"all tests passed\n")
    data = b"t,temperature\n0,288.15\n"
    digest = hashlib.sha256(data).hexdigest()
    record = json.dumps({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "results/t.csv", "digest": {"sha256": digest},
                     "annotations": {"size": len(data)}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {"buildDefinition": {
            "buildType": "urn:hpc-runner:job:v1",
            "externalParameters": {"job": JOB, "trigger": {"source": "local"}},
            "internalParameters": {"grant": "climate-grant", "account": "climate"},
            "resolvedDependencies": [{"name": "image", "uri": "file:///images/test.sif",
                                      "digest": {"sha256": "22" * 32}}]},
            "runDetails": {"builder": {"id": "urn:hpc-runner:agent:dev"},
                           "metadata": {"invocationId": job_id}}}}).encode()
    source = tmp_path / "t.csv"
    source.write_bytes(data)

    async def hand_over() -> None:
        await hub.agent.put_provenance(job_id, record)
        with source.open("rb") as handle:
            await hub.agent.put_output(job_id, "results/t.csv", handle, len(data))
    hub.loop.run(hand_over())
    hub.end(job_id, "succeeded")

    log_in(browser, hub, "alice", f"/jobs/{job_id}")
    panel = wait_until_page(browser, lambda page: page.find_elements(By.ID, "what-ran"), "the panel")[0]
    link = panel.find_element(By.CLASS_NAME, "output-link")
    assert not link.is_displayed()          # the panel starts closed
    panel.find_element(By.TAG_NAME, "summary").click()
    wait_until_page(browser, lambda page: link.is_displayed(), "the output's link")
    assert link.text == "results/t.csv" and digest in panel.text and "22" * 32 in panel.text
    # alice administers the account: she may replay it, and is told how.
    replay = browser.find_element(By.ID, "replay")
    replay.find_element(By.TAG_NAME, "summary").click()
    wait_until_page(browser, lambda page: f"hpc-runner replay {job_id}" in replay.text, "the replay command")
    screenshot("what-ran")
    status, downloaded = fetch(browser, link.get_attribute("href") or "")
    assert status == 200 and hashlib.sha256(downloaded).hexdigest() == digest

