"""The hub's jobs for the dashboard (`runner.web.board.JobBoard`): every cluster's jobs, as the
job store holds them, each viewer seeing what the REST API would show a caller with the same
principals (`access`: its submitter, its account's admins and members) and cancelling what it
would let that caller cancel (its submitter and its account's admins).

A page of the list is one indexed query of the store (`JobStore.page`), filtered and cut in SQL,
newest first from the `before` job on; nothing waits for more than the job store's thread. Waits
for a change take their event before they look (`polling`), as the REST API's log follower does.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping
from typing import Any, Protocol

from runner.gateway.access import NOT_CANCELLABLE, Access, access_of, caller_keys
from runner.gateway.agent_jobs_api import LIST_CHANGED, job_changed
from runner.gateway.jobs_api import cancel_job, open_output
from runner.gateway.jobs_protocol import MAX_LOG_READ_BYTES
from runner.gateway.jobstore import JobNotFound, JobStore, ListFilter, StoredJob
from runner.gateway.outputs import OutputFiles, parse_record
from runner.gateway.polling import Wakeups, wait_for_change
from runner.gateway.statethread import StateThread
from runner.job import JobState
from runner.web.board import (
    MAX_PAGE_SIZE,
    JobCard,
    JobDetail,
    ListQuery,
    NotCancellable,
    NotReplayable,
    NotVisible,
    OpenedOutput,
    OutputEntry,
    Page,
    Resources,
    SourceLink,
    Viewer,
)

_WAITING = frozenset({JobState.queued.value, JobState.pending.value})


class HubBoard:
    """`JobBoard` over the hub's job store (used from its thread) and its wake-ups."""

    def __init__(self, jobs: StateThread[JobStore], wakeups: Wakeups,
                 outputs: OutputFiles | None = None) -> None:
        self._jobs = jobs
        self._wakeups = wakeups
        self._files = outputs

    @property
    def _outputs(self) -> OutputFiles:
        """The output files (beside the job store, unless told where)."""
        if self._files is None:
            self._files = OutputFiles(self._jobs.file.path.parent)
        return self._files

    async def page(self, viewer: Viewer, query: ListQuery) -> Page:
        keys = caller_keys(viewer.principals)
        limit = max(1, min(query.limit, MAX_PAGE_SIZE))
        where = ListFilter(states=query.states, account=query.account, source=query.source, text=query.text)
        store = self._jobs.file
        try:
            # One more than the page: whether there is a next page, without a second query.
            rows = await self._jobs.run(store.page, keys, where, limit=limit + 1, before=query.before)
        except JobNotFound:
            rows = []      # a `before` that names no job: nothing comes before it
        accounts = await self._jobs.run(store.visible_accounts, keys)
        cards = [_card_of_row(row) for row in rows[:limit]]
        following = cards[-1].id if len(rows) > limit else None
        return Page(cards=cards, next_before=following, accounts=tuple(accounts))

    async def detail(self, viewer: Viewer, job_id: str) -> JobDetail:
        job, access = await self._visible(viewer, job_id)
        return _detail(job, access)

    async def read_log(self, viewer: Viewer, job_id: str, offset: int, size: int) -> bytes:
        job, _ = await self._visible(viewer, job_id)
        if offset < 0 or size <= 0 or offset >= job.log_length:
            return b""
        return await self._jobs.run(self._jobs.file.read_log, job.id, offset, min(size, MAX_LOG_READ_BYTES))

    async def wait_for_log(self, job_id: str, offset: int, timeout: float) -> None:
        if self._wakeups.stopping:
            return
        changed = self._wakeups.event(job_changed(job_id))      # taken before looking
        job = await self._jobs.run(self._jobs.file.get, job_id)
        if job is None or job.log_length > offset or job.ended_for_good:
            return
        await wait_for_change(changed, timeout)

    async def wait_for_jobs(self, timeout: float) -> None:
        if self._wakeups.stopping:
            return
        await wait_for_change(self._wakeups.event(LIST_CHANGED), timeout)

    async def cancel(self, viewer: Viewer, job_id: str) -> JobDetail:
        job, access = await self._visible(viewer, job_id)
        if access is not Access.CANCEL:
            raise NotCancellable(NOT_CANCELLABLE.format(job_id=job.id))
        return _detail(await cancel_job(self._jobs, self._wakeups, job.id, _actor(viewer)), access)

    # A replay runs on the agent that ran the job, from a checkout there: the page shows the command.
    replays = False

    async def replay(self, viewer: Viewer, job_id: str) -> str:
        job, access = await self._visible(viewer, job_id)
        if access is not Access.CANCEL:
            raise NotCancellable(NOT_CANCELLABLE.format(job_id=job.id))
        raise NotReplayable(f"job {job.id} is replayed on its cluster ({job.cluster}), from a checkout of "
                            "what it ran: run the command its page shows there")

    async def provenance(self, viewer: Viewer, job_id: str) -> bytes | None:
        job, _ = await self._visible(viewer, job_id)
        return await self._jobs.run(self._jobs.file.provenance, job.id)

    async def outputs(self, viewer: Viewer, job_id: str) -> tuple[OutputEntry, ...]:
        job, _ = await self._visible(viewer, job_id)
        record = await self._jobs.run(self._jobs.file.provenance, job.id)
        if record is None:
            return ()
        held = await self._jobs.run(self._jobs.file.outputs, job.id)
        return tuple(OutputEntry(output.path, output.sha256, output.size,
                                 held.get(output.path) == (output.sha256, output.size))
                     for output in parse_record(record))

    async def open_output(self, viewer: Viewer, job_id: str, path: str) -> OpenedOutput | None:
        job, _ = await self._visible(viewer, job_id)
        return await open_output(self._jobs, self._outputs, job.id, path)

    async def _visible(self, viewer: Viewer, job_id: str) -> tuple[StoredJob, Access]:
        job = await self._jobs.run(self._jobs.file.get, job_id)
        access = Access.NONE if job is None else access_of(job.access, caller_keys(viewer.principals))
        if job is None or access is Access.NONE:
            raise NotVisible(job_id)
        return job, access


