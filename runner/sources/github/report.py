"""What GitHub is told about a job: its report (a check run, else a commit status), the summary and
titles it shows, its log tail at most every `update_interval` while it runs, and its final report.

The report's own wire format and GitHub's limits are `checks`'; this module decides what goes in it
and when. Saving and closing the run once reported is the caller's (`runs`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from runner.identity import Identity
from runner.job import JobState
from runner.logging_setup import get_logger
from runner.policy import Decision
from runner.sources import Ended
from runner.sources.github import checks, translate
from runner.sources.github.checks import Completion, LogTail, Report, code, log_text
from runner.sources.github.client import GitHubClient, GitHubError
from runner.sources.github.state import RunState

log = get_logger("runner.sources.github")

# How often a running job's state is looked at; GitHub hears of it at most every update_interval.
TICK_SECONDS = 1.0
FINAL_REPORT_ATTEMPTS = 10


class Reports:
    """Makes the reports of one agent's jobs and triggers.

    They all share `forbidden`, the repositories where GitHub refused check runs, so a refusal met
    once turns every later report there into a commit status.
    """

    def __init__(self, client: GitHubClient) -> None:
        self.client = client
        self.forbidden: set[str] = set()

    def for_run(self, state: RunState) -> Report:
        """A job's own report (`hpc-runner/<job>`), with a Cancel button while it is open."""
        return Report(self.client, repository=state.repository, sha=state.sha,
                      name=checks.check_name(state.job), external_id=state.external_id,
                      details_url=state.details_url, forbidden=self.forbidden, kind=state.kind,
                      check_run_id=state.check_run_id, cancellable=True)

    def for_commit(self, repository: str, sha: str, external_id: str, *, kind: str | None = None,
                   check_run_id: int | None = None) -> Report:
        """The `hpc-runner` report of a trigger rather than a job (approval asked, broken jobs file)."""
        return Report(self.client, repository=repository, sha=sha, name=checks.check_name(None),
                      external_id=external_id, details_url=None, forbidden=self.forbidden, kind=kind,
                      check_run_id=check_run_id, cancellable=False)


def preamble(state: RunState, identity: Identity) -> str:
    """The line that opens the job's log."""
    return (f"hpc-runner: GitHub {state.repository} commit {state.sha} ({state.ref}), "
            f"job {state.job}, as {identity.actor_principal}\n")


def summary(state: RunState, identity: Identity, decision: Decision, *, comment_command: str | None) -> str:
    """The check run's summary: the commit, who it runs as, what the policy decided, how to cancel."""
    principals = ", ".join(code(p) for p in identity.principals())
    sections: dict[str, Any] = {
        "Commit": f"{code(state.sha)} ({code(state.ref)})",
        "Identity": f"{principals}; event {code(identity.effective_event)}; fork: "
                    f"{'yes' if identity.fork else 'no'}",
    }
    if decision.allowed and decision.slurm is not None:
        slurm = decision.slurm
        sections["Decision"] = (
            f"allowed by grant {code(decision.grant)}: account {code(decision.account)} (Slurm account "
            f"{code(slurm.account)}), partition {code(slurm.partition)}, {slurm.nodes} node(s), "
            f"{slurm.tasks} task(s), walltime {code(slurm.to_json()['time'])}")
        sections["Notes"] = list(decision.notes)
    else:
        sections["Decision"] = "denied by the site's policy"
        sections["Reasons"] = list(decision.reasons)
    cancel = translate.cancel_command(comment_command or "")
    if cancel and state.number is not None:
        sections["Cancel"] = f"comment {code(cancel)} on the pull request (write permission needed)"
    if state.details_url:
        sections["Full log"] = state.details_url
    return checks.summary(sections)


def queued_title(decision: Decision) -> str:
    if not decision.allowed:
        return "Denied by the site's policy"
    if decision.waits is not None:
        return f"Waiting in the agent's queue: {decision.waits}"
    slurm = decision.slurm
    partition = f" on partition {slurm.partition}" if slurm is not None else ""
    return f"Queued: account {decision.account}{partition}"


def progress_title(status: str) -> str:
    return "Running on the cluster" if status == "in_progress" else "Queued"


async def report_progress(state: RunState, report: Report, tail: LogTail, running: asyncio.Future[Ended], *,
                          is_running: Callable[[], bool], keep_offset: Callable[[int], None],
                          update_interval: float) -> Ended:
    """Until `running` ends, tell GitHub how the job goes when something changed, at most every
    `update_interval`; the log offset reported is kept (`keep_offset`) so a restart carries on
    from there."""
    assert state.job_id is not None
    job_id = state.job_id
    sent_version = -1
    sent_status = "queued"
    last_write = time.monotonic()
    tick = min(TICK_SECONDS, update_interval / 4)
    while not running.done():
        await asyncio.wait({running}, timeout=tick)
        if running.done():
            break
        status = "in_progress" if is_running() or tail.end else "queued"
        changed = tail.version != sent_version or status != sent_status
        if not changed or time.monotonic() - last_write < update_interval:
            continue
        if tail.end:
            keep_offset(tail.end)
        try:
            await report.update(title=progress_title(status), summary=state.summary,
                                text=log_text(tail, full_log=state.details_url),
                                status="in_progress" if status != sent_status else None)
            sent_version, sent_status = tail.version, status
        except GitHubError as exc:
            log.warning("could not update the check run; trying again later", job=job_id, error=str(exc))
        last_write = time.monotonic()
    ended = running.result()
    if tail.end:
        keep_offset(tail.end)
    return ended


async def send_final_report(state: RunState, report: Report, ended: Ended, tail: LogTail, *,
                            cancelled_by: str | None, stopping: asyncio.Event,
                            retry_seconds: float) -> Completion | None:
    """Send the job's one final report; how it completed, or None when GitHub did not take it and
    the run stays open (the next start of the agent sends it)."""
    tail.close()
    completion = checks.completion_of(ended)
    if cancelled_by and ended.state == JobState.cancelled:
        completion = Completion("cancelled", f"Cancelled by {cancelled_by}", completion.lines)
    elif ended.state == JobState.cancelled and stopping.is_set():
        completion = Completion("cancelled", "Cancelled: the agent was stopped", completion.lines)
    text_summary = state.summary
    if completion.lines:
        text_summary += "\n" + checks.summary({"Outcome": list(completion.lines)})
    if ended.outputs or ended.outputs_left_out:
        # What the job left, with the digests its provenance record holds, for whoever reviews the
        # run, and what it matched that was not kept.
        sections = checks.outputs_sections(ended.outputs, ended.outputs_left_out)
        text_summary += "\n" + checks.summary(sections)
    text = log_text(tail, full_log=state.details_url)
    for attempt in range(1, FINAL_REPORT_ATTEMPTS + 1):
        try:
            if report.kind is None:
                await report.open(title=completion.title, summary=text_summary,
                                  conclusion=completion.conclusion, text=text)
                state.kind, state.check_run_id = report.kind, report.check_run_id
            else:
                await report.complete(completion, summary=text_summary, text=text)
            return completion
        except GitHubError as exc:
            log.error("could not send the job's final report", job=state.external_id, error=str(exc),
                      attempt=attempt)
            if attempt == FINAL_REPORT_ATTEMPTS or stopping.is_set():
                return None
            await asyncio.sleep(retry_seconds)
    return None
