"""The agent's durable memory: jobs, log offsets and the audit log, in SQLite (WAL) under `state_dir`.

A restarted agent must lose no job, re-read no log bytes it already shipped and report each final
status exactly once; admins must be able to trust that the audit log was never rewritten. Every
method is one short transaction, so the CLI (`hpc-runner status`) can read while the agent writes.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.job import TERMINAL_STATES, JobState, is_job_id, new_job_id
from runner.job.record import JobRecord
from runner.sqlitefile import StateFile, StoreError, decode_object, encode_json, open_database

__all__ = [
    "DB_FILENAME",
    "EXECUTORS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SOURCES",
    "AuditEntry",
    "JobFilter",
    "JobRecord",
    "Store",
    "StoreError",
    "Visible",
]

DB_FILENAME = "state.sqlite3"
SOURCES = frozenset({"local", "buildkite", "github", "api"})
EXECUTORS = frozenset({"local", "slurm"})



# --- schema -----------------------------------------------------------------------------------------

_MIGRATION_1 = """
CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    source         TEXT NOT NULL,
    external_id    TEXT,
    identity       TEXT NOT NULL,
    spec           TEXT NOT NULL,
    decision       TEXT,
    executor       TEXT,
    slurm_id       TEXT,
    state          TEXT NOT NULL,
    exit_status    INTEGER,
    outcome_detail TEXT,
    log_path       TEXT,
    log_offset     INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    finished_at    REAL,
    final_reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_slurm_id ON jobs (slurm_id);
CREATE INDEX jobs_created_at ON jobs (created_at);
-- The same CI job must never be admitted twice, even if its source hands it out again.
CREATE UNIQUE INDEX jobs_source_external_id ON jobs (source, external_id) WHERE external_id IS NOT NULL;

