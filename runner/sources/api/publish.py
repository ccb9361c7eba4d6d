"""Every job of the agent's other sources (its local queue, Buildkite, GitHub) published to the hub,
as the API source publishes its own: so that with `hub_url` the hub holds every job this agent
runs, its states and its whole log, byte-exact.

The publisher follows the lifecycle, not the sources: it hears of each job the agent records
(`Admissions.watch`) and of each change of any job's state (`JobDriver.watch_every`). For each job
it

1. remembers it (`published`), before anything goes out;
2. registers it at the hub under the agent's own job id (`registration_body`: its job table,
   the identity its source verified, the agent's cluster, the repository and commit where the
   identity names them, the source that took it and where it came from, `source_link`), a
   registration repeated after a restart being harmless;
3. publishes its states and its log through the API source's `HubReport`, from the length of the
   log the hub holds, until the job ends; then the rest of the log and its final state. Meanwhile
   it asks the hub whether the job's cancel was asked for there (`DELETE /api/v1/jobs/ID` by
   someone the hub lets cancel it), and cancels the job here if so.

A hub out of reach is tried again with a growing pause (the job runs on meanwhile); a restarted
agent carries on with every job whose final state the hub lacks. Jobs of the API source are its
own to publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from runner.config import GithubConfig
from runner.errors import InputError
from runner.gateway.jobs_protocol import JOB_PAGE_PATH, registration_body
from runner.identity import Identity, identity_from_json
from runner.job import Ended, JobRecord
from runner.lifecycle.admission import Admissions
from runner.lifecycle.driver import JobDriver
from runner.logging_setup import get_logger
from runner.logs.redact import redact_env
from runner.logs.tail import pump
from runner.policy import Policy
from runner.sources.api.client import HubClient, HubRefused
from runner.sources.api.published import PublishedJob, PublishedState
from runner.sources.api.report import CANCEL_POLL_SECONDS, HubReport, job_secrets
from runner.sources.api.translate import SOURCE as API_SOURCE
from runner.sources.github.gateway_client import GatewayAuthError
from runner.spec import spec_from_json
from runner.tasks import TaskSet

log = get_logger("runner.sources.api")


# Where GitHub's pages are, for the links to a job's pull request or commit.
GITHUB_WEB_URL = "https://github.com"
_PULL_REF = re.compile(r"refs/pull/([0-9]{1,12})/(?:head|merge)")


def source_link(source: str, identity: Identity, *, source_url: str | None = None,
                github_web_url: str | None = GITHUB_WEB_URL) -> tuple[str | None, str | None]:
    """Where a job of `source` came from, in words and as a link (None when there is none): a
    GitHub job's pull request (`O/R#12`) or commit, a Buildkite job's pipeline, the local queue.
    The link is `source_url`, the page its source named at admission (`JobRecord.source_url`);
    for a GitHub job recorded without one, its pull request or commit on `github_web_url`."""
    label, url = _source_link(source, identity, github_web_url=github_web_url)
    return label, source_url or url


def _source_link(source: str, identity: Identity, *,
                 github_web_url: str | None) -> tuple[str | None, str | None]:
    if source == "github" and identity.repository:
        number = _PULL_REF.fullmatch(identity.ref or "")
        base = None if github_web_url is None else f"{github_web_url.rstrip('/')}/{identity.repository}"
        if number:
            return (f"{identity.repository}#{number.group(1)}",
                    None if base is None else f"{base}/pull/{number.group(1)}")
        if identity.commit:
            return (f"{identity.repository}@{identity.commit[:12]}",
                    None if base is None else f"{base}/commit/{identity.commit}")
        return identity.repository, base
    if source == "buildkite" and identity.organization and identity.pipeline:
        # The job's page is the Buildkite source's to say (its accept answer): `source_url`.
        return f"{identity.organization}/{identity.pipeline}", None
    return source, None


# How long a starting agent waits for the hub to say its public address before it links to its
# own `hub_url` instead (the hub out of reach must not hold up the agent's sources).
PUBLIC_URL_WAIT_SECONDS = 10.0


def hub_page_template(public_url: str) -> str:
    """The hub's page of a job as a `log_url` ("{id}": the agent's own job id, under which the
    publisher registers every job): the hub's `job_url`."""
    return f"{public_url.rstrip('/')}{JOB_PAGE_PATH}/{{id}}"


def hub_pages(github: GithubConfig, public_url: str) -> GithubConfig:
    """The GitHub source's settings with its check runs' "details" link on the hub's page of each job."""
    return dataclasses.replace(github, log_url=hub_page_template(public_url))


async def hub_public_url(client: HubClient, *, wait: float = PUBLIC_URL_WAIT_SECONDS) -> str:
    """Where the hub's users reach it (its `[hub] public_url`), which may not be the address this
    agent reaches it by; the agent's `hub_url` when the hub has none or does not say within `wait`."""
    try:
        async with asyncio.timeout(wait):
            public_url = await client.retrying(client.public_url, "the hub's public address")
    except (TimeoutError, GatewayAuthError, HubRefused) as exc:
        log.warning("the hub did not say its public address; job links name the agent's hub_url",
                    hub_url=client.url, error=str(exc) or type(exc).__name__)
        return client.url
    return public_url or client.url


