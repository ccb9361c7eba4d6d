"""What the agent remembers of each Buildkite job it accepted, so a restart loses nothing.

One row per accepted job (the accept answer with its job token, the phase reached, the runner
job id, the finish report) and the log outbox of `report`, all in the agent's state store
(its directory is 0700 and never bound into a job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from runner.sources.buildkite.chunks import Chunk
from runner.sources.buildkite.protocol import FinishReport
from runner.sources.buildkite.report import StreamCheckpoint
from runner.store import Store

SOURCE = "buildkite"

# accepted: verifying and admitting; admitted: a runner job exists; finishing: the report is
# known and `finish` is being sent (perhaps already arrived).
Phase = Literal["accepted", "admitted", "finishing"]


@dataclass
class AcceptedJob:
    """A Buildkite job this agent accepted: the accept answer, its job token, and how far it got."""

    bk_id: str
    job: dict[str, Any]                    # the accept answer
    token: str
    request_headers: dict[str, str]
    job_status_interval: int
    phase: Phase = "accepted"
    started: bool = False
    runner_id: str | None = None
    report: FinishReport | None = None
    finish_sent: bool = False
    checkpoint: StreamCheckpoint = field(default_factory=StreamCheckpoint)

    @property
    def env(self) -> dict[str, str]:
        """The job's env as strings (intake has checked it is a map of strings, when it is there)."""
        raw = self.job.get("env")
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "token": self.token, "request_headers": self.request_headers,
                "job_status_interval": self.job_status_interval, "phase": self.phase, "started": self.started,
                "runner_id": self.runner_id, "report": self.report.to_json() if self.report else None,
                "finish_sent": self.finish_sent}

    @classmethod
    def from_row(cls, bk_id: str, data: dict[str, Any], checkpoint: dict[str, Any] | None,
                 chunks_failed: int) -> AcceptedJob:
        report = data.get("report")
        point = StreamCheckpoint.from_json(checkpoint or {})
        point = StreamCheckpoint(**{**point.to_json(), "chunks_failed": chunks_failed})
        return cls(bk_id=bk_id, job=data["job"], token=data["token"],
                   request_headers=dict(data.get("request_headers") or {}),
                   job_status_interval=int(data.get("job_status_interval") or 1),
                   phase=data.get("phase", "accepted"),
                   started=bool(data.get("started")), runner_id=data.get("runner_id"),
                   report=FinishReport.from_json(report) if report else None,
                   finish_sent=bool(data.get("finish_sent")), checkpoint=point)


class JobMemory:
    """The Buildkite source's rows in the store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def save(self, state: AcceptedJob) -> None:
        self._store.put_source_job(SOURCE, state.bk_id, state.to_json())

    def open_jobs(self) -> list[AcceptedJob]:
        return [AcceptedJob.from_row(row.external_id, row.data, row.checkpoint, row.chunks_failed)
                for row in self._store.open_source_jobs(SOURCE)]

    def close(self, state: AcceptedJob) -> None:
        self._store.close_source_job(SOURCE, state.bk_id)

    def staged(self, state: AcceptedJob) -> list[Chunk]:
        rows = self._store.staged_log(SOURCE, state.bk_id)
        return [Chunk(row.sequence, row.offset, row.size, row.data) for row in rows]

    def outbox(self, state: AcceptedJob) -> Outbox:
        return Outbox(self._store, state)


class Outbox:
    """`LogOutbox` of one job: staged chunks, the checkpoint and the runner job's file offset move
    together in one transaction."""

    def __init__(self, store: Store, state: AcceptedJob) -> None:
        self._store = store
        self._state = state
        # Deliveries are recorded with the next staging (or at the end), not one transaction each:
        # forgetting one in a crash only means sending an identical chunk once more.
        self._delivered: list[tuple[int, bool]] = []

    def stage(self, chunks: Sequence[Chunk], checkpoint: StreamCheckpoint) -> None:
        self._state.checkpoint = checkpoint
        rows = [(c.sequence, c.offset, c.size, c.data) for c in chunks]
        delivered, self._delivered = self._delivered, []
        self._store.stage_log(SOURCE, self._state.bk_id, rows, checkpoint.to_json(),
                              job_id=self._state.runner_id, file_offset=checkpoint.file_offset,
                              delivered=delivered)

    def delivered(self, chunk: Chunk, failed: bool) -> None:
        self._delivered.append((chunk.sequence, failed))
        if failed:  # a count Buildkite must be told: recorded at once
            self.flush()

    def flush(self) -> None:
        delivered, self._delivered = self._delivered, []
        if delivered:
            self._store.unstage_log(SOURCE, self._state.bk_id, delivered)
