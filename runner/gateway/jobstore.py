"""The hub's API jobs and their logs, in SQLite (WAL) under its state_dir: `jobs.sqlite3`.

A file of its own beside the webhook queue (`gateway.sqlite3`) rather than new tables in it: its
own schema and migrations, its own write lock (a log append never waits for a webhook's commit,
nor the reverse), and a queue file that an older gateway can still open as it is.

An API job is stored before its submitter gets its 201, with the submitted `job` object as
received, the identity the hub verified, the issuer's name and the raw token (for the agent to
verify itself; it leaves this file only in a lease answer). Agents lease queued API jobs of their
cluster; the first state an agent publishes makes the job that agent's for good (see
`jobs_protocol`). An agent also registers the jobs of its other sources (origin `agent`), which
are its own from the start, to publish them alike.
Who may see and cancel a job is kept as keys with their roles (`job_access`, see `access`): its
owners when it is stored, its account's admins and members as its agent publishes them.
Beside what the API answers, each job keeps what the hub's pages list and filter by (its name,
source, actor, a link back to where it came from, why it waits), in columns with indexes, so a
page of the newest jobs a viewer may see is read without reading the others (`page`).
What happened to each job as the hub learned it is its audit trail (`job_events`, insert-only,
never pruned): its submission (by whom) or its registration (by which agent), the agent taking it,
each change of state, Slurm id, account, grant or exit status it published, a cancel asked at the
hub (by whom) and its final status. It is read by its account's admins (`audit`), in the line
format of the agent's own audit log (`runner.auditlines`).
The log is bytes appended at offsets: an append at an offset already held is idempotent (the
bytes it repeats must be those held), one past the end leaves a gap and is refused, so the hub
holds the log byte-exact whoever restarted.

Times are wall-clock seconds, because lease expiries must mean the same after a restart. Each
method is one short transaction. One connection, used from one thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runner.auditlines import entry
from runner.errors import InputError
from runner.gateway import outbox
from runner.gateway.access import ADMIN, MEMBER, OWNER, admin_keys, member_keys
from runner.gateway.jobs_protocol import (
    MAX_LOG_BYTES,
    TERMINAL,
    JobLease,
    StateUpdate,
    job_url,
)
from runner.gateway.protocol import format_time
from runner.identity import identity_from_json
from runner.job import new_job_id
from runner.sqlitefile import StateFile, StoreError, decode_object, encode_json, open_database

T = TypeVar("T")

DB_FILENAME = "jobs.sqlite3"

_MIGRATION_1 = """
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    job              TEXT NOT NULL,
    identity         TEXT NOT NULL,
    principals       TEXT NOT NULL,
    origin           TEXT NOT NULL CHECK (origin IN ('api', 'agent')),
    issuer           TEXT,
    token            TEXT,
    cluster          TEXT,
    repository       TEXT,
    commit_sha       TEXT,
    state            TEXT NOT NULL DEFAULT 'queued',
    exit_status      INTEGER,
    reasons          TEXT NOT NULL DEFAULT '[]',
    account          TEXT,
    grant_name       TEXT,
    admins           TEXT NOT NULL DEFAULT '[]',
    slurm_job_id     TEXT,
    created          REAL NOT NULL,
    started          REAL,
    ended            REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_agent      TEXT,
    lease_expires_at REAL,
    accepted_at      REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    log_length       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_waiting ON jobs (seq) WHERE state = 'queued' AND accepted_at IS NULL;
CREATE TABLE job_access (
    key      TEXT NOT NULL,
    job_seq  INTEGER NOT NULL REFERENCES jobs (seq),
    role     TEXT NOT NULL CHECK (role IN ('owner', 'admin')),
    PRIMARY KEY (key, job_seq, role)
) WITHOUT ROWID;
CREATE INDEX job_access_by_job ON job_access (job_seq);
CREATE TABLE log_chunks (
    job_seq  INTEGER NOT NULL REFERENCES jobs (seq),
    start    INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (job_seq, start)
) WITHOUT ROWID;
"""

# What the pages list and filter by, and the members of a job's account (a third role of
# `job_access`, whose CHECK a table can only change by being rebuilt). The jobs stored before are
# given their name, source, actor and label from what they hold, as new ones are (`_insert`).
_MIGRATION_3 = """
ALTER TABLE jobs ADD COLUMN name TEXT;
ALTER TABLE jobs ADD COLUMN source TEXT;
ALTER TABLE jobs ADD COLUMN actor TEXT;
ALTER TABLE jobs ADD COLUMN source_label TEXT;
ALTER TABLE jobs ADD COLUMN source_url TEXT;
ALTER TABLE jobs ADD COLUMN state_reason TEXT;
ALTER TABLE jobs ADD COLUMN members TEXT NOT NULL DEFAULT '[]';
UPDATE jobs SET
    name = json_extract(job, '$.name'),
    source = CASE origin WHEN 'api' THEN 'api' ELSE json_extract(identity, '$.source') END,
    actor = CASE
        WHEN json_extract(identity, '$.source') IN ('github', 'gitlab')
             AND json_extract(identity, '$.actor') IS NOT NULL
            THEN json_extract(identity, '$.source') || ':user:' || json_extract(identity, '$.actor')
        WHEN json_extract(identity, '$.source') = 'buildkite'
             AND json_extract(identity, '$.pipeline') IS NOT NULL
            THEN 'buildkite:pipeline:' || json_extract(identity, '$.organization') || '/'
                 || json_extract(identity, '$.pipeline')
        WHEN json_extract(identity, '$.source') IN ('local', 'idp')
             AND json_extract(identity, '$.user') IS NOT NULL
            THEN json_extract(identity, '$.source') || ':user:' || json_extract(identity, '$.user')
        ELSE coalesce(json_extract(principals, '$[0]'), json_extract(identity, '$.source') || ':unknown')
    END,
    source_label = CASE
        WHEN origin = 'api' THEN issuer
        WHEN json_extract(identity, '$.source') = 'buildkite'
            THEN json_extract(identity, '$.organization') || '/' || json_extract(identity, '$.pipeline')
        ELSE coalesce(repository, json_extract(identity, '$.source'))
    END;
