"""Follow any number of Slurm jobs with one squeue call per polling cycle.

Each cycle asks squeue once for every tracked job, in every state. Its row has all the tracker
needs: the state, the pending reason, Slurm's estimated start (the same one `squeue --start`
prints, so that needs no call of its own), and for a job that ended its exit code and requeue
flag. Only a job that squeue no longer lists at all costs one `scontrol show job` more, once.
When a call fails or times out, nothing changes: every job keeps its state and stays tracked,
and the next cycle comes after an exponentially growing, jittered delay (so that many agents do
not retry in step).

Listeners get events: a state change, a pending job's reason or estimated start, the nodes a
job was given (once it runs, or was found ended), a note for the job's log (requeued,
suspended...), and the final outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from runner.executors.slurm.cli import SlurmUnavailable, SqueueRow
from runner.executors.slurm.states import (
    FINAL_STATES,
    JobReport,
    Phase,
    interpret,
    interpret_missing,
    normalize_state,
    parse_exit_status,
    report_from_record,
)
from runner.job import Outcome
from runner.tasks import pause

__all__ = [
    "DEFAULT_INTERVAL_SECONDS",
    "DEFAULT_MAX_DELAY_SECONDS",
    "CycleStats",
    "Finished",
    "JobNote",
    "NodesGiven",
    "PendingInfo",
    "QueryFailed",
    "SlurmQueries",
    "StateChanged",
    "Tracker",
    "TrackerEvent",
    "backoff_delay",
    "read_exit_status",
    "report_from_row",
]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 5.0
DEFAULT_MAX_DELAY_SECONDS = 300.0
DEFAULT_JITTER = 0.2


class SlurmQueries(Protocol):
    """What the tracker asks of Slurm (`SlurmCli` does it; tests use a fake)."""

    async def squeue(self, ids: Collection[str]) -> dict[str, SqueueRow]: ...

    async def show_job(self, slurm_id: str) -> dict[str, str] | None: ...


@dataclass(frozen=True)
class StateChanged:
    slurm_id: str
    previous: str | None  # Slurm's state name; None for the first sighting
    state: str
    phase: Phase


@dataclass(frozen=True)
class PendingInfo:
    slurm_id: str
    reason: str | None
    estimated_start: str | None


@dataclass(frozen=True)
class NodesGiven:
    """The nodes a job runs (or ran) on, as Slurm names them ("cn[01-04]"): said when first seen
    and whenever they change (a requeued job may land elsewhere)."""

    slurm_id: str
    node_list: str


@dataclass(frozen=True)
class JobNote:
    slurm_id: str
    text: str  # a line for the job's log


@dataclass(frozen=True)
class Finished:
    slurm_id: str
    outcome: Outcome


@dataclass(frozen=True)
class QueryFailed:
    """A cycle's query failed; no job changed. The next cycle comes in `retry_in` seconds."""

    error: str
    failures: int  # consecutive failed cycles
    retry_in: float


TrackerEvent = StateChanged | PendingInfo | NodesGiven | JobNote | Finished | QueryFailed


@dataclass(frozen=True)
class CycleStats:
    jobs: int  # jobs tracked at the start of the cycle
    commands: int  # Slurm commands the cycle ran
    failed: bool
    seconds: float


@dataclass
class _Job:
    status_path: Path | None
    state: str | None = None
    was_running: bool = False
    pending: tuple[str | None, str | None] | None = None
    node_list: str | None = None
    listeners: list[Callable[[TrackerEvent], None]] = field(default_factory=list)


def report_from_row(row: SqueueRow) -> JobReport:
    """What one squeue row says about its job."""
    return JobReport(normalize_state(row.state), reason=row.reason, exit_code=row.exit_code,
                     requeue=row.requeue, time_limit=row.time_limit)


def backoff_delay(interval: float, failures: int, *, cap: float, jitter: float, rng: random.Random) -> float:
    """The delay before the next cycle: `interval` after a good cycle, doubling with every failed
    one up to `cap`; then shortened by up to `jitter` (a fraction) at random."""
    base = min(cap, interval * 2.0 ** min(failures, 32))
    return base * (1.0 - jitter * rng.random())


