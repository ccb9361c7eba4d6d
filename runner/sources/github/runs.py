"""A confirmed trigger's jobs on this agent, each taken from wherever it got to its final report.

The jobs come from `.hpc-runner.toml` at the confirmed SHA (a missing or broken file is reported on
the commit instead). Each job is admitted by the agent (the policy decides), gets its report, is
checked out on this node (the installation token used for the fetch only, and redacted from the
log), runs through `JobHost.run` while `report` keeps GitHub told, and ends with one final report.
Every step is recorded (`state`) before the next, so a restarted agent follows a job
again through `JobHost.resume` and reports it exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.config import GithubConfig
from runner.errors import HpcRunnerError, InputError
from runner.identity import identity_from_json
from runner.job import JobRecord, JobState
from runner.logging_setup import get_logger
from runner.logs.redact import secret_values
from runner.sources import Admission, Ended, JobHost
from runner.sources.checkout_failure import end_failed_checkout
from runner.sources.github import checks
from runner.sources.github.appauth import AppAuth
from runner.sources.github.checkout import CheckoutFailed
from runner.sources.github.checks import LogTail, Report, code
from runner.sources.github.client import GitHubClient, GitHubError, GitHubHTTPError, api_path
from runner.sources.github.jobsfile import JOBS_FILE, decode_contents, parse_jobs_file
from runner.sources.github.report import (
    Reports,
    preamble,
    queued_title,
    report_progress,
    send_final_report,
    summary,
)
from runner.sources.github.repository_urls import github_web_host
from runner.sources.github.state import GithubState, RunState
from runner.sources.github.translate import CancelRequest, Trigger
from runner.spec import JobSpec, parse_job_mapping
from runner.tasks import TaskSet, pause

log = get_logger("runner.sources.github")

SOURCE = "github"


class Retry(HpcRunnerError):
    """GitHub could not be asked now; the trigger is looked at again later."""


@functools.cache
def _parser() -> concurrent.futures.ThreadPoolExecutor:
    # One thread: jobs files of several triggers are parsed one after another, not side by side
    # competing with the event loop for the interpreter.
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpc-runner-jobsfile")


async def parse_off_loop(text: str) -> tuple[JobSpec, ...]:
    """`parse_jobs_file` in a thread of its own: a file near the size limit takes a second or more
    to parse, which on the event loop would hold up heartbeats and every other source. `text` is
    already within the size limit (`decode_contents`), so the thread's work is bounded; the shape
    check is a pass over the whole text too, and runs there with the parse."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_parser(), parse_jobs_file, text, JOBS_FILE)


@dataclass
class LiveRun:
    """A job this agent is running now, for cancellation."""

    state: RunState
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled_by: str | None = None


