"""What the hub publisher remembers of each job of the agent's other sources it publishes, in its
own SQLite file under `state_dir` (as each source keeps its own).

`published.sqlite` (mode 0600, WAL, every commit synced) holds one row per job: whether the hub
registered it, and how much of its log the hub acknowledged. A row stays open until the hub has
the job's final state, so a restarted agent carries on publishing from where it was.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from runner.sqlitefile import BUSY_TIMEOUT_MS, StateFile, StoreError
from runner.store import DB_FILENAME, Store

FILENAME = "published.sqlite"

# Index i migrates the file from schema version i to i + 1; only ever append.
MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE published (
    job_id      TEXT PRIMARY KEY,
    registered  INTEGER NOT NULL DEFAULT 0,
    log_offset  INTEGER NOT NULL DEFAULT 0,
    done        INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX published_open ON published (done, created_at);
""",)


@dataclass
class PublishedJob:
    """A job of another source on its way to the hub; at the hub it has the agent's own job id."""

    hub_id: str
    registered: bool = False
    log_offset: int = 0                 # how much of the job's log the hub acknowledged


class PublishedState(StateFile):
    """The publisher's table; all calls on the event loop's thread, each one short transaction."""

    label = "hub publisher state"
    filename = FILENAME
    migrations = MIGRATIONS
    holds = "how far each job's publication to the hub got"

    def add(self, job_id: str) -> PublishedJob:
        """Remember a job to publish (again: what is remembered of it stays)."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute("INSERT INTO published (job_id, created_at, updated_at) VALUES (?, ?, ?)"
                         " ON CONFLICT (job_id) DO NOTHING", (job_id, now, now))
        found = self.job(job_id)
        assert found is not None
        return found

    def job(self, job_id: str) -> PublishedJob | None:
        rows = self._read("SELECT * FROM published WHERE job_id = ?", (job_id,))
        return self._from_row(rows[0]) if rows else None

    def open_jobs(self) -> list[PublishedJob]:
        """The jobs whose final state the hub does not have yet, oldest first."""
        return [self._from_row(row) for row in
                self._read("SELECT * FROM published WHERE done = 0 ORDER BY created_at", ())]

    def mark_registered(self, job_id: str) -> None:
        self._update(job_id, "registered = 1")

    def keep_offset(self, hub_id: str, offset: int) -> None:
        """How much of the job's log the hub acknowledged."""
        self._update(hub_id, "log_offset = ?", offset)

    def close_job(self, job_id: str) -> None:
        """The hub has the job's final state (or will never take the job)."""
        self._update(job_id, "done = 1")

    def _update(self, job_id: str, assignment: str, *values: object) -> None:
        with self._transaction() as conn:
            conn.execute(f"UPDATE published SET {assignment}, updated_at = ? WHERE job_id = ?",
                         (*values, time.time(), job_id))

    @staticmethod
    def _from_row(row: sqlite3.Row) -> PublishedJob:
        return PublishedJob(hub_id=str(row["job_id"]), registered=bool(row["registered"]),
                            log_offset=int(row["log_offset"]))


def agent_record(state_dir: Path, job_id: str) -> bytes | None:
    """The agent's provenance record of a job, byte for byte, read from the agent's store in
    `state_dir` (the publisher's own file's directory) over a read-only connection of its own: the
    publisher only reads what the lifecycle stored."""
    path = state_dir / DB_FILENAME
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
    except sqlite3.Error:
        return None
    conn.row_factory = sqlite3.Row
    try:
        return Store(conn, path).provenance(job_id)
    except StoreError:      # a store too old to hold records
        return None
    finally:
        conn.close()
