"""The hooks' outbox in the hub's job store: one row per (state change, hook) still to deliver.

Rows are written in the transaction that changes the job's state, so no state change is ever
without its deliveries, and a hub that restarts finds what was still pending. Only the oldest
row of a (job, hook) pair is ever due: a job's next event waits until its previous one was
delivered (its row deleted) or given up.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass

MIGRATION = """
CREATE TABLE hook_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id       TEXT NOT NULL,
    hook         TEXT NOT NULL,
    delivery_id  TEXT NOT NULL UNIQUE,
    body         BLOB NOT NULL,
    created      REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL
);
CREATE INDEX hook_outbox_by_pair ON hook_outbox (job_id, hook, seq);
"""

# The oldest row of each (job, hook) pair: the only one that may be sent.
_HEADS = "SELECT min(seq) FROM hook_outbox GROUP BY job_id, hook"


@dataclass(frozen=True)
class HookEvent:
    """A delivery still to make."""

    seq: int
    job_id: str
    hook: str
    delivery_id: str
    body: bytes
    created: float
    attempts: int

    @property
    def pair(self) -> tuple[str, str]:
        return self.job_id, self.hook


def record(conn: sqlite3.Connection, job_id: str, entries: Sequence[tuple[str, bytes]], now: float) -> None:
    """Queue (hook URL, body) deliveries for `job_id`, inside the caller's transaction."""
    conn.executemany(
        "INSERT INTO hook_outbox (job_id, hook, delivery_id, body, created, next_attempt)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(job_id, hook, str(uuid.uuid4()), body, now, now) for hook, body in entries])


def due(conn: sqlite3.Connection, now: float, limit: int,
        busy: Collection[tuple[str, str]]) -> list[HookEvent]:
    """Up to `limit` deliveries due at `now`, each the oldest of its pair, none of a `busy` pair."""
    rows = conn.execute(
        f"SELECT seq, job_id, hook, delivery_id, body, created, attempts FROM hook_outbox"
        f" WHERE seq IN ({_HEADS}) AND next_attempt <= ? ORDER BY next_attempt, seq LIMIT ?",
        (now, limit + len(busy))).fetchall()
    events = [HookEvent(int(row["seq"]), row["job_id"], row["hook"], row["delivery_id"], bytes(row["body"]),
                        float(row["created"]), int(row["attempts"])) for row in rows]
    return [event for event in events if event.pair not in busy][:limit]


def next_attempt_after(conn: sqlite3.Connection, now: float) -> float | None:
    """The earliest future attempt among the pairs' oldest rows, or None."""
    row = conn.execute(f"SELECT min(next_attempt) AS at FROM hook_outbox WHERE seq IN ({_HEADS})"
                       " AND next_attempt > ?", (now,)).fetchone()
    return None if row["at"] is None else float(row["at"])


def forget(conn: sqlite3.Connection, seq: int) -> None:
    """Delivered or given up: the pair's next row becomes due."""
    conn.execute("DELETE FROM hook_outbox WHERE seq = ?", (seq,))


def retry_at(conn: sqlite3.Connection, seq: int, at: float) -> None:
    conn.execute("UPDATE hook_outbox SET attempts = attempts + 1, next_attempt = ? WHERE seq = ?", (at, seq))


def forget_hooks_except(conn: sqlite3.Connection, hooks: Collection[str]) -> int:
    """Drop the rows of hooks no longer configured; how many."""
    marks = ", ".join("?" * len(hooks))
    where = f"hook NOT IN ({marks})" if hooks else "1"
    return int(conn.execute(f"DELETE FROM hook_outbox WHERE {where}", tuple(hooks)).rowcount)
