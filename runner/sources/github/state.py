"""What the GitHub source remembers across restarts, in its own SQLite file under `state_dir`.

`github.sqlite` (mode 0600, WAL, every commit synced) beside the agent's store holds:

* `triggers`: every trigger taken, by its key (`label:owner/repo#12:<label event>`,
  `comment:owner/repo:<comment id>`, `push:owner/repo:main@<sha>`), with the SHA it was bound to and
  where it got. A key is acted on once, whatever the agent does meanwhile: a label event bound to one
  SHA never approves another.
* `runs`: one row per job reported on GitHub (its check run or commit status, the runner job, the
  summary shown), open until the final report went out, so a restarted agent follows the job
  again and reports it exactly once.
* `cursors`: how far each repository's comment and activity lists were read, and which pull
  requests were last seen in which state, so polling after a restart neither misses nor repeats.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from runner.store import StoreError

FILENAME = "github.sqlite"
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triggers (
    key         TEXT PRIMARY KEY,
    repository  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    sha         TEXT,
    outcome     TEXT NOT NULL,
    detail      TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    external_id TEXT PRIMARY KEY,
    trigger_key TEXT NOT NULL,
    repository  TEXT NOT NULL,
    data        TEXT NOT NULL,
    done        INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_open ON runs (done, created_at);
CREATE TABLE IF NOT EXISTS cursors (
    repository  TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (repository, name)
);
"""


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


class GithubState:
    """The source's tables; all calls on the event loop's thread, each one short transaction."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> GithubState:
        path = Path(state_dir) / FILENAME
        _create_private(path)
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.close()
                raise StoreError(f"{path} cannot use write-ahead logging (journal mode is {mode});"
                                 " put state_dir on a local filesystem")
            # A trigger recorded as taken must stay taken after a power loss: sync every commit.
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open GitHub state {path}: {exc}") from exc
        return cls(conn, path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> GithubState:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"GitHub state {self.path}: {exc}") from exc

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


def _create_private(path: Path) -> None:
    # Created before SQLite sees it: never readable by others, not even for a moment. SQLite gives
    # its -wal and -shm files the same mode.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open GitHub state {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != os.geteuid():
        raise StoreError(f"GitHub state {path} is owned by uid {info.st_uid}, not by the user running "
                         f"hpc-runner (uid {os.geteuid()})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise StoreError(f"GitHub state {path} has mode {stat.S_IMODE(info.st_mode):04o}, open to group "
                         f"or others; fix: chmod 600 {path}")
