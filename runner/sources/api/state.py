"""What the API source remembers of each job it took from the hub, in its own SQLite file under
`state_dir` (as the other sources keep theirs).

`api.sqlite` (mode 0600, WAL, every commit synced, in the 0700 state directory that no job can
bind) holds one row per job whose token this agent verified: the job object as leased, the
identity the token proved (never the token itself, which is not needed again), the repository and
commit to check out, how far the job got, the agent's own job id and how much of its log the hub
acknowledged. A row stays open until the hub has the job's final state, so a restarted agent
carries on with the job from where it was, and tells the hub its end once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from runner.sqlitefile import StateFile, decode_object, encode_json

FILENAME = "api.sqlite"

# Index i migrates the file from schema version i to i + 1; only ever append.
MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE jobs (
    hub_id      TEXT PRIMARY KEY,
    data        TEXT NOT NULL,
    log_offset  INTEGER NOT NULL DEFAULT 0,
    done        INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX jobs_open ON jobs (done, created_at);
""",)

# confirmed: the token verified, the hub not yet told; taken: the hub has the first state (the job
# is this agent's for good); admitted: the agent recorded it (`job_id`); running: checked out and
# handed to the agent to run.
Phase = Literal["confirmed", "taken", "admitted", "running"]


@dataclass
class ApiJob:
    """A job taken from the hub, and how far it got."""

    hub_id: str
    job: dict[str, Any]                 # the job object exactly as leased
    identity: dict[str, Any]            # what the verified token proved
    issuer: str                         # the name of this agent's [[oidc]] table that trusted it
    repository: str | None              # None: the job's workspace is empty
    commit: str | None
    clone_url: str | None = None        # where the repository is fetched from
    ref: str | None = None              # the token's ref: fetched first, as it likely holds the commit
    phase: Phase = "confirmed"
    job_id: str | None = None           # the agent's own job, once admitted
    log_offset: int = 0                 # how much of the job's log the hub acknowledged

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "identity": self.identity, "issuer": self.issuer,
                "repository": self.repository, "commit": self.commit, "clone_url": self.clone_url,
                "ref": self.ref,
                "phase": self.phase, "job_id": self.job_id}

    @classmethod
    def from_row(cls, hub_id: str, data: dict[str, Any], log_offset: int) -> ApiJob:
        return cls(hub_id=hub_id, job=dict(data["job"]), identity=dict(data["identity"]),
                   issuer=str(data["issuer"]), repository=data.get("repository"), commit=data.get("commit"),
                   clone_url=data.get("clone_url"), ref=data.get("ref"), phase=data.get("phase", "confirmed"),
                   job_id=data.get("job_id"), log_offset=log_offset)


class ApiState(StateFile):
    """The source's table; all calls on the event loop's thread, each one short transaction."""

    label = "API state"
    filename = FILENAME
    migrations = MIGRATIONS
    holds = "the hub's API jobs this agent took and how far they got"

    def save(self, job: ApiJob) -> None:
        """Create or replace what is remembered of `job` (still open), its log offset included."""
        encoded = encode_json(job.to_json(), f"API job {job.hub_id}")
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (hub_id, data, log_offset, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (hub_id) DO UPDATE SET data = excluded.data, log_offset = excluded.log_offset,"
                " updated_at = excluded.updated_at",
                (job.hub_id, encoded, job.log_offset, now, now))

    def keep_offset(self, hub_id: str, offset: int) -> None:
        """How much of the job's log the hub acknowledged."""
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET log_offset = ?, updated_at = ? WHERE hub_id = ?",
                         (offset, time.time(), hub_id))

    def job(self, hub_id: str) -> ApiJob | None:
        rows = self._read("SELECT * FROM jobs WHERE hub_id = ?", (hub_id,))
        return self._from_row(rows[0]) if rows else None

    def open_jobs(self) -> list[ApiJob]:
        """The jobs whose final state the hub does not have yet, oldest first."""
        return [self._from_row(row) for row in
                self._read("SELECT * FROM jobs WHERE done = 0 ORDER BY created_at", ())]

    def done(self, hub_id: str) -> bool:
        rows = self._read("SELECT done FROM jobs WHERE hub_id = ?", (hub_id,))
        return bool(rows and rows[0]["done"])

    def close_job(self, hub_id: str) -> None:
        """The hub has the job's final state."""
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET done = 1, updated_at = ? WHERE hub_id = ?", (time.time(), hub_id))

    @staticmethod
    def _from_row(row: Any) -> ApiJob:
        hub_id = str(row["hub_id"])
        data = decode_object(row["data"], f"API job {hub_id}")
        return ApiJob.from_row(hub_id, data, int(row["log_offset"]))