def _actor(viewer: Viewer) -> str:
    """The viewer as the audit trail names who asked for a cancel: their user principal."""
    return next((principal for principal in viewer.principals if ":user:" in principal), viewer.name)


class _Values(Protocol):
    """A row of the list's columns (`CARD_COLUMNS`), or the same values of a stored job."""

    def __getitem__(self, key: str) -> Any: ...


def _card(values: _Values, *, accepted: bool) -> JobCard:
    state = str(values["state"])
    reason = values["state_reason"] if state in _WAITING else None
    if reason is None and state == JobState.queued.value and not accepted:
        reason = (f"waiting for an agent of {values['cluster']}" if values["cluster"]
                  else "waiting for an agent")
    kind = str(values["source"] or "api")
    return JobCard(
        id=str(values["id"]), name=str(values["name"] or ""), state=state, state_reason=reason,
        account=values["account"], cluster=values["cluster"],
        source=SourceLink(kind=kind, label=str(values["source_label"] or kind), url=values["source_url"]),
        actor=values["actor"], slurm_job_id=values["slurm_job_id"], created=float(values["created"]),
        started=values["started"], ended=values["ended"])


def _card_of_row(row: sqlite3.Row) -> JobCard:
    return _card(row, accepted=row["accepted_at"] is not None)


def _card_of_job(job: StoredJob) -> JobCard:
    values = {"id": job.id, "name": job.name, "state": job.state, "state_reason": job.state_reason,
              "account": job.account, "cluster": job.cluster, "source": job.source,
              "source_label": job.source_label, "source_url": job.source_url, "actor": job.actor,
              "slurm_job_id": job.slurm_job_id, "created": job.created, "started": job.started,
              "ended": job.ended}
    return _card(values, accepted=job.accepted)


def _detail(job: StoredJob, access: Access) -> JobDetail:
    image = job.job.get("image")
    return JobDetail(card=_card_of_job(job), exit_status=job.exit_status, grant=job.grant,
                     reasons=job.reasons,
                     resources=dataclasses.replace(resources_of(job.job), node_list=job.node_list),
                     image=image if isinstance(image, str) else None, log_length=job.log_length,
                     may_cancel=access is Access.CANCEL)


def resources_of(job: Mapping[str, Any]) -> Resources:
    """What a job table asks for, as its submitter wrote it (`"4G"`, `"1h"`)."""
    table = job.get("resources")
    if not isinstance(table, Mapping):
        return Resources()

    def whole(key: str) -> int | None:
        value = table.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def text(key: str) -> str | None:
        value = table.get(key)
        return None if value is None or isinstance(value, bool) else str(value)

    tasks = whole("tasks")
    per_node = whole("tasks_per_node")
    if tasks is None and per_node is not None:
        tasks = (whole("nodes") or 1) * per_node
    return Resources(nodes=whole("nodes"), tasks=tasks, cpus_per_task=whole("cpus_per_task"),
                     gpus=whole("gpus"), memory=text("memory"), time=text("time"))