CREATE TABLE job_access_roles (
    key      TEXT NOT NULL,
    job_seq  INTEGER NOT NULL REFERENCES jobs (seq),
    role     TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    PRIMARY KEY (key, job_seq, role)
) WITHOUT ROWID;
INSERT INTO job_access_roles (key, job_seq, role) SELECT key, job_seq, role FROM job_access;
DROP TABLE job_access;
ALTER TABLE job_access_roles RENAME TO job_access;
CREATE INDEX job_access_by_job ON job_access (job_seq);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE INDEX jobs_by_account ON jobs (account, seq);
CREATE INDEX jobs_by_source ON jobs (source, seq);
"""

# The nodes a job was given, as its agent says Slurm named them, for the job's page.
_MIGRATION_4 = """
ALTER TABLE jobs ADD COLUMN node_list TEXT;
"""

# The audit trail: one row per thing that happened to a job, never changed or deleted (SQLite
# refuses to), so an account's admins can trust it was not rewritten. The jobs stored before it
# began are given what their rows still say: their arrival and, for those that ended, their end.
_MIGRATION_5 = """
CREATE TABLE job_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    job_seq  INTEGER NOT NULL REFERENCES jobs (seq),
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    detail   TEXT NOT NULL
);
CREATE INDEX job_events_by_job ON job_events (job_seq, seq);
CREATE TRIGGER job_events_no_update BEFORE UPDATE ON job_events
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;
CREATE TRIGGER job_events_no_delete BEFORE DELETE ON job_events
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;
INSERT INTO job_events (at, job_seq, actor, action, detail)
SELECT at, job_seq, actor, action, detail FROM (
    SELECT created AS at, seq AS job_seq,
           CASE origin WHEN 'api' THEN coalesce(actor, 'unknown')
                ELSE coalesce('agent:' || lease_agent, 'agent') END AS actor,
           CASE origin WHEN 'api' THEN 'submitted' ELSE 'registered' END AS action,
           json_object('cluster', cluster, 'from_stored_job', json('true')) AS detail
    FROM jobs
    UNION ALL
    SELECT ended, seq, CASE WHEN lease_agent IS NULL THEN 'hub' ELSE 'agent:' || lease_agent END,
           'final_status',
           json_object('state', state, 'exit_status', exit_status, 'reasons', json(reasons),
                       'from_stored_job', json('true'))
    FROM jobs
    WHERE ended IS NOT NULL
      AND state IN ('succeeded', 'failed', 'cancelled', 'timed_out', 'denied', 'infra_failed', 'expired')
) ORDER BY at, job_seq, action = 'final_status';
"""

# A job's provenance record, as its agent sent it, and the output files of it the hub holds (the
# files themselves are under state_dir/outputs, `gateway.outputs`). Both are kept for good: SQLite
# refuses to change or delete a row, as for the audit trail.
_MIGRATION_6 = """
CREATE TABLE provenance (
    job_seq   INTEGER PRIMARY KEY REFERENCES jobs (seq),
    statement BLOB NOT NULL,
    sha256    TEXT NOT NULL,
    received  REAL NOT NULL
);
CREATE TABLE job_outputs (
    job_seq   INTEGER NOT NULL REFERENCES jobs (seq),
    path      TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    size      INTEGER NOT NULL,
    received  REAL NOT NULL,
    PRIMARY KEY (job_seq, path)
) WITHOUT ROWID;
CREATE TRIGGER provenance_no_update BEFORE UPDATE ON provenance
BEGIN
    SELECT RAISE(ABORT, 'a provenance record is kept as it came');
END;
CREATE TRIGGER provenance_no_delete BEFORE DELETE ON provenance
BEGIN
    SELECT RAISE(ABORT, 'a provenance record is kept as it came');
END;
CREATE TRIGGER job_outputs_no_update BEFORE UPDATE ON job_outputs
BEGIN
    SELECT RAISE(ABORT, 'an output is kept as it came');
END;
CREATE TRIGGER job_outputs_no_delete BEFORE DELETE ON job_outputs
BEGIN
    SELECT RAISE(ABORT, 'an output is kept as it came');