class HubPublisher:
    """Publishes every job of this agent but the API source's to the hub (see the module docstring).

    `job` reads the agent's record of a job, `log_path` where its log is, `policy` the policy now
    in force (for the account's admins the hub is told of), `cancel` cancels a job whose cancel
    was asked for at the hub (asked every `cancel_interval` seconds while the job runs).
    `github_web_url` is where the links to GitHub jobs' pull requests point (None: no link)."""

    def __init__(self, client: HubClient, state: PublishedState, *, cluster: str,
                 job: Callable[[str], JobRecord | None], log_path: Callable[[JobRecord], Path],
                 policy: Callable[[], Policy], cancel: Callable[[str], None],
                 cancel_interval: float = CANCEL_POLL_SECONDS,
                 github_web_url: str | None = GITHUB_WEB_URL, redacted_vars: Sequence[str] = ()) -> None:
        self.client = client
        self.redacted_vars = tuple(redacted_vars)     # beside the default patterns (a source's own)
        self.github_web_url = github_web_url
        self._cancel = cancel
        self.cancel_interval = cancel_interval
        self.state = state
        self.cluster = cluster
        self._job = job
        self._log_path = log_path
        self._policy = policy
        self.background = TaskSet()
        self._reports: dict[str, HubReport] = {}      # the jobs whose states go out as they change
        self._ended: dict[str, asyncio.Event] = {}    # set when a followed job reaches its end

    def attach(self, admissions: Admissions, driver: JobDriver) -> None:
        """Follow every job the agent records and every change of state from now on, and carry on
        with the jobs of before a restart: before the agent takes or recovers any job."""
        admissions.watch(self.on_admitted)
        driver.watch_every(self.on_change)
        self.start()

    def start(self) -> None:
        """Carry on with every job whose final state the hub does not have yet."""
        for job in self.state.open_jobs():
            self._follow(job)

    async def wait_idle(self) -> None:
        """Until every job known so far has its final state at the hub."""
        await self.background.wait_idle()

    async def close(self) -> None:
        """Stop at once: what is not published yet is, after the next start."""
        await self.background.cancel_all()

    # ---------------------------------------------------------------------------- the lifecycle's news

    def on_admitted(self, job_id: str) -> None:
        """A job the agent recorded (`Admissions.watch`)."""
        record = self._job(job_id)
        if record is None or record.source == API_SOURCE:
            return
        self._follow(self.state.add(job_id))

    def on_change(self, record: JobRecord) -> None:
        """A new state of any job (`JobDriver.watch_every`)."""
        if record.state.is_terminal and record.id in self._ended:
            self._ended[record.id].set()
        report = self._reports.get(record.id)
        if report is not None:
            report.on_change(record)

    # ---------------------------------------------------------------------------- one job

    def _follow(self, job: PublishedJob) -> None:
        if job.hub_id in self._ended:
            return
        self._ended[job.hub_id] = asyncio.Event()
        self.background.spawn(self._publish(job))

    async def _publish(self, job: PublishedJob) -> None:
        try:
            await self._publish_job(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cannot publish a job to the hub; a restart tries again", job=job.hub_id)
        finally:
            self._reports.pop(job.hub_id, None)
            self._ended.pop(job.hub_id, None)

    async def _publish_job(self, job: PublishedJob) -> None:
        record = self._job(job.hub_id)
        if record is None:
            self.state.close_job(job.hub_id)
            return
        if not job.registered and not await self._register(record):
            self.state.close_job(job.hub_id)
            return
        job.registered = True
        report = HubReport(self.client, job, state=self.state, log_path=self._log_path(record),
                           policy=self._policy, secrets=job_secrets(record, self.redacted_vars))
        await report.catch_up()
        record = self._job(job.hub_id) or record
        ended = self._ended[job.hub_id]
        if record.state.is_terminal:
            ended.set()
        else:
            report.on_change(record)            # where the job is now; what follows, as it changes
        self._reports[job.hub_id] = report
        asked = asyncio.Event()
        watcher = asyncio.ensure_future(report.watch_cancel(asked, self.cancel_interval,
                                                            lambda: self._cancel(job.hub_id)))
        try:
            await pump(report.log_path, offset=report.acknowledged, done=ended.is_set, sink=report.sink)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        record = self._job(job.hub_id) or record
        await report.conclude(Ended(record.state, record.exit_status, record.outcome_detail), record)
        self.state.close_job(job.hub_id)
        log.info("job published to the hub", job=job.hub_id, state=record.state.value)

    async def _register(self, record: JobRecord) -> bool:
        """Register the job at the hub; False when the hub will never take it."""
        try:
            identity = identity_from_json(record.identity, f"job {record.id}")
            label, url = source_link(record.source, identity, source_url=record.source_url,
                                     github_web_url=self.github_web_url)
            table = spec_from_json(record.spec, f"job {record.id}").to_table()
            # The job's secrets stay on the cluster: the hub keeps its job table, not its secrets.
            table["env"] = redact_env(table.get("env", {}), self.redacted_vars)
            body = registration_body(table, identity,
                                     self.cluster, repository=identity.repository, commit=identity.commit,
                                     created=record.created_at, source=record.source, source_label=label,
                                     source_url=url)
        except (InputError, ValueError) as exc:
            log.error("the job cannot be registered at the hub", job=record.id, error=str(exc))
            return False
        try:
            await self.client.retrying(lambda: self.client.register(record.id, body),
                                       "the job's registration")
        except HubRefused as refused:
            log.error("the hub refused the job's registration", job=record.id, error=str(refused))
            return False
        self.state.mark_registered(record.id)
        return True
