"""The agent's job metrics, from the lifecycle's own announcements: each job admitted
(`Admissions.watch`) and each change of a job's state (`JobDriver.watch_every`), so every start
and end is counted once, whichever source the job came from. The gauges of waiting and running
jobs are counted from the store when scraped, so they are right from the agent's first moment.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from runner import metrics
from runner.job import JobRecord, JobState
from runner.lifecycle.admission import Admissions
from runner.lifecycle.driver import JobDriver
from runner.store import Store

WAITING_STATES = (JobState.queued, JobState.pending)

# The policy's reasons (runner/policy/engine.py) as kinds of few values, first match wins.
_DENIAL_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern)) for kind, pattern in (
        ("no_grant", r"no grant names this identity"),
        ("concurrency", r"already runs \d+ jobs"),
        ("partition", r"partition .* is not one of"),
        ("resources", r"(nodes|tasks|CPUs per task|GPUs) exceed|walltime .* exceeds|memory .* exceeds"),
        ("signature", r"not signed|requires a signature"),
        ("event", r"^(grant '[^']*': )?event "),
        ("ref", r"refs? |has no ref"),
        ("fork", r"from a fork"),
        ("account", r"asks for account"),
        ("image", r"^(grant '[^']*': )?image "),
        ("bind", r"bind .* is not granted"),
        ("capability", r"grant has (mpi|gpus|network) = false"),
    ))


def denial_kinds(reasons: list[str] | tuple[str, ...]) -> set[str]:
    """The kinds of a denial's reasons ("other" for a reason of no known kind)."""
    kinds = set()
    for reason in reasons:
        kinds.add(next((kind for kind, pattern in _DENIAL_KINDS if pattern.search(reason)), "other"))
    return kinds


def account_of(record: JobRecord) -> str:
    account = (record.decision or {}).get("account")
    return str(account) if account else metrics.NO_ACCOUNT


class JobMetering:
    """Counts jobs' starts and ends, their waits and runs, and the policy's denials."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        # Each job's last state seen, and when it was seen to start running (None: before a restart).
        self._last: dict[str, JobState] = {}
        self._running_since: dict[str, float | None] = {}

    def attach(self, admissions: Admissions, driver: JobDriver) -> None:
        admissions.watch(self.admitted)
        driver.watch_every(self.changed)
        metrics.agent().job_gauges.counts = self.counts

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        return (self._store.count_by_account(WAITING_STATES),
                self._store.count_by_account((JobState.running,)))

    def admitted(self, job_id: str) -> None:
        record = self._store.get_job(job_id)
        if record is None:
            return
        decision = record.decision or {}
        if decision.get("allowed") is not True:
            for kind in denial_kinds([str(reason) for reason in decision.get("reasons") or ()]):
                metrics.agent().policy_denials.labels(kind).inc()
        self.changed(record)

    def changed(self, record: JobRecord) -> None:
        before = self._last.get(record.id)
        if before == record.state:
            return  # news of where it waits or runs, not of its state
        source, account, now = record.source, account_of(record), self._clock()
        agent = metrics.agent()
        if record.state == JobState.running:
            if before is not None:  # not a job a previous agent started
                agent.jobs_started.labels(source, account).inc()
                agent.job_queue_wait.labels(source).observe(max(now - record.created_at, 0.0))
                self._running_since[record.id] = now
            else:
                self._running_since[record.id] = None
        if record.state.is_terminal:
            agent.jobs_ended.labels(source, account, record.state.value).inc()
            since = self._running_since.pop(record.id, None)
            if since is not None:
                agent.job_run.labels(source).observe(max(now - since, 0.0))
            self._last.pop(record.id, None)
            return
        self._last[record.id] = record.state