-- No foreign key to jobs: the log must also record requests about unknown job ids, and it must
-- outlive job rows that a later retention policy may prune.
CREATE TABLE audit (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    at     REAL NOT NULL,
    job_id TEXT,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_job_id ON audit (job_id, seq);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
"""

# What the Buildkite source remembered of its jobs, and its undelivered log chunks. No longer
# written: each source keeps its own state file now, and the Buildkite source's first open of
# its file takes over the open rows (runner/sources/buildkite/state.py).
_MIGRATION_2 = """
CREATE TABLE source_jobs (
    source        TEXT NOT NULL,
    external_id   TEXT NOT NULL,
    data          TEXT NOT NULL,
    checkpoint    TEXT,
    chunks_failed INTEGER NOT NULL DEFAULT 0,
    done          INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (source, external_id)
);
CREATE TABLE log_outbox (
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    "offset"    INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (source, external_id, sequence)
);
"""

# Where a job came from, as a link its source gave at admission (the Buildkite job's page, the
# GitHub pull request); why it waits in Slurm (Slurm's own reason); the nodes it was given.
_MIGRATION_3 = """
ALTER TABLE jobs ADD COLUMN source_url TEXT;
ALTER TABLE jobs ADD COLUMN state_reason TEXT;
ALTER TABLE jobs ADD COLUMN node_list TEXT;
"""

# Each run's provenance record (runner/provenance), written once when it ends and never changed:
# its bytes are what `hpc-runner provenance` prints and what a digest of the record is taken of.
_MIGRATION_4 = """
CREATE TABLE provenance (
    job_id     TEXT PRIMARY KEY,
    statement  BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TRIGGER provenance_no_update BEFORE UPDATE ON provenance
BEGIN
    SELECT RAISE(ABORT, 'provenance records are immutable');
END;
CREATE TRIGGER provenance_no_delete BEFORE DELETE ON provenance
BEGIN
    SELECT RAISE(ABORT, 'provenance records are immutable');
END;
"""

# Index i migrates a database from schema version i to i + 1. Only ever append to this tuple:
# released databases carry the version number in `PRAGMA user_version`.
MIGRATIONS: tuple[str, ...] = (_MIGRATION_1, _MIGRATION_2, _MIGRATION_3, _MIGRATION_4)
SCHEMA_VERSION = len(MIGRATIONS)


# --- records -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: float
    job_id: str | None
    actor: str
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class JobFilter:
    """What a page of jobs keeps: any of `states`, one account (of the decision) and source, and
    `text` within the id, the name, or the identity's user, actor, repository, organisation,
    pipeline or project (without regard to ASCII case)."""

    states: tuple[str, ...] = ()
    account: str | None = None
    source: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Visible:
    """The jobs someone may see: those their identity (`source`, `user`) submitted, and every job
    of `accounts`."""

    source: str
    user: str | None
    accounts: frozenset[str] = frozenset()


# What a page's text is looked for in, one field a line.
_TEXT_FIELDS = " || char(10) || ".join(
    f"coalesce({field}, '')" for field in (
        "id", "json_extract(spec, '$.name')",
        *(f"json_extract(identity, '$.{key}')"
          for key in ("user", "actor", "repository", "organization", "pipeline", "project"))))

# --- job ids ------------------------------------------------------------------------------------------

# --- the store ----------------------------------------------------------------------------------------

class Store(StateFile):
    """The agent's state database. Open with `Store.open(state_dir)`; one connection per instance."""

    label = "state store"

    @classmethod
    def open(cls, state_dir: Path | str) -> Store:
        path = Path(state_dir) / DB_FILENAME
        return cls(open_database(path, MIGRATIONS, what="state database",
                                 holds="job identities and the audit log"), path)

    @property
    def state_dir(self) -> Path:
        return self.path.parent

    # --- jobs ---

    def add_job(self, *, source: str, identity: Mapping[str, Any], spec: Mapping[str, Any],
                external_id: str | None = None, job_id: str | None = None,
                state: JobState = JobState.queued,
                log_path: str | os.PathLike[str] | None = None, source_url: str | None = None) -> JobRecord:
        if source not in SOURCES:
            raise StoreError(f"unknown job source {source!r}; expected one of {sorted(SOURCES)}")
        job_id = new_job_id() if job_id is None else job_id
        if not is_job_id(job_id):
            raise StoreError(f"job id {job_id!r} must be 1-63 characters of [0-9a-z-], starting alphanumeric")
        state = JobState(state)
        now = time.time()
        row = {
            "id": job_id, "source": source, "external_id": external_id,
            "identity": encode_json(identity, f"job {job_id} identity"),
            "spec": encode_json(spec, f"job {job_id} spec"),
            "state": state.value,
            "log_path": None if log_path is None else os.fspath(log_path),
            "created_at": now, "updated_at": now,
            "finished_at": now if state.is_terminal else None,
            "source_url": source_url,
        }
        with self._transaction() as conn:
            self._refuse_duplicate(conn, job_id, source, external_id)
            conn.execute(
                "INSERT INTO jobs (id, source, external_id, identity, spec, state, log_path,"
                " created_at, updated_at, finished_at, source_url) VALUES (:id, :source, :external_id,"
                " :identity, :spec, :state, :log_path, :created_at, :updated_at, :finished_at,"
                " :source_url)", row)
            return self._require_job(conn, job_id)

    def _refuse_duplicate(self, conn: sqlite3.Connection, job_id: str, source: str,
                          external_id: str | None) -> None:
        # Checked inside the write transaction, so no other process can slip in between.
        if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
            raise StoreError(f"job {job_id} already exists")
        if external_id is None:
            return
        existing = conn.execute("SELECT id FROM jobs WHERE source = ? AND external_id = ?",
                                (source, external_id)).fetchone()
        if existing:
            raise StoreError(f"{source} job {external_id} was already admitted as job {existing['id']}")

    def record_decision(self, job_id: str, *, actor: str, decision: Mapping[str, Any]) -> None:
        """Store the policy decision on the job and in the audit log, both or neither.

        Anything but `decision["allowed"] is True` counts as a denial and ends the job, unless it
        already ended (e.g. cancelled while waiting for the decision): then only the record is kept.
        """
        encoded = encode_json(decision, f"decision for job {job_id}")
        denied = decision.get("allowed") is not True
        with self._transaction() as conn:
            job = self._require_job(conn, job_id)
            now = time.time()
            conn.execute("UPDATE jobs SET decision = ?, updated_at = ? WHERE id = ?", (encoded, now, job_id))
            self._insert_audit(conn, actor=actor, action="decision", job_id=job_id, detail=decision)
            if denied and not job.state.is_terminal:
                self._change_state(conn, job, JobState.denied, actor=actor, now=now)

    def get_job(self, job_id: str) -> JobRecord | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def find_by_external_id(self, source: str, external_id: str) -> JobRecord | None:
        return self._one("SELECT * FROM jobs WHERE source = ? AND external_id = ?", (source, external_id))

    def find_by_slurm_id(self, slurm_id: str) -> JobRecord | None:
        # Slurm reuses ids after its counter wraps or the cluster is rebuilt: the newest job is meant.
        return self._one("SELECT * FROM jobs WHERE slurm_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
                         (slurm_id,))

    def list_jobs(self, *, states: Iterable[JobState] | None = None, source: str | None = None,
                  limit: int | None = None, newest_first: bool = False) -> list[JobRecord]:
        """Jobs ordered by creation time (oldest first unless `newest_first`), filtered and limited."""
        clauses: list[str] = []
        params: list[Any] = []
        if states is not None:
            wanted = [JobState(s).value for s in states]
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})" if wanted else "0")
            params.extend(wanted)
        if source is not None:
            clauses.append("source = ?")
            params.append(source)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        order = " DESC" if newest_first else ""
        sql = f"SELECT * FROM jobs{where} ORDER BY created_at{order}, id{order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(limit, 0))
        return [_job_from_row(row) for row in self._read(sql, params)]

    def page_jobs(self, where: JobFilter, *, visible: Visible | None, before: str | None,
                  limit: int) -> list[JobRecord]:
        """The newest `limit` jobs created before job `before` (none if there is no such job) that
        pass `where` and `visible` (None: every job), newest first. Read along the creation time's
        index, newest first, so a page reads about as many rows as it shows."""
        start: tuple[float, str] | None = None
        if before is not None:
            found = self._read("SELECT created_at FROM jobs WHERE id = ?", [before])
            if not found:
                return []
            start = (float(found[0]["created_at"]), before)
        sql, params = page_query(where, visible=visible, start=start, limit=limit)
        return [_job_from_row(row) for row in self._read(sql, params)]

    def started_times(self, job_ids: Iterable[str]) -> dict[str, float]:
        """When each of the jobs (that ever ran) started running: its first change to `running`."""
        wanted = list(dict.fromkeys(job_ids))
        if not wanted:
            return {}
        rows = self._read(
            "SELECT job_id, min(at) AS at FROM audit WHERE job_id IN"
            f" ({', '.join('?' * len(wanted))}) AND action = 'state'"
            " AND json_extract(detail, '$.to') = 'running' GROUP BY job_id", wanted)
        return {str(row["job_id"]): float(row["at"]) for row in rows}

    def set_state(self, job_id: str, state: JobState, *, exit_status: int | None = None,
                  outcome_detail: str | None = None, actor: str = "agent") -> JobRecord:
        """Move a job to `state` and audit the change; a terminal state is final.

        Setting the state a job is already in is not an error, so a restarted agent can replay what it
        saw: for a terminal job it changes nothing, otherwise it updates the given exit status/detail.
        """
        state = JobState(state)
        with self._transaction() as conn:
            job = self._require_job(conn, job_id)
            if job.state.is_terminal and state == job.state:
                return job
            if job.state.is_terminal:
                raise StoreError(f"job {job_id} is {job.state.value}, which is final; refusing to set it to"
                                 f" {state.value}")
            self._change_state(conn, job, state, actor=actor, now=time.time(), exit_status=exit_status,
                               outcome_detail=outcome_detail)
            return self._require_job(conn, job_id)

    def _change_state(self, conn: sqlite3.Connection, job: JobRecord, state: JobState, *, actor: str,
                      now: float, exit_status: int | None = None, outcome_detail: str | None = None) -> None:
        conn.execute(
            "UPDATE jobs SET state = ?, exit_status = coalesce(?, exit_status),"
            " outcome_detail = coalesce(?, outcome_detail), finished_at = ?, updated_at = ? WHERE id = ?",
            (state.value, exit_status, outcome_detail, now if state.is_terminal else None, now, job.id))
        if state == job.state:
            return
        detail: dict[str, Any] = {"from": job.state.value, "to": state.value}
        if exit_status is not None:
            detail["exit_status"] = exit_status
        if outcome_detail is not None:
            detail["outcome_detail"] = outcome_detail
        self._insert_audit(conn, actor=actor, action="state", job_id=job.id, detail=detail)

    def set_slurm_id(self, job_id: str, slurm_id: str | None, executor: str) -> None:
        if executor not in EXECUTORS:
            raise StoreError(f"unknown executor {executor!r}; expected one of {sorted(EXECUTORS)}")
        self._update_job(job_id, "slurm_id = ?, executor = ?", (slurm_id, executor))

    def set_whereabouts(self, job_id: str, *, state_reason: str | None,
                        node_list: str | None) -> JobRecord | None:
        """Record why the job waits (Slurm's reason) and the nodes it was given; the new record,
        or None when both were already so (nothing changed, nothing written)."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state_reason = ?, node_list = ?, updated_at = ? WHERE id = ?"
                " AND (state_reason IS NOT ? OR node_list IS NOT ?)",
                (state_reason, node_list, time.time(), job_id, state_reason, node_list))
            if cursor.rowcount == 0:
                self._require_job(conn, job_id)
                return None
            return self._require_job(conn, job_id)

    def set_log_path(self, job_id: str, log_path: str | os.PathLike[str] | None) -> None:
        """Where the job's output file is; the offset is left alone (reset it explicitly for a new file)."""
        self._update_job(job_id, "log_path = ?", (None if log_path is None else os.fspath(log_path),))

    def set_log_offset(self, job_id: str, offset: int, *, reset: bool = False) -> None:
        """Record how far the log was shipped; it only moves forward unless `reset` (a new log file)."""
        if offset < 0:
            raise StoreError(f"job {job_id}: log offset must not be negative, got {offset}")
        with self._transaction() as conn:
            job = self._require_job(conn, job_id)
            if offset < job.log_offset and not reset:
                raise StoreError(f"job {job_id}: log offset {offset} is behind the recorded {job.log_offset};"
                                 " shipped log bytes would be sent twice")
            conn.execute("UPDATE jobs SET log_offset = ?, updated_at = ? WHERE id = ?",
                         (offset, time.time(), job_id))

    def mark_final_reported(self, job_id: str) -> bool:
        """True for exactly one caller, across processes: the one that must report the final status."""
        terminal = [s.value for s in TERMINAL_STATES]
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET final_reported = 1, updated_at = ? WHERE id = ? AND final_reported = 0"
                f" AND state IN ({', '.join('?' * len(terminal))})", (time.time(), job_id, *terminal))
            if cursor.rowcount == 1:
                return True
            job = self._require_job(conn, job_id)
            if not job.state.is_terminal:
                raise StoreError(f"job {job_id} is still {job.state.value}; it has no final status to report")
            return False

    def count_by_account(self, states: Iterable[JobState]) -> dict[str, int]:
        """Jobs in `states`, per project account of their decision."""
        wanted = [JobState(state).value for state in states]
        rows = self._read(
            "SELECT json_extract(decision, '$.account') AS account, count(*) AS n FROM jobs"
            f" WHERE state IN ({', '.join('?' * len(wanted))})"
            " AND json_extract(decision, '$.account') IS NOT NULL GROUP BY account", wanted)
        return {str(row["account"]): int(row["n"]) for row in rows}

    # --- audit ---

    def append_audit(self, *, actor: str, action: str, job_id: str | None = None,
                     detail: Mapping[str, Any]) -> int:
        """Append one entry to the audit log; returns its sequence number."""
        with self._transaction() as conn:
            return self._insert_audit(conn, actor=actor, action=action, job_id=job_id, detail=detail)

    def audit_entries(self, *, job_id: str | None = None, since_seq: int = 0,
                      limit: int | None = None) -> list[AuditEntry]:
        """Entries with seq > since_seq, oldest first, optionally only those about one job."""
        sql = "SELECT * FROM audit WHERE seq > ?"
        params: list[Any] = [since_seq]
        if job_id is not None:
            sql += " AND job_id = ?"
            params.append(job_id)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(limit, 0))
        return [_audit_from_row(row) for row in self._read(sql, params)]

    def _insert_audit(self, conn: sqlite3.Connection, *, actor: str, action: str, job_id: str | None,
                      detail: Mapping[str, Any]) -> int:
        if not actor or not action:
            raise StoreError(f"an audit entry needs an actor and an action, got {actor!r} and {action!r}")
        cursor = conn.execute(
            "INSERT INTO audit (at, job_id, actor, action, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), job_id, actor, action, encode_json(detail, f"audit detail of {action!r}")))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    # --- provenance ---

    def save_provenance(self, job_id: str, statement: bytes) -> bool:
        """Store a job's provenance record; False (and nothing changed) when it already has one."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO provenance (job_id, statement, created_at) VALUES (?, ?, ?)",
                (job_id, statement, time.time()))
            return cursor.rowcount == 1

    def provenance(self, job_id: str) -> bytes | None:
        """A job's provenance record, byte for byte as it was stored."""
        rows = self._read("SELECT statement FROM provenance WHERE job_id = ?", [job_id])
        return bytes(rows[0]["statement"]) if rows else None

    # --- maintenance ---

    def integrity_check(self) -> None:
        """Raise StoreError unless SQLite finds the database file and its foreign keys sound."""
        problems = [str(row[0]) for row in self._read("PRAGMA integrity_check", [])]
        if problems != ["ok"]:
            raise StoreError(f"{self.path} failed its integrity check: {'; '.join(problems[:10])}")
        broken = self._read("PRAGMA foreign_key_check", [])
        if broken:
            raise StoreError(f"{self.path} has {len(broken)} rows whose foreign keys point nowhere")

    # --- plumbing ---

    def _one(self, sql: str, params: Iterable[Any]) -> JobRecord | None:
        rows = self._read(sql, params)
        return _job_from_row(rows[0]) if rows else None

    def _require_job(self, conn: sqlite3.Connection, job_id: str) -> JobRecord:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id} in {self.path}")
        return _job_from_row(row)

    def _update_job(self, job_id: str, assignments: str, params: tuple[Any, ...]) -> None:
        with self._transaction() as conn:
            cursor = conn.execute(f"UPDATE jobs SET {assignments}, updated_at = ? WHERE id = ?",
                                  (*params, time.time(), job_id))
            if cursor.rowcount == 0:
                raise StoreError(f"no job {job_id} in {self.path}")


