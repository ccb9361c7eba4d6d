"""CI sources (Buildkite, GitHub) and the narrow door the agent offers them (docs/architecture.md).

A source pulls jobs from its CI service, checks that they are trusted (its own trust step), and
turns each into an identity, a job spec and a workspace. Everything from the policy decision to
the job's end is the agent's (`runner.lifecycle`); through `JobHost` a source only

1. `admit`s a job: the policy decides and the job is recorded. Admission is idempotent on the
   source's own job id, so a source that sees a job again after a restart gets the same record;
2. `run`s an admitted job with a log sink and a cancel event: the agent prepares it, runs it and
   feeds `sink(offset, data)` with the job's output file from the `offset` the source keeps,
   until the job ends; setting `cancel` cancels it; `on_change` sees each change of its state;
3. after a restart, `resume`s each job it had not finished reporting: the agent follows the
   Slurm job again (found by its `hpcr-<id>` name) or, when it ended meanwhile, feeds the rest
   of its log and returns how it ended;
4. reads its jobs through `job` (a read-only record), never the agent's store.

Each source keeps what it must remember (its jobs, its log offsets) in its own state, and
reports the end to its CI service exactly once; the agent records its own final status once.
Both sources are laid out alike: `client` (the service's API), `intake` (jobs in), `confirm` or
`signature` (trust), `translate` (to an identity and a job spec), `checkout`, `report` (the log
and the end, back to the service), `state`, and `source` (the loop that ties them together).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from runner.job import Ended, JobRecord
from runner.lifecycle.admission import Admission, Admitted
from runner.lifecycle.driver import StateWatcher
from runner.logs.tail import LogSink
from runner.policy import Policy

__all__ = ["Admission", "Admitted", "Ended", "JobHost", "LogSink", "Source", "StateWatcher"]


class JobHost(Protocol):
    """What the agent offers a CI source."""

    @property
    def policy(self) -> Policy: ...

    @property
    def draining(self) -> asyncio.Event:
        """Set by the first SIGTERM: take no new jobs, let running ones finish."""

    @property
    def stopping(self) -> asyncio.Event:
        """Set by the second SIGTERM: running jobs are being cancelled."""

    async def admit(self, admission: Admission) -> Admitted: ...

    def job(self, job_id: str) -> JobRecord | None:
        """The job as the agent recorded it (read-only)."""

    def note(self, job_id: str, text: str) -> None:
        """Append the agent's own lines to the job's log (they reach the CI service with it)."""

    def fail(self, job_id: str, detail: str) -> Ended:
        """End an admitted job that could not be run (a failed checkout), reporting it once."""

    async def run(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                  on_change: StateWatcher | None = None) -> Ended: ...

    async def resume(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                     on_change: StateWatcher | None = None) -> Ended: ...


class Source(Protocol):
    async def serve(self) -> None:
        """Run until the host drains and every job taken is reported; then disconnect."""
