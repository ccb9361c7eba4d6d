"""A writer for the store's crash tests; the test kills it with SIGKILL at a point it announces.

Usage: store_crash_writer.py STATE_DIR [in-transaction | commits]

in-transaction: commit a few jobs, print "committed ID,ID,...", then write into one transaction that
    never commits, print "in-transaction" once its pages have reached the WAL, and keep writing.
commits: add jobs one transaction at a time forever, printing "committed N ID" after each commit.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from runner.store import DB_FILENAME, Store

COMMITTED_JOBS = 3
ROWS_BEFORE_ANNOUNCING = 2000
UNCOMMITTED_ACTOR = "crash-writer:uncommitted"


def spec_for(seq: int) -> dict[str, Any]:
    """A spec large enough to span pages, whose content the test can recompute to spot torn rows."""
    digest = hashlib.sha256(str(seq).encode()).hexdigest()
    return {"job": {"name": f"crash-{seq}", "command": ["true"]}, "seq": seq, "payload": digest * 32}


def identity_for(seq: int) -> dict[str, Any]:
    return {"source": "local", "user": f"writer-{seq}"}


def say(line: str) -> None:
    print(line, flush=True)


def write_in_open_transaction(state_dir: Path) -> None:
    store = Store.open(state_dir)
    ids = [store.add_job(source="local", identity=identity_for(n), spec=spec_for(n)).id
           for n in range(COMMITTED_JOBS)]
    say("committed " + ",".join(ids))
    conn = sqlite3.connect(state_dir / DB_FILENAME, isolation_level=None)
    # A tiny page cache makes SQLite spill the uncommitted pages into the WAL file, so the kill
    # lands on a WAL that really holds frames of a transaction that never committed.
    conn.execute("PRAGMA cache_size = -64")
    conn.execute("BEGIN IMMEDIATE")
    seq = 0
    while True:
        now = time.time()
        conn.execute(
            "INSERT INTO jobs (id, source, identity, spec, state, created_at, updated_at)"
            " VALUES (?, 'local', '{}', ?, 'queued', ?, ?)", (f"uncommitted-{seq}", "x" * 512, now, now))
        conn.execute("INSERT INTO audit (at, actor, action, detail) VALUES (?, ?, 'uncommitted', '{}')",
                     (now, UNCOMMITTED_ACTOR))
        seq += 1
        if seq == ROWS_BEFORE_ANNOUNCING:
            say("in-transaction")


def write_many_commits(state_dir: Path) -> None:
    store = Store.open(state_dir)
    seq = 0
    while True:
        job = store.add_job(source="local", identity=identity_for(seq), spec=spec_for(seq),
                            external_id=f"crash-{seq}")
        store.record_decision(job.id, actor="crash-writer", decision={"allowed": True, "account": "a"})
        say(f"committed {seq} {job.id}")
        seq += 1


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    mode = argv[2] if len(argv) == 3 else "in-transaction"
    writers = {"in-transaction": write_in_open_transaction, "commits": write_many_commits}
    if mode not in writers:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    writers[mode](Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
