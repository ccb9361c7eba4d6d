"""CI sources (Buildkite today, GitHub next) and the small interface the agent offers them.

A source pulls jobs from its CI service, checks that they are trusted, and turns each into an
identity, a job spec and a workspace. Everything from the policy decision to the job's end is
the agent's (`JobHost`): a source only

1. `admit`s a job: the policy decides and the job is recorded. Admission is idempotent on the
   source's own job id, so a source that sees a job again after a restart gets the same record;
2. `run`s an admitted job with a log sink and a cancel event: the agent prepares it, runs it
   (on Slurm) and feeds `sink(offset, data)` with the job's output file from the offset the
   source persisted, until the job ends; setting `cancel` cancels it (scancel);
3. after a restart, `resume`s each job it had not finished reporting: the agent follows the
   Slurm job again (found by its `hpcr-<id>` name) or, when it ended meanwhile, feeds the rest
   of its log and returns how it ended.

Reporting the end to the CI service (exactly once) is the source's own business; the agent
reports its own final status (audit `final_status`) exactly once as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from runner.identity import Identity
from runner.job import JobState
from runner.policy import Decision, Policy
from runner.spec import JobSpec
from runner.store import Store

# (offset, data) of each new piece of the job's output file; (0, b"") says the file restarted.
LogSink = Callable[[int, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Admission:
    """A trusted job from a CI source: `external_id` is the source's own id for it."""

    source: str
    external_id: str
    identity: Identity
    spec: JobSpec
    # None: the agent gives the job a new directory of its own (a source then checks out into it).
    workspace: Path | None = None
    # The source's own lines (signature verified, notes) that open the job's log.
    log_preamble: str = ""


@dataclass(frozen=True)
class Admitted:
    job_id: str
    decision: Decision
    log_path: Path
    workspace: Path
    # False when this external job was admitted before (a restarted source asking again).
    new: bool


@dataclass(frozen=True)
class Ended:
    """How a job ended, as the agent recorded it."""

    state: JobState
    exit_status: int | None
    detail: str | None


class JobHost(Protocol):
    """What the agent offers a CI source."""

    store: Store

    @property
    def policy(self) -> Policy: ...

    @property
    def draining(self) -> asyncio.Event:
        """Set by the first SIGTERM: take no new jobs, let running ones finish."""

    @property
    def stopping(self) -> asyncio.Event:
        """Set by the second SIGTERM: running jobs are being cancelled."""

    def admit(self, admission: Admission) -> Admitted: ...

    def note(self, job_id: str, text: str) -> None:
        """Append the agent's own lines to the job's log (they reach the CI service with it)."""

    def fail(self, job_id: str, detail: str) -> Ended:
        """End an admitted job that could not be run (a failed checkout), reporting it once."""

    async def run(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event) -> Ended: ...

    async def resume(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event) -> Ended: ...


class Source(Protocol):
    async def serve(self) -> None:
        """Run until the host drains and every job taken is reported; then disconnect."""
