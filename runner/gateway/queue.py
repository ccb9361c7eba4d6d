"""The gateway's durable queue of webhook deliveries, with leases, in SQLite (WAL) under its state_dir.

A delivery is stored before GitHub gets its answer, and stays until an agent acknowledges it:
queued and leased deliveries survive a restart, SIGKILL included (every commit is synced). A
lease lends a delivery to one agent until its expiry; an agent running a long job extends it, and
a lease that ran out returns the delivery to the queue for the next agent that asks. Delivery ids
are unique, so a redelivery by GitHub (same `X-GitHub-Delivery`) is stored once; acknowledged
deliveries keep their id (their body is dropped) for `ACKED_RETENTION_SECONDS` to recognise late
redeliveries, and are then pruned.

Times are wall-clock seconds, because lease expiries must mean the same after a restart. Each
method is one short transaction. One connection, used from one thread.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.sqlitefile import StateFile, StoreError, open_database

DB_FILENAME = "gateway.sqlite3"
# GitHub lets a delivery be redelivered for 3 days; a week of remembered ids covers that with room.
ACKED_RETENTION_SECONDS = 7 * 24 * 3600

_MIGRATION_1 = """
CREATE TABLE deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id      TEXT NOT NULL UNIQUE,
    event            TEXT NOT NULL,
    body             BLOB,
    body_size        INTEGER NOT NULL,
    received_at      REAL NOT NULL,
    lease_id         TEXT UNIQUE,
    lease_agent      TEXT,
    lease_expires_at REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    acked_at         REAL,
    acked_by         TEXT
);
CREATE INDEX deliveries_open ON deliveries (seq) WHERE acked_at IS NULL;
CREATE INDEX deliveries_lease_expiry ON deliveries (lease_expires_at)
    WHERE acked_at IS NULL AND lease_id IS NOT NULL;
