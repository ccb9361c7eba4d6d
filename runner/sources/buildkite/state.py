"""What the Buildkite source remembers of each job it accepted, so a restart loses nothing, in
its own SQLite file under `state_dir` (as the GitHub source keeps its own).

`buildkite.sqlite` (mode 0600, WAL, every commit synced, in the 0700 state directory that no job
can bind) holds:

* `jobs`: one row per accepted job (the accept answer with its job token, the phase reached, the
  runner job id, the finish report, the log checkpoint), open until Buildkite has its finish;
* `log_outbox`: the log chunks cut but not yet delivered. A chunk is stored before it is sent, so
  a restarted agent sends exactly the same bytes again rather than cutting anew.

Earlier versions kept these rows in the agent's store (`source_jobs`, `log_outbox`); the first
open of this file takes over the open ones, so an upgrade in the middle of a job loses nothing.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runner.sources.buildkite.chunks import Chunk
from runner.sources.buildkite.protocol import FinishReport
from runner.sources.buildkite.report import StreamCheckpoint
from runner.sqlitefile import StateFile, StoreError, decode_object, encode_json, open_database

FILENAME = "buildkite.sqlite"
# The agent's store, where earlier versions kept the source's rows.
LEGACY_STORE_FILENAME = "state.sqlite3"
SOURCE = "buildkite"

# Index i migrates the file from schema version i to i + 1; only ever append.
MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE jobs (
    external_id   TEXT PRIMARY KEY,
    data          TEXT NOT NULL,
    checkpoint    TEXT,
    chunks_failed INTEGER NOT NULL DEFAULT 0,
    done          INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX jobs_open ON jobs (done, created_at);
CREATE TABLE log_outbox (
    external_id TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    "offset"    INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (external_id, sequence)
);
""",)

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