class Runs:
    """The jobs of the triggers this agent took, while they run (see the module docstring)."""

    def __init__(self, config: GithubConfig, host: JobHost, *, client: GitHubClient, auth: AppAuth,
                 state: GithubState, reports: Reports, background: TaskSet, update_interval: float,
                 retry_seconds: float, redacted_vars: tuple[str, ...],
                 checkout_fn: Callable[..., Awaitable[str]]) -> None:
        self.config = config
        self.host = host
        self.client = client
        self.auth = auth
        self.state = state
        self.reports = reports
        self.background = background
        self.update_interval = update_interval
        self.retry_seconds = retry_seconds
        self._redacted_vars = redacted_vars
        self._checkout = checkout_fn
        self._live: dict[str, LiveRun] = {}       # external id -> running job
        self._triggers: dict[str, asyncio.Task[None]] = {}

    # ---------------------------------------------------------------------------- triggers

    def running(self, key: str) -> asyncio.Task[None] | None:
        """The task running this trigger's jobs on this agent, if any."""
        return self._triggers.get(key)

    def start(self, key: str, detail: dict[str, Any]) -> asyncio.Task[None]:
        """Run the jobs of the trigger recorded under `key` (`detail` as recorded)."""
        task: asyncio.Task[None] = self.background.spawn(self._run_trigger(key, detail))
        self._triggers[key] = task
        task.add_done_callback(lambda _: self._triggers.pop(key, None))
        return task

    def restart(self, key: str) -> asyncio.Task[None] | None:
        """Run the jobs of a trigger recorded by an earlier agent (or earlier on this one)."""
        row = self.state.trigger(key)
        if row is None or row.detail is None:
            return None
        return self.start(key, json.loads(row.detail))

    def resume_all(self) -> None:
        """Carry on with what a previous agent left: every trigger still running (its open runs are
        followed again, the runs it had not made yet are made)."""
        for row in self.state.triggers_with("running"):
            if row.key not in self._triggers:
                log.info("carrying on with a GitHub trigger after a restart", key=row.key)
                self.restart(row.key)

    async def _run_trigger(self, key: str, detail: dict[str, Any]) -> None:
        trigger = Trigger(**detail["trigger"])
        sha: str = detail["sha"]
        repository = trigger.repository
        while True:
            try:
                jobs = await self._jobs(key, trigger, sha)
                break
            except Retry as exc:
                log.warning("cannot read the jobs file yet; trying again in a minute", repository=repository,
                            error=str(exc))
                await pause(self.retry_seconds, self.host.draining)
                if self.host.draining.is_set():
                    return
        runs = []
        for spec in jobs:
            external_id = f"{key}/{spec.name}"
            if self.state.run_done(external_id):
                continue
            row = self.state.run(external_id)
            if row is not None:
                live = self._live.get(external_id)
                if live is None:
                    runs.append(self._follow(RunState.from_row(row)))
                continue
            state = RunState(external_id=external_id, trigger_key=key, repository=repository, sha=sha,
                             job=spec.name, spec=spec.to_table(), identity=detail["identity"],
                             ref=detail["ref"], clone_url=detail["clone_url"], number=trigger.number)
            self._save(state)
            runs.append(self._follow(state))
        await asyncio.gather(*runs)
        if not self.state.open_runs_of(key):
            self.state.set_trigger_outcome(key, "done")

    async def _jobs(self, key: str, trigger: Trigger, sha: str) -> tuple[JobSpec, ...]:
        """The jobs at `sha`; a missing or broken file is reported on the commit and yields none."""
        owner, name = trigger.repository.split("/")
        path = api_path("/repos/{owner}/{repo}/contents/{path}", owner=owner, repo=name, path=JOBS_FILE)
        problem: tuple[checks.Conclusion, str, str] | None = None
        try:
            answer = await self.client.get(path, params={"ref": sha})
            jobs = await parse_off_loop(decode_contents(answer))
        except GitHubHTTPError as exc:
            if exc.status != 404:
                raise Retry(str(exc)) from None
            problem = ("neutral", f"No {JOBS_FILE} at this commit",
                       f"The repository has no `{JOBS_FILE}` at commit {code(sha[:12])}, so there is nothing "
                       "to run. Add `[[jobs]]` tables to it (see the hpc-runner README).")
        except GitHubError as exc:
            raise Retry(str(exc)) from None
        except InputError as exc:
            problem = ("failure", f"{JOBS_FILE} is not valid",
                       f"The jobs file at commit {code(sha[:12])} cannot be used:\n\n"
                       + checks.code_block(str(exc), 8000, cut_note=""))
        if problem is None:
            return jobs
        conclusion, title, text = problem
        log.info("no jobs to run", repository=trigger.repository, sha=sha, why=title)
        external_id = f"{key}/{JOBS_FILE}"
        if not self.state.run_done(external_id):
            report = self.reports.for_commit(trigger.repository, sha, external_id)
            try:
                await report.open(title=title, summary=text + "\n", conclusion=conclusion)
            except GitHubError as exc:
                raise Retry(f"could not report the jobs file's problem: {exc}") from None
            self.state.put_run(external_id, trigger_key=key, repository=trigger.repository,
                               data={"file": True})
            self.state.close_run(external_id)
        return ()

    # ---------------------------------------------------------------------------- cancel

    def cancel(self, request: CancelRequest, actor: str) -> None:
        """Cancel the running jobs `request` names; `actor` was found to have write permission."""
        for live in list(self._live.values()):
            state = live.state
            if state.repository.lower() != request.repository.lower():
                continue
            hit = (request.check_run_id is not None and state.check_run_id == request.check_run_id) or \
                  (request.number is not None and state.number == request.number)
            if hit and not live.cancel.is_set():
                live.cancelled_by = f"@{actor}"
                if state.job_id is not None:
                    self.host.note(state.job_id, f"hpc-runner: cancelled on GitHub by @{actor}\n")
                log.info("cancelling a GitHub job", job=state.external_id, actor=actor)
                live.cancel.set()

    # ---------------------------------------------------------------------------- one job

    def _save(self, state: RunState) -> None:
        self.state.put_run(state.external_id, trigger_key=state.trigger_key, repository=state.repository,
                           data=asdict(state))

    async def _follow(self, state: RunState) -> None:
        """Take one job from wherever it got (a restart may find it anywhere) to its final report."""
        live = LiveRun(state)
        self._live[state.external_id] = live
        try:
            while True:
                try:
                    await self._drive(state, live)
                    return
                except GitHubError as exc:
                    # Every step is recorded and repeatable (admission, the check run found
                    # again by its external id, the checkout from scratch): try again later.
                    log.warning("GitHub did not answer while preparing a job; trying again",
                                job=state.external_id, error=str(exc), retry_in=self.retry_seconds)
                    await pause(self.retry_seconds, self.host.draining)
                    if self.host.draining.is_set():
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cannot carry on with a GitHub job; a restart tries again", job=state.external_id)
        finally:
            self._live.pop(state.external_id, None)

    async def _drive(self, state: RunState, live: LiveRun) -> None:
        spec = parse_job_mapping(state.spec, f"{state.repository}:{JOBS_FILE}")
        identity = identity_from_json(state.identity, f"GitHub job {state.external_id}")
        admitted = await self.host.admit(Admission(SOURCE, state.external_id, identity, spec,
                                                   log_preamble=preamble(state, identity),
                                                   source_url=self._page_of(state)))
        fresh = state.job_id is None
        if fresh:
            state.job_id = admitted.job_id
            state.details_url = checks.details_url(self.config.log_url, admitted.job_id)
            state.summary = summary(state, identity, admitted.decision,
                                            comment_command=self.config.comment_command)
            state.title = queued_title(admitted.decision)
            state.phase = "admitted"
            self._save(state)
        report = self.reports.for_run(state)
        if not admitted.decision.allowed:
            report.status_note = "; ".join(admitted.decision.reasons)
            await self._finish(state, report, Ended(JobState.denied, None, None), LogTail())
            return
        if state.kind is None:
            # An earlier agent may have created it and stopped before it saved the id.
            found = None if fresh else await report.find()
            if found is not None:
                report.kind, report.check_run_id = "check", found
            else:
                await report.open(title=state.title, summary=state.summary)
            state.kind, state.check_run_id = report.kind, report.check_run_id
            self._save(state)
        tail = LogTail(self._secrets(spec))
        if state.phase != "running":
            token = await self._token(state.repository)
            tail = LogTail(self._secrets(spec, token))
            self.host.note(admitted.job_id, f"hpc-runner: checking out {state.sha} ({state.ref})\n")
            try:
                await self._checkout(state.clone_url, state.sha, admitted.workspace, ref=state.ref,
                                     token=token)
            except CheckoutFailed as exc:
                ended = end_failed_checkout(self.host, admitted.job_id, exc)
                await self._finish(state, report, ended, self._tail_from_file(admitted.log_path, tail))
                return
            state.phase = "running"
            self._save(state)
            runner = self.host.run
        else:
            tail = self._tail_from_file(admitted.log_path, tail, end=state.log_offset)
            runner = self.host.resume
        ended = await self._watch(state, report, live, tail, runner)
        await self._finish(state, report, ended, tail, live.cancelled_by)

    def _page_of(self, state: RunState) -> str:
        """The job's pull request, or for a push its commit, on the App's GitHub: where it came from.
        (Its check run is created after the job is admitted, on the pull request's page.)"""
        base = f"https://{github_web_host(self.config.api_url)}/{state.repository}"
        return f"{base}/pull/{state.number}" if state.number is not None else f"{base}/commit/{state.sha}"

    async def _token(self, repository: str) -> str:
        installation = await self.auth.installation_for(self.client, repo=repository)
        return await self.auth.token(self.client, installation, time.time())

    def _secrets(self, spec: JobSpec, token: str | None = None) -> list[str]:
        found = secret_values(dict(spec.env), self._redacted_vars)
        return [*found, token] if token else found

    def _tail_from_file(self, path: Path, tail: LogTail, end: int | None = None) -> LogTail:
        try:
            with path.open("rb") as handle:
                data = handle.read() if end is None else handle.read(end)
        except OSError:
            return tail
        tail.seed(data, len(data))
        return tail

    async def _watch(self, state: RunState, report: Report, live: LiveRun, tail: LogTail,
                     runner: Callable[..., Awaitable[Ended]]) -> Ended:
        """Run the job; meanwhile tell GitHub how it goes, at most every `update_interval`."""
        assert state.job_id is not None
        job_id = state.job_id
        record = self.host.job(job_id)
        running_seen = record is not None and record.state == JobState.running

        def on_change(record: JobRecord) -> None:
            nonlocal running_seen
            running_seen = running_seen or record.state == JobState.running

        def keep_offset(offset: int) -> None:
            if offset != state.log_offset:
                state.log_offset = offset
                self._save(state)

        async def sink(offset: int, data: bytes) -> None:
            if not data and offset == 0:
                keep_offset(0)
            tail.feed(offset, data)

        running = asyncio.ensure_future(runner(job_id, sink=sink, cancel=live.cancel, offset=state.log_offset,
                                               on_change=on_change))
        try:
            return await report_progress(state, report, tail, running, is_running=lambda: running_seen,
                                         keep_offset=keep_offset, update_interval=self.update_interval)
        except asyncio.CancelledError:
            running.cancel()
            raise

    async def _finish(self, state: RunState, report: Report, ended: Ended, tail: LogTail,
                      cancelled_by: str | None = None) -> None:
        completion = await send_final_report(state, report, ended, tail, cancelled_by=cancelled_by,
                                                  stopping=self.host.stopping,
                                                  retry_seconds=self.retry_seconds)
        if completion is None:
            return
        state.phase = "reported"
        self._save(state)
        self.state.close_run(state.external_id)
        log.info("GitHub job reported", job=state.external_id, conclusion=completion.conclusion)