CREATE INDEX deliveries_acked_at ON deliveries (acked_at) WHERE acked_at IS NOT NULL;
"""

# Index i migrates from schema version i to i + 1. Only ever append.
MIGRATIONS: tuple[str, ...] = (_MIGRATION_1,)


@dataclass(frozen=True)
class Enqueued:
    seq: int
    new: bool                   # False: this delivery id was already stored (a redelivery)


@dataclass(frozen=True)
class LeasedDelivery:
    delivery_id: str
    event: str
    body: bytes
    received_at: float
    lease_id: str
    lease_agent: str
    lease_expires_at: float
    attempt: int                # 1 the first time it is handed out
    previous_agent: str | None  # whose lease ran out, when this is a hand-out after expiry


@dataclass(frozen=True)
class QueueCounts:
    waiting: int                # never leased, released, or with an expired lease
    leased: int
    acknowledged: int


def new_lease_id() -> str:
    return secrets.token_urlsafe(18)


class DeliveryQueue(StateFile):
    """The queue database. Open with `DeliveryQueue.open(state_dir)`."""

    label = "gateway queue"

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        super().__init__(conn, path)
        self._clock = clock

    @classmethod
    def open(cls, state_dir: Path | str, *, clock: Callable[[], float] = time.time) -> DeliveryQueue:
        path = Path(state_dir) / DB_FILENAME
        conn = open_database(path, MIGRATIONS, what="gateway queue",
                             holds="webhook deliveries and the agents' leases")
        return cls(conn, path, clock)

    # --- deliveries ---

    def enqueue(self, *, event: str, delivery_id: str, body: bytes) -> Enqueued:
        """Store a delivery unless its id is already stored; durable when this returns."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO deliveries (delivery_id, event, body, body_size, received_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (delivery_id) DO NOTHING",
                (delivery_id, event, body, len(body), self._clock()))
            if cursor.rowcount == 1:
                assert cursor.lastrowid is not None
                return Enqueued(cursor.lastrowid, new=True)
            row = conn.execute("SELECT seq FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
            return Enqueued(int(row["seq"]), new=False)

    def lease(self, agent: str, seconds: float) -> LeasedDelivery | None:
        """Lend the oldest available delivery to `agent` for `seconds`; None when there is none."""
        if seconds <= 0:
            raise StoreError(f"a lease must last a positive time, got {seconds}")
        with self._transaction() as conn:
            now = self._clock()
            row = conn.execute(
                "SELECT seq, delivery_id, event, body, received_at, attempts, lease_id, lease_agent"
                " FROM deliveries WHERE acked_at IS NULL AND (lease_id IS NULL OR lease_expires_at <= ?)"
                " ORDER BY seq LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            lease_id, expires_at = new_lease_id(), now + seconds
            conn.execute("UPDATE deliveries SET lease_id = ?, lease_agent = ?, lease_expires_at = ?,"
                         " attempts = attempts + 1 WHERE seq = ?", (lease_id, agent, expires_at, row["seq"]))
            return LeasedDelivery(
                delivery_id=row["delivery_id"], event=row["event"], body=bytes(row["body"]),
                received_at=float(row["received_at"]), lease_id=lease_id, lease_agent=agent,
                lease_expires_at=expires_at, attempt=int(row["attempts"]) + 1,
                previous_agent=row["lease_agent"] if row["lease_id"] is not None else None)

    def extend(self, lease_id: str, agent: str, seconds: float) -> float | None:
        """Move the lease's expiry to `seconds` from now; None if `agent` no longer holds it.

        A lease that ran out but whose delivery nobody took since is still the agent's: its job
        is running, and handing the delivery out again would only run it twice.
        """
        if seconds <= 0:
            raise StoreError(f"a lease must last a positive time, got {seconds}")
        with self._transaction() as conn:
            expires_at = self._clock() + seconds
            cursor = conn.execute(
                "UPDATE deliveries SET lease_expires_at = ?"
                " WHERE lease_id = ? AND lease_agent = ? AND acked_at IS NULL", (expires_at, lease_id, agent))
            return expires_at if cursor.rowcount == 1 else None

    def acknowledge(self, lease_id: str, agent: str) -> str | None:
        """Mark the lease's delivery done (its body is dropped); its delivery id, or None if not held.

        Acknowledging twice with the same lease succeeds, so an agent may repeat an
        acknowledgement whose answer it never saw.
        """
        with self._transaction() as conn:
            row = conn.execute("SELECT seq, delivery_id, acked_at FROM deliveries"
                               " WHERE lease_id = ? AND lease_agent = ?", (lease_id, agent)).fetchone()
            if row is None:
                return None
            if row["acked_at"] is None:
                conn.execute("UPDATE deliveries SET acked_at = ?, acked_by = ?, body = NULL WHERE seq = ?",
                             (self._clock(), agent, row["seq"]))
            return str(row["delivery_id"])

    def release(self, lease_id: str, agent: str) -> str | None:
        """Give the delivery back to the queue now; its delivery id, or None if not held."""
        with self._transaction() as conn:
            row = conn.execute("SELECT seq, delivery_id FROM deliveries"
                               " WHERE lease_id = ? AND lease_agent = ? AND acked_at IS NULL",
                               (lease_id, agent)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE deliveries SET lease_id = NULL, lease_agent = NULL, lease_expires_at = NULL"
                         " WHERE seq = ?", (row["seq"],))
            return str(row["delivery_id"])

    def next_expiry(self) -> float | None:
        """The earliest expiry among current leases (past ones included), or None."""
        row = self._read("SELECT min(lease_expires_at) AS at FROM deliveries"
                         " WHERE acked_at IS NULL AND lease_id IS NOT NULL", ())[0]
        return None if row["at"] is None else float(row["at"])

    def counts(self) -> QueueCounts:
        now = self._clock()
        row = self._read(
            "SELECT"
            " coalesce(sum(acked_at IS NULL AND (lease_id IS NULL OR lease_expires_at <= ?)), 0) AS waiting,"
            " coalesce(sum(acked_at IS NULL AND lease_id IS NOT NULL AND lease_expires_at > ?), 0) AS leased,"
            " coalesce(sum(acked_at IS NOT NULL), 0) AS acknowledged FROM deliveries", (now, now))[0]
        return QueueCounts(int(row["waiting"]), int(row["leased"]), int(row["acknowledged"]))

    def prune_acknowledged(self, older_than: float = ACKED_RETENTION_SECONDS) -> int:
        """Forget acknowledged deliveries older than `older_than` seconds; how many were forgotten."""
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM deliveries WHERE acked_at IS NOT NULL AND acked_at < ?",
                                  (self._clock() - older_than,))
            return cursor.rowcount