class BuildkiteState(StateFile):
    """The source's tables; all calls on the event loop's thread, each one short transaction."""

    label = "Buildkite state"

    @classmethod
    def open(cls, state_dir: Path | str) -> BuildkiteState:
        path = Path(state_dir) / FILENAME
        fresh = not path.exists()
        conn = open_database(path, MIGRATIONS, what="Buildkite state",
                             holds="the Buildkite jobs the agent accepted and their undelivered log")
        state = cls(conn, path)
        if fresh:
            try:
                state._take_over_legacy_rows(Path(state_dir) / LEGACY_STORE_FILENAME)
            except BaseException:
                state.close()
                path.unlink(missing_ok=True)  # the next open takes them over again
                raise
        return state

    def _take_over_legacy_rows(self, store_path: Path) -> None:
        if not store_path.exists():
            return
        self._conn.execute("ATTACH DATABASE ? AS legacy", (str(store_path),))  # not inside a transaction
        try:
            tables = {row[0] for row in self._conn.execute("SELECT name FROM legacy.sqlite_master")}
            if "source_jobs" not in tables:
                return
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO jobs (external_id, data, checkpoint, chunks_failed, done, created_at,"
                    " updated_at) SELECT external_id, data, checkpoint, chunks_failed, 0, created_at,"
                    " updated_at FROM legacy.source_jobs WHERE source = ? AND done = 0", (SOURCE,))
                conn.execute(
                    'INSERT INTO log_outbox (external_id, sequence, "offset", size, data)'
                    ' SELECT o.external_id, o.sequence, o."offset", o.size, o.data FROM legacy.log_outbox o'
                    " JOIN legacy.source_jobs j ON j.source = o.source AND j.external_id = o.external_id"
                    " WHERE o.source = ? AND j.done = 0", (SOURCE,))
        finally:
            self._conn.execute("DETACH DATABASE legacy")

    def put_job(self, external_id: str, data: Mapping[str, Any]) -> None:
        """Create or replace what the source remembers of its job `external_id` (still open)."""
        encoded = encode_json(data, f"Buildkite job {external_id}")
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (external_id, data, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (external_id)"
                " DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
                (external_id, encoded, now, now))

    def open_jobs(self) -> list[AcceptedJob]:
        """The jobs not yet closed, oldest first."""
        rows = self._read("SELECT * FROM jobs WHERE done = 0 ORDER BY created_at", ())
        jobs = []
        for row in rows:
            what = f"Buildkite job {row['external_id']}"
            raw = row["checkpoint"]
            checkpoint = None if raw is None else decode_object(raw, f"{what} log")
            jobs.append(AcceptedJob.from_row(row["external_id"], decode_object(row["data"], what), checkpoint,
                                             int(row["chunks_failed"])))
        return jobs

    def close_job(self, external_id: str) -> None:
        """Buildkite has the job's finish: forget its undelivered chunks."""
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET done = 1, updated_at = ? WHERE external_id = ?",
                         (time.time(), external_id))
            conn.execute("DELETE FROM log_outbox WHERE external_id = ?", (external_id,))

    def stage_log(self, external_id: str, chunks: Iterable[Chunk], checkpoint: Mapping[str, Any], *,
                  delivered: Iterable[tuple[int, bool]] = ()) -> None:
        """Store chunks about to be sent and the log checkpoint after them, in one transaction;
        `delivered` are chunks sent since (see `unstage_log`), recorded in the same transaction."""
        encoded = encode_json(checkpoint, f"Buildkite job {external_id} log checkpoint")
        with self._transaction() as conn:
            self._unstage(conn, external_id, delivered)
            conn.executemany(
                'INSERT OR REPLACE INTO log_outbox (external_id, sequence, "offset", size, data)'
                " VALUES (?, ?, ?, ?, ?)",
                [(external_id, c.sequence, c.offset, c.size, c.data) for c in chunks])
            cursor = conn.execute("UPDATE jobs SET checkpoint = ?, updated_at = ? WHERE external_id = ?",
                                  (encoded, time.time(), external_id))
            if cursor.rowcount == 0:
                raise StoreError(f"no Buildkite job {external_id} in {self.path}")

    def unstage_log(self, external_id: str, delivered: Iterable[tuple[int, bool]]) -> None:
        """Staged chunks (by sequence) were delivered, or given up on (failed, which is counted)."""
        with self._transaction() as conn:
            self._unstage(conn, external_id, delivered)

    def _unstage(self, conn: sqlite3.Connection, external_id: str,
                 delivered: Iterable[tuple[int, bool]]) -> None:
        done = list(delivered)
        conn.executemany("DELETE FROM log_outbox WHERE external_id = ? AND sequence = ?",
                         [(external_id, sequence) for sequence, _ in done])
        failed = sum(1 for _, given_up in done if given_up)
        if failed:
            conn.execute("UPDATE jobs SET chunks_failed = chunks_failed + ?, updated_at = ?"
                         " WHERE external_id = ?", (failed, time.time(), external_id))

    def staged(self, external_id: str) -> list[Chunk]:
        rows = self._read('SELECT sequence, "offset", size, data FROM log_outbox WHERE external_id = ?'
                          " ORDER BY sequence", (external_id,))
        return [Chunk(int(r["sequence"]), int(r["offset"]), int(r["size"]), bytes(r["data"])) for r in rows]


class JobMemory:
    """What the source code asks of its state, job by job."""

    def __init__(self, state: BuildkiteState) -> None:
        self._state = state

    def save(self, job: AcceptedJob) -> None:
        self._state.put_job(job.bk_id, job.to_json())

    def open_jobs(self) -> list[AcceptedJob]:
        return self._state.open_jobs()

    def close(self, job: AcceptedJob) -> None:
        self._state.close_job(job.bk_id)

    def staged(self, job: AcceptedJob) -> list[Chunk]:
        return self._state.staged(job.bk_id)

    def outbox(self, job: AcceptedJob) -> Outbox:
        return Outbox(self._state, job)


class Outbox:
    """`LogOutbox` of one job: staged chunks and the checkpoint move together in one transaction."""

    def __init__(self, state: BuildkiteState, job: AcceptedJob) -> None:
        self._state = state
        self._job = job
        # Deliveries are recorded with the next staging (or at the end), not one transaction each:
        # forgetting one in a crash only means sending an identical chunk once more.
        self._delivered: list[tuple[int, bool]] = []

    def stage(self, chunks: Sequence[Chunk], checkpoint: StreamCheckpoint) -> None:
        self._job.checkpoint = checkpoint
        delivered, self._delivered = self._delivered, []
        self._state.stage_log(self._job.bk_id, chunks, checkpoint.to_json(), delivered=delivered)

    def delivered(self, chunk: Chunk, failed: bool) -> None:
        self._delivered.append((chunk.sequence, failed))
        if failed:  # a count Buildkite must be told: recorded at once
            self.flush()

    def flush(self) -> None:
        delivered, self._delivered = self._delivered, []
        if delivered:
            self._state.unstage_log(self._job.bk_id, delivered)

