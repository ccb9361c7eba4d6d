"""What the GitHub source remembers across restarts, in its own SQLite file under `state_dir`.

`github.sqlite` (mode 0600, WAL, every commit synced) beside the agent's store holds:

* `triggers`: every trigger taken, by its key (`label:owner/repo#12:<label event>`,
  `comment:owner/repo:<comment id>`, `push:owner/repo:main@<sha>`), with the SHA it was bound to and
  where it got. A key is acted on once, whatever the agent does meanwhile: a label event bound to one
  SHA never approves another.
* `runs`: one row per job reported on GitHub (a `RunState`: its check run or commit status, the
  runner job, the summary shown), open until the final report went out, so a restarted agent
  follows the job again and reports it exactly once.
* `cursors`: how far each repository's comment and activity lists were read, and which pull
  requests were last seen in which state, so polling after a restart neither misses nor repeats.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from runner.sqlitefile import StateFile

FILENAME = "github.sqlite"

# Index i migrates the file from schema version i to i + 1; only ever append.
MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE triggers (
    key         TEXT PRIMARY KEY,
    repository  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    sha         TEXT,
    outcome     TEXT NOT NULL,
    detail      TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE runs (
    external_id TEXT PRIMARY KEY,
    trigger_key TEXT NOT NULL,
    repository  TEXT NOT NULL,
    data        TEXT NOT NULL,
    done        INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX runs_open ON runs (done, created_at);
CREATE TABLE cursors (
    repository  TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (repository, name)
);
""",)


@dataclass(frozen=True)
class TriggerRow:
    key: str
    repository: str
    kind: str
    sha: str | None
    outcome: str           # running, done, needs_approval, ignored, failed
    detail: str | None


@dataclass(frozen=True)
class RunRow:
    external_id: str
    trigger_key: str
    repository: str
    data: dict[str, Any]


@dataclass
class RunState:
    """What `runs.data` holds for one job: enough to follow and report it after a restart."""

    external_id: str
    trigger_key: str
    repository: str
    sha: str
    job: str
    spec: dict[str, Any]
    identity: dict[str, Any]
    ref: str
    clone_url: str
    number: int | None = None
    job_id: str | None = None
    summary: str = ""
    title: str = ""
    details_url: str | None = None
    kind: str | None = None             # "check" or "status" once the report exists
    check_run_id: int | None = None
    phase: str = "new"                  # new, admitted, running (host.run called), reported
    log_offset: int = 0                 # how far into the job's log the last report read

    @classmethod
    def from_row(cls, row: RunRow) -> RunState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in row.data.items() if k in known})


class GithubState(StateFile):
    """The source's tables; all calls on the event loop's thread, each one short transaction."""

    label = "GitHub state"
    filename = FILENAME
    migrations = MIGRATIONS
    holds = "which GitHub triggers ran and how far their jobs got"

    # --- triggers ---

    def trigger(self, key: str) -> TriggerRow | None:
        row = self._conn.execute("SELECT * FROM triggers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return TriggerRow(row["key"], row["repository"], row["kind"], row["sha"], row["outcome"],
                          row["detail"])

    def claim_trigger(self, key: str, *, repository: str, kind: str, sha: str | None, outcome: str,
                      detail: str | None = None) -> bool:
        """Record a trigger as taken; False when it was taken before (then nothing changes)."""
        now = time.time()
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO triggers (key, repository, kind, sha, outcome, detail, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, repository.lower(), kind, sha, outcome, detail, now, now))
            return cursor.rowcount == 1

    def triggers_with(self, outcome: str) -> list[TriggerRow]:
        rows = self._conn.execute("SELECT * FROM triggers WHERE outcome = ? ORDER BY created_at",
                                  (outcome,)).fetchall()
        return [TriggerRow(row["key"], row["repository"], row["kind"], row["sha"], row["outcome"],
                           row["detail"]) for row in rows]

    def set_trigger_outcome(self, key: str, outcome: str, detail: str | None = None) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE triggers SET outcome = ?, detail = ?, updated_at = ? WHERE key = ?",
                         (outcome, detail, time.time(), key))

    # --- runs ---

    def put_run(self, external_id: str, *, trigger_key: str, repository: str, data: dict[str, Any]) -> None:
        now = time.time()
        encoded = json.dumps(data, sort_keys=True)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO runs (external_id, trigger_key, repository, data, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (external_id)"
                " DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
                (external_id, trigger_key, repository.lower(), encoded, now, now))

    def run(self, external_id: str) -> RunRow | None:
        row = self._conn.execute("SELECT * FROM runs WHERE external_id = ?", (external_id,)).fetchone()
        return None if row is None else _run_row(row)

    def run_done(self, external_id: str) -> bool:
        row = self._conn.execute("SELECT done FROM runs WHERE external_id = ?", (external_id,)).fetchone()
        return bool(row and row["done"])

    def open_runs(self) -> list[RunRow]:
        rows = self._conn.execute("SELECT * FROM runs WHERE done = 0 ORDER BY created_at").fetchall()
        return [_run_row(row) for row in rows]

    def open_runs_of(self, trigger_key: str) -> list[RunRow]:
        rows = self._conn.execute("SELECT * FROM runs WHERE done = 0 AND trigger_key = ? ORDER BY created_at",
                                  (trigger_key,)).fetchall()
        return [_run_row(row) for row in rows]

    def close_run(self, external_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET done = 1, updated_at = ? WHERE external_id = ?",
                         (time.time(), external_id))

    # --- cursors ---

    def cursor(self, repository: str, name: str) -> str | None:
        row = self._conn.execute("SELECT value FROM cursors WHERE repository = ? AND name = ?",
                                 (repository.lower(), name)).fetchone()
        return None if row is None else str(row["value"])

    def set_cursor(self, repository: str, name: str, value: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO cursors (repository, name, value) VALUES (?, ?, ?)"
                         " ON CONFLICT (repository, name) DO UPDATE SET value = excluded.value",
                         (repository.lower(), name, value))


def _run_row(row: sqlite3.Row) -> RunRow:
    return RunRow(row["external_id"], row["trigger_key"], row["repository"], json.loads(row["data"]))
