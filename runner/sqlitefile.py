"""The house rules for a SQLite state file, shared by the agent's store and the gateway's queue.

A state file lives in a directory only its user may enter and is itself 0600 from the moment it
exists; it runs in WAL mode with every commit synced (a reported decision or log offset must
survive a power loss); its schema carries a version in `user_version` and is brought forward one
migration per transaction; writes take the write lock up front (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from runner.errors import HpcRunnerError

BUSY_TIMEOUT_MS = 5000


class StoreError(HpcRunnerError):
    """A state file cannot be opened, or refused a change that would corrupt what it remembers."""


def open_database(path: Path, migrations: Sequence[str], *, what: str, holds: str) -> sqlite3.Connection:
    """Open (creating if needed) the state file `path` and migrate it to the newest schema.

    `what` names the file in messages ("state database"), `holds` says what it holds, for a
    message that asks to make it private again.
    """
    prepare_state_dir(path.parent, holds=holds)
    _create_private_file(path, what=what, holds=holds)
    conn = _connect(path, what=what)
    try:
        _migrate(conn, path, tuple(migrations), what=what)
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection, name: str) -> Iterator[sqlite3.Connection]:
    """One write transaction, committed on success and rolled back on any exception.

    IMMEDIATE takes the write lock up front: a deferred transaction that reads and then writes can
    fail with SQLITE_BUSY when another process (a second agent, the CLI) wrote in between, whereas
    waiting for the lock is covered by busy_timeout. `name` prefixes error messages.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StoreError(f"{name}: {exc}") from exc


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


class StateFile:
    """An open state file: its one connection and its path, closed when a `with` block ends.

    Each kind of state file (the agent's store, the gateway's queue, a source's own tables) opens
    its file with `open_database` in a classmethod of its own and names itself in `label`, which
    starts the messages of its failed reads and writes.
    """

    label: ClassVar[str]
    # For the default `open`: the file's name in the state directory, its migrations, and what it
    # holds (for the message that asks to make it private again).
    filename: ClassVar[str]
    migrations: ClassVar[Sequence[str]]
    holds: ClassVar[str]

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, state_dir: Path | str) -> Self:
        """Open (creating it, private, if needed) and migrate this kind of file in `state_dir`."""
        path = Path(state_dir) / cls.filename
        return cls(open_database(path, cls.migrations, what=cls.label, holds=cls.holds), path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def schema_version(self) -> int:
        return user_version(self._conn)

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._conn, f"{self.label} {self.path}")

    def _read(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        try:
            return self._conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.label} {self.path}: {exc}") from exc


def prepare_state_dir(state_dir: Path, *, holds: str) -> None:
    """Create `state_dir` private to this user, or make sure an existing one is."""
    try:
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(state_dir, 0o700)
        # mkdir's mode is filtered through the umask; state must not depend on the caller's umask.
        os.chmod(state_dir, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot create state directory {state_dir}: {exc.strerror}") from exc
    try:
        info = os.stat(state_dir)
    except OSError as exc:
        raise StoreError(f"cannot use state directory {state_dir}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"state directory {state_dir} exists and is not a directory")
    _check_private(state_dir, info, "state directory", "700", holds)


def _create_private_file(path: Path, *, what: str, holds: str) -> None:
    # Created before SQLite sees it, so the database is never readable by others, not even briefly;
    # SQLite gives its -wal and -shm files the same mode.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open {what} {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    _check_private(path, info, what, "600", holds)


def _check_private(path: Path, info: os.stat_result, what: str, fix_mode: str, holds: str) -> None:
    if info.st_uid != os.geteuid():
        raise StoreError(f"{what} {path} is owned by uid {info.st_uid}, not by the user running hpc-runner"
                         f" (uid {os.geteuid()}); fix: chown $(id -un) {path} && chmod {fix_mode} {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise StoreError(f"{what} {path} has mode {mode:04o}, open to group or others; it holds {holds}."
                         f" Fix: chmod {fix_mode} {path}")


def _connect(path: Path, *, what: str) -> sqlite3.Connection:
    try:
        # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE), never implicitly.
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {what} {path}: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{what} {path} cannot use write-ahead logging (journal mode is {mode});"
                             " put it on a local filesystem")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"cannot open {what} {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path, migrations: tuple[str, ...], *, what: str) -> None:
    """Bring the schema to the newest version, one migration per transaction."""
    try:
        version = user_version(conn)
        _refuse_newer(path, version, len(migrations))
        while version < len(migrations):
            version = _apply_migration(conn, path, migrations, version)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot migrate {what} {path}: {exc}") from exc


def _apply_migration(conn: sqlite3.Connection, path: Path, migrations: tuple[str, ...], version: int) -> int:
    """Run migration `version` (-> version + 1) unless another process got there first; new version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process opening the same file may have migrated.
        current = user_version(conn)
        _refuse_newer(path, current, len(migrations))
        if current == version:
            for statement in split_sql(migrations[version]):
                conn.execute(statement)
            # Part of the same transaction: a crash leaves both the schema and the version as they were.
            conn.execute(f"PRAGMA user_version = {version + 1}")
            current = version + 1
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return current


def _refuse_newer(path: Path, version: int, known: int) -> None:
    if version > known:
        raise StoreError(f"{path.name} has schema version {version}; this hpc-runner knows up to {known};"
                         f" upgrade hpc-runner (database: {path})")


def split_sql(script: str) -> list[str]:
    """Statements of a script, for running one by one inside our own transaction.

    `executescript` would commit any open transaction first, losing the migration's atomicity.
    `sqlite3.complete_statement` knows where trigger bodies end, so they are not split apart.
    """
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not _is_only_comments(pending):
        raise StoreError(f"migration ends with an incomplete SQL statement: {pending.strip()[:80]!r}")
    return statements


def _is_only_comments(text: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in text.splitlines())


def encode_json(value: Mapping[str, Any], what: str) -> str:
    try:
        # Canonical form: equal values give equal text, so digests and comparisons of rows are stable.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} cannot be stored as JSON: {exc}") from exc


def decode_object(text: Any, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"{what} is not a JSON object")
    return value