END;
"""

# Index i migrates from schema version i to i + 1. Only ever append.
MIGRATIONS: tuple[str, ...] = (_MIGRATION_1, outbox.MIGRATION, _MIGRATION_3, _MIGRATION_4, _MIGRATION_5,
                               _MIGRATION_6)

# The facts of a job that make an entry of its trail when an agent's publication changes them.
_AUDITED = ("state", "slurm_job_id", "exit_status", "account", "grant")
# What reads the trail: each entry with its job's facts as they are now (`runner.auditlines`).
_TRAIL_COLUMNS = ("e.seq, e.at, e.actor, e.action, e.detail, j.id, j.source, j.actor AS principal,"
                  " j.grant_name, j.account, j.slurm_job_id, j.state, j.exit_status")
_ADMINISTERED = "SELECT job_seq FROM job_access WHERE role = ? AND key IN ({marks})"
# Who did what the hub itself did: end a job cancelled before any agent started it.
HUB_ACTOR = "hub"


def agent_actor(agent: str) -> str:
    """An agent as the actor of an entry: the name its agent token gives it."""
    return f"agent:{agent}"

# The reasons of a job cancelled before any agent took it.
_CANCELLED_WAITING = json.dumps(["cancelled through the API before an agent took it"])


class JobNotFound(LookupError):
    """No job has this id."""


class NotHeld(Exception):
    """The agent does not hold the job: another agent took it, or nobody leased it to this one."""


class Conflict(Exception):
    """A change the job's state refuses (a gap in its log, a second end); `length` is the log's."""

    def __init__(self, message: str, *, length: int) -> None:
        super().__init__(message)
        self.length = length


class LogFull(Exception):
    """An append would take the log past `MAX_LOG_BYTES`."""


@dataclass(frozen=True)
class NewJob:
    """A submission the hub accepted, or a job an agent registers, ready to store."""

    job: dict[str, Any]
    identity: dict[str, Any]
    principals: tuple[str, ...]
    owner_keys: tuple[str, ...]
    cluster: str | None
    repository: str | None
    commit: str | None
    issuer: str | None = None       # API jobs: the [[oidc]] table that verified the token
    token: str | None = None        # API jobs: the submitter's token
    source: str | None = None       # agents' jobs: the agent's source (API jobs: "api")
    source_label: str | None = None  # where it came from, in words (API jobs: the issuer)
    source_url: str | None = None   # and a link there


@dataclass(frozen=True)
class StoredJob:
    """A job as the hub holds it (its token is never part of this: see `JobStore.lease`)."""

    id: str
    job: dict[str, Any]
    identity: dict[str, Any]
    principals: tuple[str, ...]
    origin: str                     # "api" (submitted to the hub) or "agent" (registered by one)
    issuer: str | None
    cluster: str | None
    repository: str | None
    commit: str | None
    state: str
    exit_status: int | None
    reasons: tuple[str, ...]
    account: str | None
    grant: str | None
    admins: tuple[str, ...]
    slurm_job_id: str | None
    created: float
    started: float | None
    ended: float | None
    cancel_requested: bool
    lease_agent: str | None
    accepted: bool
    log_length: int
    access: tuple[tuple[str, str], ...]     # (role, key): who may see and cancel it (`access`)
    name: str | None = None
    source: str | None = None
    actor: str | None = None
    source_label: str | None = None
    source_url: str | None = None
    state_reason: str | None = None
    members: tuple[str, ...] = ()
    node_list: str | None = None

    @property
    def ended_for_good(self) -> bool:
        return self.state in TERMINAL

    @property
    def access_keys(self) -> tuple[str, ...]:
        """Every key that may see the job."""
        return tuple(sorted({key for _, key in self.access}))

    def view(self, public_url: str) -> dict[str, Any]:
        """What `GET /api/v1/jobs/ID` answers."""
        def time_or_none(value: float | None) -> str | None:
            return None if value is None else format_time(value)

        return {"id": self.id, "state": self.state, "exit_status": self.exit_status,
                "reasons": list(self.reasons), "cluster": self.cluster, "account": self.account,
                "grant": self.grant, "slurm_job_id": self.slurm_job_id,
                "created": format_time(self.created), "started": time_or_none(self.started),
                "ended": time_or_none(self.ended), "url": job_url(public_url, self.id)}

    def agent_view(self) -> dict[str, Any]:
        """What an agent asks of a job it holds."""
        return {"id": self.id, "state": self.state, "cancel_requested": self.cancel_requested,
                "log_length": self.log_length}


_JOB_COLUMNS = ("seq, id, job, identity, principals, origin, issuer, cluster, repository, commit_sha, state,"
                " exit_status, reasons, account, grant_name, admins, slurm_job_id, created, started, ended,"
                " cancel_requested, lease_agent, accepted_at, log_length, name, source, actor, source_label,"
                " source_url, state_reason, members, node_list")
# What a row of the pages' list needs.
CARD_COLUMNS = ("id, name, state, state_reason, account, cluster, source, source_label, source_url, actor,"
                " slurm_job_id, created, started, ended, accepted_at")
# The accounts a list offers to filter by, at most.
MAX_LISTED_ACCOUNTS = 200
_VISIBLE = "seq IN (SELECT job_seq FROM job_access WHERE key IN ({marks}))"


@dataclass(frozen=True)
class ListFilter:
    """What a page of the list keeps: any of `states`, one account and source, and `text` within the
    name, id, actor, repository or source label (without regard to case)."""

    states: tuple[str, ...] = ()
    account: str | None = None
    source: str | None = None
    text: str | None = None


def page_query(keys: Sequence[str], where: ListFilter, *, upper: int,
               limit: int) -> tuple[str, tuple[Any, ...]]:
    """The SQL (and its parameters) of the newest `limit` jobs below seq `upper` that share a key
    with `keys` and pass `where`: newest first along the primary key, so that a page reads about as
    many rows as it shows (see `JobStore.page`)."""
    clauses = [_VISIBLE.format(marks=", ".join("?" * len(keys))), "seq < ?"]
    params: list[Any] = [*keys, upper]
    if where.states:
        clauses.append(f"state IN ({', '.join('?' * len(where.states))})")
        params += where.states
    for column, value in (("account", where.account), ("source", where.source)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if where.text:
        pattern = "%" + where.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        texts = ("name", "id", "actor", "repository", "source_label")
        clauses.append("(" + " OR ".join(f"{column} LIKE ? ESCAPE '\\'" for column in texts) + ")")
        params += [pattern] * len(texts)
    # SQLite gathers the seqs the keys may see from job_access's primary key (no job is read for
    # that), then looks the jobs up by seq, newest first, until the page is full: never a job the
    # viewer may not see. A filter with an index of its own (a state, an account, a source) may
    # be read from that index instead.
    sql = (f"SELECT {CARD_COLUMNS} FROM jobs WHERE {' AND '.join(clauses)}"
           " ORDER BY seq DESC LIMIT ?")
    return sql, (*params, limit)


def _strings(text: str, what: str) -> tuple[str, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise StoreError(f"{what} is not a list of strings")
    return tuple(value)


# For a job that just entered a new state: the (hook URL, body) deliveries it makes.
Announce = Callable[["StoredJob"], Sequence[tuple[str, bytes]]]


class JobStore(StateFile):
    """The hub's job database. Open with `JobStore.open(state_dir)`."""

    label = "hub job store"

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float],
                 announce: Announce | None = None) -> None:
        super().__init__(conn, path)
        self._clock = clock
        self._announce_to = announce

    @classmethod
    def open(cls, state_dir: Path | str, *, clock: Callable[[], float] = time.time,
             announce: Announce | None = None) -> JobStore:
        """`announce` (if given) says which hook deliveries each state change makes; they are
        queued in the transaction of the change."""
        path = Path(state_dir) / DB_FILENAME
        conn = open_database(path, MIGRATIONS, what="hub job store",
                             holds="API jobs, their submitters' tokens and their logs")
        return cls(conn, path, clock, announce)

    def _announce(self, conn: sqlite3.Connection, job: StoredJob) -> StoredJob:
        if self._announce_to is not None:
            entries = self._announce_to(job)
            if entries:
                outbox.record(conn, job.id, entries, self._clock())
        return job

    # --- submitters ---

    def submit(self, new: NewJob) -> StoredJob:
        """Store a new queued job; durable when this returns."""
        if new.token is None or new.issuer is None:
            raise StoreError("an API job needs the token and the issuer that verified it")
        job_id = new_job_id()
        with self._transaction() as conn:
            self._insert(conn, job_id, new, origin="api", created=self._clock())
            job = self._job(conn, job_id)
            self._record(conn, job_id, job.actor or "unknown", "submitted", {
                "issuer": new.issuer, "cluster": new.cluster, "repository": new.repository,
                "commit": new.commit, "name": job.name})
            return self._announce(conn, job)

    def _insert(self, conn: sqlite3.Connection, job_id: str, new: NewJob, *, origin: str, created: float,
                agent: str | None = None) -> None:
        name = new.job.get("name")
        source = "api" if origin == "api" else (new.source or str(new.identity.get("source")))
        label = (new.issuer if origin == "api"
                 else new.source_label or _label_of(new.identity, new.repository))
        cursor = conn.execute(
            "INSERT INTO jobs (id, job, identity, principals, origin, issuer, token, cluster, repository,"
            " commit_sha, created, lease_agent, accepted_at, name, source, actor, source_label, source_url)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, _job_text(new.job), encode_json(new.identity, "the identity"),
             json.dumps(list(new.principals)), origin, new.issuer, new.token, new.cluster, new.repository,
             new.commit, created, agent, None if agent is None else self._clock(),
             name if isinstance(name, str) else None, source, _actor_of(new.identity, new.principals), label,
             new.source_url))
        assert cursor.lastrowid is not None
        conn.executemany("INSERT INTO job_access (key, job_seq, role) VALUES (?, ?, ?)",
                         [(key, cursor.lastrowid, OWNER) for key in new.owner_keys])

    def get(self, job_id: str) -> StoredJob | None:
        try:
            return self._reading(self._job, job_id)
        except JobNotFound:
            return None

    def visible(self, keys: Sequence[str], *, limit: int, before: str | None = None) -> list[StoredJob]:
        """The newest `limit` jobs sharing a key with `keys`, older than job `before` if given."""
        if not keys:
            return []
        upper = 2**63 - 1
        if before is not None:
            rows = self._read("SELECT seq FROM jobs WHERE id = ?", (before,))
            if not rows:
                raise JobNotFound(before)
            upper = int(rows[0]["seq"])
        marks = ", ".join("?" * len(keys))
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE seq < ? AND {_VISIBLE.format(marks=marks)}"
            " ORDER BY seq DESC LIMIT ?", (upper, *keys, limit))
        return [self._from_row(self._conn, row) for row in rows]

    def page(self, keys: Sequence[str], where: ListFilter, *, limit: int,
             before: str | None = None) -> list[sqlite3.Row]:
        """The list's rows (`CARD_COLUMNS`) of the newest `limit` jobs sharing a key with `keys` that
        pass `where`, older than job `before` if given (JobNotFound if there is no such job)."""
        if not keys:
            return []
        upper = 2**63 - 1
        if before is not None:
            rows = self._read("SELECT seq FROM jobs WHERE id = ?", (before,))
            if not rows:
                raise JobNotFound(before)
            upper = int(rows[0]["seq"])
        return self._read(*page_query(keys, where, upper=upper, limit=limit))

    def visible_accounts(self, keys: Sequence[str], *, limit: int = MAX_LISTED_ACCOUNTS) -> list[str]:
        """The accounts of the jobs sharing a key with `keys` (in order, at most `limit`)."""
        if not keys:
            return []
        marks = ", ".join("?" * len(keys))
        rows = self._read(
            f"SELECT DISTINCT account FROM jobs WHERE account IS NOT NULL AND {_VISIBLE.format(marks=marks)}"
            " ORDER BY account LIMIT ?", (*keys, limit))
        return [str(row["account"]) for row in rows]

    def request_cancel(self, job_id: str, actor: str = HUB_ACTOR) -> StoredJob:
        """Ask, as `actor` (the caller at the hub's API or pages), for the job to be cancelled; a
        queued job no agent holds ends cancelled at once."""
        with self._transaction() as conn:
            job = self._job(conn, job_id)
            if job.ended_for_good:
                return job
            now = self._clock()
            self._record(conn, job_id, actor, "cancel", {"state": job.state, "agent": job.lease_agent})
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', ended = ?, lease_agent = NULL, lease_expires_at = NULL,"
                " reasons = ? WHERE id = ? AND state = 'queued' AND accepted_at IS NULL"
                " AND (lease_agent IS NULL OR lease_expires_at <= ?)",
                (now, _CANCELLED_WAITING, job_id, now))
            return self._announced_if_changed(conn, job, HUB_ACTOR)

    # --- agents ---

    def register(self, job_id: str, agent: str, new: NewJob, *,
                 created: float | None = None) -> tuple[StoredJob, bool]:
        """Record a job of the agent's other sources under the agent's own id, the agent's from the
        start; the job, and whether it is new. Registering it again is harmless (the job as first
        registered is kept)."""
        with self._transaction() as conn:
            row = conn.execute("SELECT origin, lease_agent FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                self._insert(conn, job_id, new, origin="agent", agent=agent,
                             created=self._clock() if created is None else created)
            elif (row["origin"], row["lease_agent"]) != ("agent", agent):
                raise Conflict(f"job {job_id} is already another job at the hub", length=0)
            job = self._job(conn, job_id)
            if row is None:
                self._record(conn, job_id, agent_actor(agent), "registered", {
                    "source": job.source, "cluster": new.cluster, "repository": new.repository,
                    "commit": new.commit, "name": job.name})
            return (job if row is not None else self._announce(conn, job)), row is None

    def lease(self, agent: str, cluster: str, seconds: float) -> JobLease | None:
        """Lend the oldest waiting job for `cluster` (or for any cluster) to `agent` for `seconds`."""
        if seconds <= 0:
            raise StoreError(f"a lease must last a positive time, got {seconds}")
        with self._transaction() as conn:
            now = self._clock()
            self._end_cancelled_waiting(conn, now)
            row = conn.execute(
                "SELECT seq, id, job, token, issuer, cluster, repository, commit_sha, created, attempts,"
                " cancel_requested FROM jobs WHERE state = 'queued' AND accepted_at IS NULL"
                " AND (cluster = ? OR cluster IS NULL) AND (lease_agent IS NULL OR lease_expires_at <= ?)"
                " ORDER BY seq LIMIT 1", (cluster, now)).fetchone()
            if row is None:
                return None
            expires_at = now + seconds
            conn.execute("UPDATE jobs SET lease_agent = ?, lease_expires_at = ?, attempts = attempts + 1"
                         " WHERE seq = ?", (agent, expires_at, row["seq"]))
            return JobLease(
                id=row["id"], job=decode_object(row["job"], f"job {row['id']}"), token=row["token"],
                issuer=row["issuer"], cluster=row["cluster"], repository=row["repository"],
                commit=row["commit_sha"], received_at=float(row["created"]), lease_seconds=int(seconds),
                lease_expires_at=expires_at, attempt=int(row["attempts"]) + 1,
                cancel_requested=bool(row["cancel_requested"]))

    def _end_cancelled_waiting(self, conn: sqlite3.Connection, now: float) -> None:
        # A job cancelled while an agent held its lease, whose lease then ran out: nobody runs it.
        ending = [str(row["id"]) for row in conn.execute(
            "SELECT id FROM jobs WHERE state = 'queued' AND accepted_at IS NULL AND cancel_requested = 1"
            " AND lease_agent IS NOT NULL AND lease_expires_at <= ? ORDER BY seq", (now,))]
        before = [self._job(conn, job_id) for job_id in ending]
        conn.executemany(
            "UPDATE jobs SET state = 'cancelled', ended = ?, lease_agent = NULL, lease_expires_at = NULL,"
            " reasons = ? WHERE id = ?", [(now, _CANCELLED_WAITING, job_id) for job_id in ending])
        for job in before:
            self._announced_if_changed(conn, job, HUB_ACTOR)

    def _announced_if_changed(self, conn: sqlite3.Connection, before: StoredJob, actor: str) -> StoredJob:
        """The job as it is now, its changes in its trail as `actor`'s, its new state announced if
        it has one."""
        after = self._job(conn, before.id)
        self._record_changes(conn, before, after, actor)
        return self._announce(conn, after) if after.state != before.state else after

    # --- the audit trail ---

    def _record(self, conn: sqlite3.Connection, job_id: str, actor: str, action: str,
                detail: dict[str, Any]) -> None:
        conn.execute("INSERT INTO job_events (at, job_seq, actor, action, detail) VALUES (?, ?, ?, ?, ?)",
                     (self._clock(), self._seq(conn, job_id), actor, action,
                      encode_json(detail, f"the {action} entry of job {job_id}")))

    def _record_changes(self, conn: sqlite3.Connection, before: StoredJob, after: StoredJob,
                        actor: str) -> None:
        """The entries of what changed between `before` and `after`: a change of the facts a
        publication may change (`_AUDITED`), then the final status of a job that just ended."""
        if all(getattr(before, name) == getattr(after, name) for name in _AUDITED):
            return
        detail: dict[str, Any] = {"from": before.state, "to": after.state, "slurm_id": after.slurm_job_id,
                                  "exit_status": after.exit_status, "account": after.account,
                                  "grant": after.grant}
        if after.reasons:
            detail["reasons"] = list(after.reasons)
        if after.state_reason and not after.ended_for_good:
            detail["state_reason"] = after.state_reason
        self._record(conn, after.id, actor, "state", detail)
        if after.ended_for_good and not before.ended_for_good:
            self._record(conn, after.id, actor, "final_status", {
                "state": after.state, "exit_status": after.exit_status, "reasons": list(after.reasons)})

    def audit_trail(self, keys: Sequence[str], *, after: int = 0, limit: int, account: str | None = None,
                    job_id: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Up to `limit` entries after seq `after`, oldest first, as `runner.auditlines` objects: of
        the jobs where one of `keys` is an admin's, only of `account` and job `job_id` if given,
        from `since` (seconds) on. Paged by seq, so a long trail is read a page at a time."""
        if not keys:
            return []
        marks = ", ".join("?" * len(keys))
        clauses = ["e.seq > ?", f"e.job_seq IN ({_ADMINISTERED.format(marks=marks)})"]
        params: list[Any] = [after, ADMIN, *keys]
        if job_id is not None:
            clauses.append("e.job_seq = (SELECT seq FROM jobs WHERE id = ?)")
            params.append(job_id)
        if account is not None:
            clauses.append("j.account = ?")
            params.append(account)
        if since is not None:
            clauses.append("e.at >= ?")
            params.append(since)
        rows = self._read(f"SELECT {_TRAIL_COLUMNS} FROM job_events AS e JOIN jobs AS j ON j.seq = e.job_seq"
                          f" WHERE {' AND '.join(clauses)} ORDER BY e.seq LIMIT ?", (*params, limit))
        return [entry(seq=int(row["seq"]), at=float(row["at"]), action=row["action"], actor=row["actor"],
                      job_id=row["id"], source=row["source"], principal=row["principal"],
                      grant=row["grant_name"], account=row["account"], slurm_id=row["slurm_job_id"],
                      state=row["state"], exit_status=row["exit_status"],
                      detail=decode_object(row["detail"], f"entry {row['seq']} of the audit trail"))
                for row in rows]

    def administers(self, keys: Sequence[str], account: str | None = None) -> bool:
        """Whether one of `keys` is an admin's of a job of `account` (of any job, without one)."""
        if not keys:
            return False
        marks = ", ".join("?" * len(keys))
        sql = f"SELECT 1 FROM jobs WHERE seq IN ({_ADMINISTERED.format(marks=marks)})"
        params: list[Any] = [ADMIN, *keys]
        if account is not None:
            sql += " AND account = ?"
            params.append(account)
        return bool(self._read(sql + " LIMIT 1", params))

    def release(self, job_id: str, agent: str) -> bool:
        """Give back a lease the agent holds on a job it has not taken (its request was abandoned)."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_agent = NULL, lease_expires_at = NULL"
                " WHERE id = ? AND lease_agent = ? AND accepted_at IS NULL", (job_id, agent))
            return cursor.rowcount == 1

    def next_expiry(self) -> float | None:
        """The earliest expiry among the leases of jobs not yet taken (past ones included), or None."""
        row = self._read("SELECT min(lease_expires_at) AS at FROM jobs"
                         " WHERE state = 'queued' AND accepted_at IS NULL AND lease_agent IS NOT NULL", ())[0]
        return None if row["at"] is None else float(row["at"])

    def held(self, job_id: str, agent: str) -> StoredJob:
        """The job, if `agent` holds it (JobNotFound, NotHeld otherwise)."""
        return self._reading(self._held, job_id, agent)

    def publish_state(self, job_id: str, agent: str, update: StateUpdate) -> StoredJob:
        """Record what the agent holding the job says of it; the first publication takes it for good."""
        with self._transaction() as conn:
            job = self._held(conn, job_id, agent)
            now = self._clock()
            if job.ended_for_good:
                if update.state == job.state:
                    return job        # a repeated final publication whose answer was lost
                raise Conflict(f"job {job_id} already ended {job.state}", length=job.log_length)
            changes: dict[str, Any] = {"state": update.state, "lease_expires_at": None}
            if not job.accepted:
                changes["accepted_at"] = now
            given = update.given
            for key, column, value in (
                    ("exit_status", "exit_status", update.exit_status),
                    ("reasons", "reasons", json.dumps(list(update.reasons))),
                    ("account", "account", update.account), ("grant", "grant_name", update.grant),
                    ("admins", "admins", json.dumps(list(update.admins))),
                    ("members", "members", json.dumps(list(update.members))),
                    ("state_reason", "state_reason", update.state_reason),
                    ("node_list", "node_list", update.node_list),
                    ("slurm_job_id", "slurm_job_id", update.slurm_job_id),
                    ("started", "started", update.started), ("ended", "ended", update.ended)):
                if key in given:
                    changes[column] = value
            if update.state == "running" and job.started is None and "started" not in given:
                changes["started"] = now
            if update.state in TERMINAL and job.ended is None and "ended" not in given:
                changes["ended"] = now
            assignments = ", ".join(f"{column} = ?" for column in changes)
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id))
            if "admins" in given:
                self._replace_keys(conn, job_id, ADMIN, admin_keys(update.admins))
            if "members" in given:
                self._replace_keys(conn, job_id, MEMBER, member_keys(update.members))
            if not job.accepted:
                self._record(conn, job_id, agent_actor(agent), "accepted", {"agent": agent})
            return self._announced_if_changed(conn, job, agent_actor(agent))

    def _replace_keys(self, conn: sqlite3.Connection, job_id: str, role: str, keys: Sequence[str]) -> None:
        seq = self._seq(conn, job_id)
        conn.execute("DELETE FROM job_access WHERE job_seq = ? AND role = ?", (seq, role))
        conn.executemany("INSERT OR IGNORE INTO job_access (key, job_seq, role) VALUES (?, ?, ?)",
                         [(key, seq, role) for key in keys])

    def append_log(self, job_id: str, agent: str, offset: int, data: bytes) -> int:
        """Append `data` at `offset` of the job's log; the log's length afterwards.

        Bytes already held are compared, not written again: repeating an append whose answer was
        lost changes nothing, and only its new tail (if any) is added. An offset past the end is
        a gap (Conflict, with the length to resume from); so are repeated bytes that differ.
        """
        with self._transaction() as conn:
            job = self._held(conn, job_id, agent)
            length = job.log_length
            if offset > length:
                raise Conflict(f"an append at byte {offset} would leave a gap: the hub holds {length} "
                               f"bytes of job {job_id}'s log; send from there", length=length)
            overlap = min(length - offset, len(data))
            if overlap and self._log_range(conn, job_id, offset, overlap) != data[:overlap]:
                raise Conflict(f"bytes {offset}-{offset + overlap} of job {job_id}'s log differ from "
                               "those the hub holds", length=length)
            tail = data[overlap:]
            if not tail:
                return length
            if length + len(tail) > MAX_LOG_BYTES:
                raise LogFull(f"job {job_id}'s log would exceed {MAX_LOG_BYTES} bytes")
            seq = self._seq(conn, job_id)
            conn.execute("INSERT INTO log_chunks (job_seq, start, data) VALUES (?, ?, ?)",
                         (seq, length, tail))
            conn.execute("UPDATE jobs SET log_length = ? WHERE seq = ?", (length + len(tail), seq))
            return length + len(tail)

    # --- provenance and outputs ---

    def save_provenance(self, job_id: str, agent: str, statement: bytes, sha256: str) -> bool:
        """Keep the record of the job `agent` holds; False when it is kept already (the same bytes:
        a repeat whose answer was lost). Conflict when the job has another record."""
        with self._transaction() as conn:
            job = self._held(conn, job_id, agent)
            seq = self._seq(conn, job_id)
            row = conn.execute("SELECT sha256 FROM provenance WHERE job_seq = ?", (seq,)).fetchone()
            if row is not None:
                if row["sha256"] != sha256:
                    raise Conflict(f"job {job_id} has another provenance record already (sha256 "
                                   f"{row['sha256']})", length=job.log_length)
                return False
            conn.execute("INSERT INTO provenance (job_seq, statement, sha256, received) VALUES (?, ?, ?, ?)",
                         (seq, statement, sha256, self._clock()))
            self._record(conn, job_id, agent_actor(agent), "provenance_received", {"sha256": sha256})
            return True

    def provenance(self, job_id: str) -> bytes | None:
        """The job's record, byte for byte as its agent sent it (None before it has one)."""
        rows = self._read("SELECT p.statement FROM provenance p JOIN jobs j ON j.seq = p.job_seq"
                          " WHERE j.id = ?", (job_id,))
        return bytes(rows[0]["statement"]) if rows else None

    def add_output(self, job_id: str, agent: str, path: str, sha256: str, size: int) -> bool:
        """Note that the hub holds the job's output `path` (its file stored); False if it was noted."""
        with self._transaction() as conn:
            self._held(conn, job_id, agent)
            cursor = conn.execute(
                "INSERT OR IGNORE INTO job_outputs (job_seq, path, sha256, size, received)"
                " VALUES (?, ?, ?, ?, ?)", (self._seq(conn, job_id), path, sha256, size, self._clock()))
            return cursor.rowcount == 1

    def outputs(self, job_id: str) -> dict[str, tuple[str, int]]:
        """The job's outputs the hub holds: path -> (sha256, size)."""
        rows = self._read("SELECT o.path, o.sha256, o.size FROM job_outputs o"
                          " JOIN jobs j ON j.seq = o.job_seq WHERE j.id = ? ORDER BY o.path", (job_id,))
        return {str(row["path"]): (str(row["sha256"]), int(row["size"])) for row in rows}

    # --- hooks ---

    def hook_schedule(self, limit: int, busy: Collection[tuple[str, str]]
                      ) -> tuple[list[outbox.HookEvent], float | None]:
        """Up to `limit` deliveries due now, each the oldest of its (job, hook) pair, none of a
        `busy` pair; and when the next one not yet due is (wall-clock seconds, or None). Both are
        judged at the same moment, so a delivery that falls due in between is in one of them."""
        now = self._clock()
        due = self._reading(outbox.due, now, limit, busy) if limit > 0 else []
        return due, self._reading(outbox.next_attempt_after, now)

    def hook_done(self, seq: int) -> None:
        """A delivery made, or given up: the next one of its pair becomes due."""
        with self._transaction() as conn:
            outbox.forget(conn, seq)

    def hook_retry_at(self, seq: int, at: float) -> None:
        with self._transaction() as conn:
            outbox.retry_at(conn, seq, at)

    def forget_hooks_except(self, hooks: Collection[str]) -> int:
        """Drop the deliveries of hooks no longer configured; how many."""
        with self._transaction() as conn:
            return outbox.forget_hooks_except(conn, hooks)

    # --- logs ---

    def read_log(self, job_id: str, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of the job's log from `offset` (empty at or past its end)."""
        return self._reading(self._log_range, job_id, offset, limit)

    def _log_range(self, conn: sqlite3.Connection, job_id: str, offset: int, limit: int) -> bytes:
        seq = self._seq(conn, job_id)
        end = offset + limit
        # The chunk holding `offset` starts at the greatest start at or before it.
        rows = conn.execute(
            "SELECT start, data FROM log_chunks WHERE job_seq = ? AND start < ? AND start >="
            " coalesce((SELECT max(start) FROM log_chunks WHERE job_seq = ? AND start <= ?), 0)"
            " ORDER BY start", (seq, end, seq, offset)).fetchall()
        pieces = []
        for row in rows:
            start, data = int(row["start"]), bytes(row["data"])
            pieces.append(data[max(offset - start, 0):max(end - start, 0)])
        return b"".join(pieces)

    # --- rows ---

    def _reading(self, read: Callable[..., T], *args: Any) -> T:
        """`read(connection, *args)` outside any write transaction, its SQLite errors as StoreError."""
        try:
            return read(self._conn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.label} {self.path}: {exc}") from exc

    def _seq(self, conn: sqlite3.Connection, job_id: str) -> int:
        row = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return int(row["seq"])

    def _held(self, conn: sqlite3.Connection, job_id: str, agent: str) -> StoredJob:
        job = self._job(conn, job_id)
        if job.lease_agent != agent:
            raise NotHeld(f"this agent does not hold job {job_id}")
        return job

    def _job(self, conn: sqlite3.Connection, job_id: str) -> StoredJob:
        row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return self._from_row(conn, row)

    @staticmethod
    def _from_row(conn: sqlite3.Connection, row: sqlite3.Row) -> StoredJob:
        access = tuple((str(role), str(key)) for role, key in conn.execute(
            "SELECT role, key FROM job_access WHERE job_seq = ? ORDER BY role, key", (row["seq"],)))
        what = f"job {row['id']}"
        return StoredJob(
            id=row["id"], job=decode_object(row["job"], what), identity=decode_object(row["identity"], what),
            principals=_strings(row["principals"], what), origin=row["origin"], issuer=row["issuer"],
            cluster=row["cluster"],
            repository=row["repository"], commit=row["commit_sha"], state=row["state"],
            exit_status=row["exit_status"], reasons=_strings(row["reasons"], what), account=row["account"],
            grant=row["grant_name"], admins=_strings(row["admins"], what), slurm_job_id=row["slurm_job_id"],
            created=float(row["created"]), started=row["started"], ended=row["ended"],
            cancel_requested=bool(row["cancel_requested"]), lease_agent=row["lease_agent"],
            accepted=row["accepted_at"] is not None, log_length=int(row["log_length"]), access=access,
            name=row["name"], source=row["source"], actor=row["actor"], source_label=row["source_label"],
            source_url=row["source_url"], state_reason=row["state_reason"],
            members=_strings(row["members"], what), node_list=row["node_list"])


def _actor_of(identity: dict[str, Any], principals: Sequence[str]) -> str | None:
    """Who set the job off (`Identity.actor_principal`), or its first principal if the identity
    cannot be read back."""
    try:
        return identity_from_json(identity, "the identity").actor_principal
    except InputError:
        return principals[0] if principals else None


def _label_of(identity: dict[str, Any], repository: str | None) -> str | None:
    """Where a job came from when its agent did not say (as migration 3 says it of older jobs)."""
    if identity.get("source") == "buildkite" and identity.get("pipeline"):
        return f"{identity.get('organization')}/{identity['pipeline']}"
    return repository or (str(identity["source"]) if identity.get("source") else None)


def _job_text(job: dict[str, Any]) -> str:
    # The object's own key order is kept (no sorting): it is given back as it came.
    try:
        return json.dumps(job, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"the job cannot be stored as JSON: {exc}") from exc