def read_exit_status(path: Path | None) -> int | None:
    """The exit status the batch script wrote, or None when there is none (yet)."""
    if path is None:
        return None
    try:
        return parse_exit_status(path.read_text(encoding="ascii", errors="replace"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        # Unreadable is not absent, but Slurm's own exit code is the next best answer.
        log.warning("cannot read the exit status %s: %s", path, exc.strerror)
        return None


class Tracker:
    """Tracks jobs; `run()` polls until none is left, `poll_once()` is one cycle."""

    def __init__(self, slurm: SlurmQueries, *, interval: float = DEFAULT_INTERVAL_SECONDS,
                 max_delay: float = DEFAULT_MAX_DELAY_SECONDS, jitter: float = DEFAULT_JITTER,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        if interval <= 0 or max_delay < interval or not 0 <= jitter < 1:
            raise ValueError("need 0 < interval <= max_delay and 0 <= jitter < 1")
        self.slurm = slurm
        self.interval = interval
        self.max_delay = max_delay
        self.jitter = jitter
        self.rng = rng or random.Random()
        self._sleep = sleep
        self._jobs: dict[str, _Job] = {}
        self._listeners: list[Callable[[TrackerEvent], None]] = []
        self.failures = 0
        self.last_cycle: CycleStats | None = None
        self._wake = asyncio.Event()
        self._commands = 0

    @property
    def tracked(self) -> list[str]:
        return list(self._jobs)

    def track(self, slurm_id: str, status_path: Path | None = None) -> None:
        """Follow `slurm_id`; `status_path` is where its batch script writes the exit status."""
        job = self._jobs.setdefault(slurm_id, _Job(status_path))
        if status_path is not None:
            job.status_path = status_path
        self._wake.set()

    def forget(self, slurm_id: str) -> None:
        self._jobs.pop(slurm_id, None)

    def state_of(self, slurm_id: str) -> str | None:
        """The Slurm state last seen for a tracked job (None: not seen yet, or not tracked)."""
        job = self._jobs.get(slurm_id)
        return job.state if job else None

    def listen(self, callback: Callable[[TrackerEvent], None],
               slurm_id: str | None = None) -> Callable[[], None]:
        """Call `callback` with every event (of `slurm_id` only, if given); returns an unsubscribe."""
        targets = self._listeners if slurm_id is None else self._jobs[slurm_id].listeners
        targets.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                targets.remove(callback)

        return unsubscribe

    async def run(self) -> None:
        """Poll until no job is tracked. Cycles start at once when a job is added."""
        while self._jobs:
            self._wake.clear()
            delay = await self.poll_once()
            if not self._jobs:
                return
            await self._pause(delay)

    def wake(self) -> None:
        """Start the next cycle now (a job was added, or someone needs fresh news)."""
        self._wake.set()

    async def _pause(self, delay: float) -> None:
        if self._sleep is not None:
            await self._sleep(delay)
            return
        await pause(delay, self._wake)

    async def poll_once(self) -> float:
        """One cycle: query, interpret, emit. Returns the delay until the next cycle."""
        started = time.monotonic()
        self._commands = 0
        ids = list(self._jobs)
        failed = False
        try:
            if ids:
                await self._cycle(ids)
        except Exception as exc:
            # SlurmUnavailable is expected; anything else is a bug, logged loudly, but it must
            # not end the polling that every watched job depends on.
            if not isinstance(exc, SlurmUnavailable):
                log.exception("tracker cycle failed")
            failed = True
            self.failures += 1
            delay = backoff_delay(self.interval, self.failures, cap=self.max_delay, jitter=self.jitter,
                                  rng=self.rng)
            log.warning("Slurm query failed (%d in a row), next try in %.1f s: %s", self.failures, delay, exc)
            failure = QueryFailed(str(exc), self.failures, delay)
            # Every tracked job was concerned (and is still waiting for news).
            for callback in [*self._listeners, *(c for job in self._jobs.values() for c in job.listeners)]:
                self._call(callback, failure)
        else:
            self.failures = 0
            delay = backoff_delay(self.interval, 0, cap=self.max_delay, jitter=self.jitter, rng=self.rng)
        self.last_cycle = CycleStats(len(ids), self._commands, failed, time.monotonic() - started)
        return delay

    async def _cycle(self, ids: list[str]) -> None:
        self._commands += 1
        rows = await self.slurm.squeue(ids)
        # Each job's news is applied as soon as it is complete: a call that fails below leaves
        # that job, and the ones after it, exactly as they were until the next cycle.
        for slurm_id in ids:
            job = self._jobs.get(slurm_id)
            if job is None:
                continue
            row = rows.get(slurm_id)
            if row is None:
                await self._vanished(slurm_id, job)
                continue
            self._apply(slurm_id, job, report_from_row(row), row)

    async def _vanished(self, slurm_id: str, job: _Job) -> None:
        # squeue lists every state, so a job missing from it has left the controller's memory
        # (MinJobAge) or was never there; scontrol must confirm before anything is concluded.
        self._commands += 1
        record = await self.slurm.show_job(slurm_id)
        if record is None:
            status = interpret_missing(slurm_id, read_exit_status(job.status_path))
            assert status.outcome is not None
            self._finish(slurm_id, job, status.outcome)
            return
        self._apply(slurm_id, job, report_from_record(record), None)

    def _apply(self, slurm_id: str, job: _Job, report: JobReport, row: SqueueRow | None) -> None:
        exit_status = read_exit_status(job.status_path) if report.state in FINAL_STATES else None
        status = interpret(report, exit_status=exit_status, was_running=job.was_running)
        if report.state != job.state:
            previous, job.state = job.state, report.state
            self._emit(StateChanged(slurm_id, previous, report.state, status.phase), job)
            if status.note:
                self._emit(JobNote(slurm_id, status.note), job)
        if status.phase == "running":
            job.was_running = True
            job.pending = None
        if status.phase != "pending" and row is not None and row.node_list \
                and row.node_list != job.node_list:
            # Before `Finished`: a job that ran and ended between two cycles still says where.
            job.node_list = row.node_list
            self._emit(NodesGiven(slurm_id, row.node_list), job)
        if status.phase == "pending" and row is not None:
            info = (row.reason, row.start)
            if info != job.pending:
                job.pending = info
                self._emit(PendingInfo(slurm_id, row.reason, row.start), job)
        if status.phase == "finished":
            assert status.outcome is not None
            self._finish(slurm_id, job, status.outcome)

    def _finish(self, slurm_id: str, job: _Job, outcome: Outcome) -> None:
        self._jobs.pop(slurm_id, None)
        self._emit(Finished(slurm_id, outcome), job)

    def _emit(self, event: TrackerEvent, job: _Job) -> None:
        for callback in [*self._listeners, *job.listeners]:
            self._call(callback, event)

    @staticmethod
    def _call(callback: Callable[[TrackerEvent], None], event: TrackerEvent) -> None:
        try:
            callback(event)
        except Exception:
            # A listener's bug must not stop the tracking of every other job.
            log.exception("tracker listener failed on %r", event)