def page_query(where: JobFilter, *, visible: Visible | None, start: tuple[float, str] | None,
               limit: int) -> tuple[str, list[Any]]:
    """The SQL (and its parameters) of `Store.page_jobs`: below `start` (a job's creation time and
    id), newest first."""
    clauses: list[str] = []
    params: list[Any] = []
    if visible is not None:
        either = ["(json_extract(identity, '$.source') = ? AND json_extract(identity, '$.user') = ?)"]
        params += [visible.source, visible.user]
        if visible.accounts:
            marks = ", ".join("?" * len(visible.accounts))
            either.append(f"json_extract(decision, '$.account') IN ({marks})")
            params += sorted(visible.accounts)
        clauses.append(f"({' OR '.join(either)})")
    if where.states:
        clauses.append(f"state IN ({', '.join('?' * len(where.states))})")
        params += [JobState(state).value for state in where.states]
    if where.account is not None:
        clauses.append("json_extract(decision, '$.account') = ?")
        params.append(where.account)
    if where.source is not None:
        clauses.append("source = ?")
        params.append(where.source)
    if where.text:
        # instr, not LIKE: the text is matched as it is, % and _ included.
        clauses.append(f"instr(lower({_TEXT_FIELDS}), ?) > 0")
        params.append(where.text.lower())
    if start is not None:
        created, job_id = start
        clauses.append("created_at <= ? AND (created_at < ? OR id < ?)")
        params += [created, created, job_id]
    where_sql = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    return (f"SELECT * FROM jobs{where_sql} ORDER BY created_at DESC, id DESC LIMIT ?",
            [*params, max(limit, 0)])


# --- opening -------------------------------------------------------------------------------------------

# --- rows <-> records ----------------------------------------------------------------------------------

def _job_from_row(row: sqlite3.Row) -> JobRecord:
    job_id = str(row["id"])
    try:
        state = JobState(row["state"])
    except ValueError as exc:
        raise StoreError(f"job {job_id} has an unknown state {row['state']!r} in the state database") from exc
    decision = row["decision"]
    return JobRecord(
        id=job_id,
        source=row["source"],
        external_id=row["external_id"],
        identity=decode_object(row["identity"], f"job {job_id} identity"),
        spec=decode_object(row["spec"], f"job {job_id} spec"),
        decision=None if decision is None else decode_object(decision, f"job {job_id} decision"),
        executor=row["executor"],
        slurm_id=row["slurm_id"],
        state=state,
        exit_status=row["exit_status"],
        outcome_detail=row["outcome_detail"],
        log_path=row["log_path"],
        log_offset=int(row["log_offset"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        finished_at=None if row["finished_at"] is None else float(row["finished_at"]),
        final_reported=bool(row["final_reported"]),
        source_url=row["source_url"],
        state_reason=row["state_reason"],
        node_list=row["node_list"],
    )


def _audit_from_row(row: sqlite3.Row) -> AuditEntry:
    seq = int(row["seq"])
    return AuditEntry(
        seq=seq,
        at=float(row["at"]),
        job_id=row["job_id"],
        actor=row["actor"],
        action=row["action"],
        detail=decode_object(row["detail"], f"audit entry {seq} detail"),
    )
