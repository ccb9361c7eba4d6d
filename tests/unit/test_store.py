"""The state store: what survives restarts, crashes and concurrent agents, and what it refuses."""

from __future__ import annotations

import os
import queue
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from runner import store as store_module
from runner.errors import HpcRunnerError
from runner.job import ACTIVE_STATES, JobState
from runner.sqlitefile import split_sql
from runner.store import DB_FILENAME, SCHEMA_VERSION, JobRecord, Store, StoreError

from .store_crash_writer import UNCOMMITTED_ACTOR, identity_for, spec_for

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("store_crash_writer.py")
CHILD_DEADLINE_S = 60.0

IDENTITY = {"source": "github", "repository": "CliMA/ClimaAtmos.jl", "actor": "alice",
            "teams": ["CliMA/core"]}
SPEC = {"job": {"name": "mpi-tests", "image": "clima-ci", "command": ["julia", "test/runtests.jl"],
                "resources": {"account": "clima", "nodes": 2}}}
ALLOWED = {"allowed": True, "grant": "clima-prs", "account": "clima", "slurm": {"nodes": 2}, "reasons": []}
DENIED = {"allowed": False, "grant": None, "account": None, "reasons": ["no grant covers image 'x'"]}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store.open(state_dir) as opened:
        yield opened


def raw_connection(state_dir: Path) -> sqlite3.Connection:
    """A connection that bypasses the Store, as a careless admin or a bug elsewhere would."""
    return sqlite3.connect(state_dir / DB_FILENAME, isolation_level=None)


def add(store: Store, **kwargs: Any) -> JobRecord:
    return store.add_job(source=kwargs.pop("source", "local"), identity=kwargs.pop("identity", IDENTITY),
                         spec=kwargs.pop("spec", SPEC), **kwargs)


# --- durability and opening ---------------------------------------------------------------------------

def test_a_job_survives_close_and_reopen_with_every_field(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        job = add(store, source="buildkite", external_id="https://buildkite.com/clima/p/builds/7#j1",
                  log_path=state_dir / "job.log")
        store.record_decision(job.id, actor="buildkite:pipeline:clima/p", decision=ALLOWED)
        store.set_slurm_id(job.id, "4242", "slurm")
        store.set_state(job.id, JobState.pending)
        store.set_state(job.id, JobState.running)
        store.set_log_offset(job.id, 1234)
        store.set_state(job.id, JobState.failed, exit_status=3, outcome_detail="exit code 3")
        assert store.mark_final_reported(job.id)
        before = store.get_job(job.id)

    with Store.open(state_dir) as store:
        after = store.get_job(job.id)
    assert after == before
    assert after is not None
    assert (after.source, after.external_id) == ("buildkite", "https://buildkite.com/clima/p/builds/7#j1")
    assert after.identity == IDENTITY and after.spec == SPEC and after.decision == ALLOWED
    assert (after.executor, after.slurm_id, after.slurm_job_name) == ("slurm", "4242", f"hpcr-{job.id}")
    assert (after.state, after.exit_status, after.outcome_detail) == (JobState.failed, 3, "exit code 3")
    assert after.log_path == str(state_dir / "job.log") and after.log_offset == 1234
    assert after.final_reported
    assert after.finished_at is not None and after.created_at <= after.updated_at


def test_the_database_uses_write_ahead_logging(store: Store, state_dir: Path) -> None:
    add(store)
    conn = raw_connection(state_dir)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert (state_dir / f"{DB_FILENAME}-wal").exists()


def test_state_dir_and_database_are_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "deep" / "state"
    old_umask = os.umask(0o022)
    try:
        with Store.open(state_dir) as store:
            add(store)
            wal = state_dir / f"{DB_FILENAME}-wal"
            assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_dir / DB_FILENAME).st_mode) == 0o600


def test_a_group_readable_state_dir_is_refused_with_the_fix(state_dir: Path) -> None:
    state_dir.mkdir()
    os.chmod(state_dir, 0o750)
    with pytest.raises(StoreError) as refused:
        Store.open(state_dir)
    message = str(refused.value)
    assert str(state_dir) in message and "0750" in message and f"chmod 700 {state_dir}" in message
    assert isinstance(refused.value, HpcRunnerError)
    assert not (state_dir / DB_FILENAME).exists()


def test_a_world_readable_database_is_refused(store: Store, state_dir: Path) -> None:
    store.close()
    os.chmod(state_dir / DB_FILENAME, 0o644)
    with pytest.raises(StoreError, match=re.escape(f"chmod 600 {state_dir / DB_FILENAME}")):
        Store.open(state_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_state_dir_owned_by_someone_else_is_refused(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)
    os.chown(state_dir, 54321, -1)
    with pytest.raises(StoreError, match="owned by uid 54321"):
        Store.open(state_dir)


def test_a_state_dir_that_is_a_file_is_refused(state_dir: Path) -> None:
    state_dir.write_text("")
    with pytest.raises(StoreError, match="not a directory"):
        Store.open(state_dir)


# --- schema versions ------------------------------------------------------------------------------------

def test_a_newer_schema_version_is_refused(store: Store, state_dir: Path) -> None:
    store.close()
    conn = raw_connection(state_dir)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    conn.close()
    expected = (f"state.sqlite3 has schema version {SCHEMA_VERSION + 7}; this hpc-runner knows up to"
                f" {SCHEMA_VERSION}; upgrade hpc-runner")
    with pytest.raises(StoreError, match=re.escape(expected)):
        Store.open(state_dir)


def test_migrations_run_from_version_zero_once(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A database that exists but has never been migrated (version 0), private as it must be.
    state_dir.mkdir(mode=0o700)
    os.close(os.open(state_dir / DB_FILENAME, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = raw_connection(state_dir)
    conn.execute("CREATE TABLE unrelated (x)")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    conn.close()
    with Store.open(state_dir) as store:
        assert store.schema_version() == SCHEMA_VERSION
        job = add(store)

    # A later release appends a migration; it must run exactly once and keep existing data.
    probe = "CREATE TABLE probe (n INTEGER);\nINSERT INTO probe VALUES (1);\n"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, probe))
    for _ in range(3):
        with Store.open(state_dir) as store:
            assert store.schema_version() == SCHEMA_VERSION + 1
            assert store.get_job(job.id) is not None
    conn = raw_connection(state_dir)
    assert conn.execute("SELECT count(*) FROM probe").fetchone()[0] == 1
    conn.close()


def test_a_failing_migration_leaves_the_old_version(store: Store, state_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    job = add(store)
    store.close()
    broken = "CREATE TABLE probe (n INTEGER);\nINSERT INTO no_such_table VALUES (1);\n"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, broken))
    with pytest.raises(StoreError, match="no_such_table"):
        Store.open(state_dir)
    conn = raw_connection(state_dir)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'probe'").fetchone()[0] == 0
    conn.close()
    monkeypatch.undo()
    with Store.open(state_dir) as reopened:
        assert reopened.get_job(job.id) is not None


def test_agents_opening_a_new_store_at_once_migrate_it_once(state_dir: Path) -> None:
    openers = 8
    barrier = threading.Barrier(openers)
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            barrier.wait(timeout=CHILD_DEADLINE_S)
            with Store.open(state_dir) as store:
                assert store.schema_version() == SCHEMA_VERSION
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_trigger_bodies_survive_statement_splitting() -> None:
    statements = split_sql(store_module.MIGRATIONS[0])
    triggers = [s for s in statements if s.startswith("CREATE TRIGGER")]
    assert len(triggers) == 2 and all(t.endswith("END;") for t in triggers)


# --- job states -------------------------------------------------------------------------------------

def test_terminal_states_are_final(store: Store) -> None:
    job = add(store)
    assert not job.state.is_terminal and job.finished_at is None
    store.set_state(job.id, JobState.pending)
    running = store.set_state(job.id, JobState.running)
    assert running.finished_at is None
    done = store.set_state(job.id, JobState.succeeded, exit_status=0)
    assert done.state.is_terminal and done.finished_at is not None and done.exit_status == 0

    for state in (JobState.running, JobState.queued, JobState.failed):
        with pytest.raises(StoreError) as refused:
            store.set_state(job.id, state)
        message = str(refused.value)
        assert job.id in message and "succeeded" in message and state.value in message
    # Replaying the state it already has (e.g. after a restart) is harmless and changes nothing.
    assert store.set_state(job.id, JobState.succeeded) == done

    moves = [(e.detail["from"], e.detail["to"]) for e in store.audit_entries(job_id=job.id)
             if e.action == "state"]
    assert moves == [("queued", "pending"), ("pending", "running"), ("running", "succeeded")]


def test_unknown_jobs_are_reported_by_id(store: Store) -> None:
    assert store.get_job("nosuchjob") is None
    with pytest.raises(StoreError, match="nosuchjob"):
        store.set_state("nosuchjob", JobState.running)
    with pytest.raises(StoreError, match="nosuchjob"):
        store.set_slurm_id("nosuchjob", "1", "slurm")


# --- log offsets and final status ---------------------------------------------------------------------

def test_the_log_offset_never_goes_backwards(store: Store) -> None:
    job = add(store)
    store.set_log_offset(job.id, 100)
    store.set_log_offset(job.id, 100)
    with pytest.raises(StoreError, match="behind the recorded 100"):
        store.set_log_offset(job.id, 99)
    assert store.get_job(job.id).log_offset == 100  # type: ignore[union-attr]
    # A new log file (e.g. the job was requeued) starts over, on purpose only.
    store.set_log_offset(job.id, 0, reset=True)
    assert store.get_job(job.id).log_offset == 0  # type: ignore[union-attr]
    with pytest.raises(StoreError):
        store.set_log_offset(job.id, -1, reset=True)


def test_the_final_status_is_reported_exactly_once_by_racing_agents(state_dir: Path) -> None:
    with Store.open(state_dir) as setup:
        job_ids = [add(setup).id for _ in range(50)]
        for job_id in job_ids:
            setup.set_state(job_id, JobState.succeeded, exit_status=0)

    racers = 4
    barrier = threading.Barrier(racers)
    wins: list[list[str]] = [[] for _ in range(racers)]
    errors: list[BaseException] = []

    def agent(index: int) -> None:
        try:
            # One Store, hence one connection, per thread: like separate agent processes.
            with Store.open(state_dir) as store:
                barrier.wait(timeout=CHILD_DEADLINE_S)
                wins[index] = [job_id for job_id in job_ids if store.mark_final_reported(job_id)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    all_wins = [job_id for won in wins for job_id in won]
    assert sorted(all_wins) == sorted(job_ids)


def test_a_running_job_has_no_final_status_to_report(store: Store) -> None:
    job = add(store)
    with pytest.raises(StoreError, match="still queued"):
        store.mark_final_reported(job.id)


# --- audit log --------------------------------------------------------------------------------------

def test_the_audit_log_refuses_update_and_delete_even_through_raw_sql(store: Store, state_dir: Path) -> None:
    seq = store.append_audit(actor="local:user:alice", action="cancel", job_id="somejob",
                             detail={"reason": "user asked"})
    conn = raw_connection(state_dir)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="audit log is append-only"):
            conn.execute("UPDATE audit SET actor = 'local:user:mallory' WHERE seq = ?", (seq,))
        with pytest.raises(sqlite3.DatabaseError, match="audit log is append-only"):
            conn.execute("DELETE FROM audit")
    finally:
        conn.close()
    [entry] = store.audit_entries()
    assert (entry.seq, entry.actor, entry.action) == (seq, "local:user:alice", "cancel")
    assert entry.job_id == "somejob"
    assert entry.detail == {"reason": "user asked"}


def test_audit_entries_are_filtered_by_job_and_sequence(store: Store) -> None:
    first = store.append_audit(actor="agent", action="policy_reload", detail={"policy": "p.toml"})
    second = store.append_audit(actor="agent", action="cancel", job_id="a", detail={})
    third = store.append_audit(actor="agent", action="cancel", job_id="b", detail={})
    assert first < second < third
    assert [e.seq for e in store.audit_entries(since_seq=first)] == [second, third]
    assert [e.seq for e in store.audit_entries(job_id="b")] == [third]
    assert [e.seq for e in store.audit_entries(limit=1)] == [first]


def test_a_denial_ends_the_job_and_is_audited_with_its_reasons(store: Store) -> None:
    job = add(store)
    store.record_decision(job.id, actor="github:user:alice", decision=DENIED)
    denied = store.get_job(job.id)
    assert denied is not None and denied.state == JobState.denied and denied.finished_at is not None
    assert denied.decision == DENIED
    entries = store.audit_entries(job_id=job.id)
    assert [e.action for e in entries] == ["decision", "state"]
    assert entries[0].actor == "github:user:alice" and entries[0].detail["reasons"] == DENIED["reasons"]


def test_a_decision_without_an_explicit_allow_is_a_denial(store: Store) -> None:
    job = add(store)
    store.record_decision(job.id, actor="agent", decision={"reasons": ["policy error"]})
    assert store.get_job(job.id).state == JobState.denied  # type: ignore[union-attr]


def test_an_allowed_decision_keeps_the_job_queued(store: Store) -> None:
    job = add(store)
    store.record_decision(job.id, actor="agent", decision=ALLOWED)
    assert store.get_job(job.id).state == JobState.queued  # type: ignore[union-attr]


def test_record_decision_writes_the_job_and_the_audit_entry_or_neither(store: Store, state_dir: Path) -> None:
    job = add(store)
    # The job row is updated first; failing the audit insert that follows must undo that update.
    conn = raw_connection(state_dir)
    conn.execute("CREATE TRIGGER fail_audit BEFORE INSERT ON audit"
                 " BEGIN SELECT RAISE(ABORT, 'simulated failure'); END")
    with pytest.raises(StoreError, match="simulated failure"):
        store.record_decision(job.id, actor="agent", decision=DENIED)
    after = store.get_job(job.id)
    assert after is not None and after.decision is None and after.state == JobState.queued
    assert store.audit_entries() == []

    conn.execute("DROP TRIGGER fail_audit")
    conn.close()
    store.record_decision(job.id, actor="agent", decision=DENIED)
    assert store.get_job(job.id).decision == DENIED  # type: ignore[union-attr]


# --- lookups ------------------------------------------------------------------------------------------

def test_the_same_ci_job_is_never_admitted_twice(store: Store) -> None:
    first = add(store, source="buildkite", external_id="job-1")
    with pytest.raises(StoreError, match=f"already admitted as job {first.id}"):
        add(store, source="buildkite", external_id="job-1")
    add(store, source="github", external_id="job-1")       # another CI service's id space
    add(store, source="buildkite")                          # jobs without an external id never clash
    add(store, source="buildkite")
    assert store.find_by_external_id("buildkite", "job-1") == first
    with pytest.raises(StoreError, match="already exists"):
        add(store, job_id=first.id)


def test_jobs_are_found_by_slurm_id(store: Store) -> None:
    old = add(store)
    new = add(store)
    store.set_slurm_id(old.id, "17", "slurm")
    store.set_slurm_id(new.id, "17", "slurm")
    found = store.find_by_slurm_id("17")
    assert found is not None and found.id == new.id
    assert store.find_by_slurm_id("18") is None
    with pytest.raises(StoreError, match="unknown executor"):
        store.set_slurm_id(old.id, "1", "kubernetes")


def test_slurms_reason_and_the_nodes_are_written_only_when_they_change(store: Store) -> None:
    job = add(store, source_url="https://buildkite.com/o/p/builds/1#abc")
    assert store.get_job(job.id) == job and job.source_url == "https://buildkite.com/o/p/builds/1#abc"
    assert (job.state_reason, job.node_list) == (None, None)
    changed = store.set_whereabouts(job.id, state_reason="Priority", node_list=None)
    assert changed is not None and (changed.state_reason, changed.node_list) == ("Priority", None)
    assert store.set_whereabouts(job.id, state_reason="Priority", node_list=None) is None
    changed = store.set_whereabouts(job.id, state_reason=None, node_list="cn[01-02]")
    assert changed is not None and (changed.state_reason, changed.node_list) == (None, "cn[01-02]")
    assert store.set_whereabouts(job.id, state_reason=None, node_list="cn[01-02]") is None
    assert store.get_job(job.id) == changed
    with pytest.raises(StoreError, match="no job"):
        store.set_whereabouts("nosuchjob", state_reason=None, node_list=None)


def test_jobs_of_before_the_whereabouts_columns_have_none(state_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:2])
        with Store.open(state_dir) as store:
            assert store.schema_version() == 2
    conn = raw_connection(state_dir)
    conn.execute("INSERT INTO jobs (id, source, identity, spec, state, created_at, updated_at)"
                 " VALUES ('old1', 'local', '{}', '{}', 'pending', 1.0, 1.0)")
    conn.commit()
    conn.close()
    with Store.open(state_dir) as store:
        assert store.schema_version() == SCHEMA_VERSION
        record = store.get_job("old1")
        assert record is not None and record.state == JobState.pending
        assert (record.source_url, record.state_reason, record.node_list) == (None, None, None)


def test_list_jobs_filters_and_orders_by_creation(store: Store) -> None:
    a = add(store, source="local")
    b = add(store, source="github")
    c = add(store, source="github")
    store.set_state(b.id, JobState.running)
    assert [j.id for j in store.list_jobs()] == [a.id, b.id, c.id]
    assert [j.id for j in store.list_jobs(states=[JobState.queued])] == [a.id, c.id]
    assert [j.id for j in store.list_jobs(source="github")] == [b.id, c.id]
    assert [j.id for j in store.list_jobs(limit=2)] == [a.id, b.id]
    assert [j.id for j in store.list_jobs(limit=2, newest_first=True)] == [c.id, b.id]
    assert store.list_jobs(states=[]) == []


def test_running_jobs_are_counted_per_account(store: Store) -> None:
    def job_in(account: str, state: JobState) -> None:
        job = add(store)
        store.record_decision(job.id, actor="agent", decision={**ALLOWED, "account": account})
        if state != JobState.queued:
            store.set_state(job.id, state)

    job_in("clima", JobState.pending)
    job_in("clima", JobState.running)
    job_in("clima", JobState.queued)
    job_in("clima", JobState.succeeded)
    job_in("ocean", JobState.running)
    add(store)                                   # undecided
    assert store.count_by_account(ACTIVE_STATES) == {"clima": 2, "ocean": 1}
    assert store.count_by_account([JobState.queued, *ACTIVE_STATES]) == {"clima": 3, "ocean": 1}


def test_a_malformed_row_is_reported_with_its_job(store: Store, state_dir: Path) -> None:
    job = add(store)
    conn = raw_connection(state_dir)
    conn.execute("UPDATE jobs SET spec = '{not json' WHERE id = ?", (job.id,))
    conn.close()
    with pytest.raises(StoreError, match=f"job {job.id} spec"):
        store.get_job(job.id)


def test_values_that_are_not_json_are_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="JSON"):
        add(store, spec={"when": object()})
    with pytest.raises(StoreError, match="unknown job source"):
        add(store, source="jenkins")


def test_json_is_stored_canonically(store: Store, state_dir: Path) -> None:
    job = add(store, identity={"b": 1, "a": [1, 2]})
    conn = raw_connection(state_dir)
    stored = conn.execute("SELECT identity FROM jobs WHERE id = ?", (job.id,)).fetchone()[0]
    assert stored == '{"a":[1,2],"b":1}'
    conn.close()


# --- crash safety ---------------------------------------------------------------------------------------

class Writer:
    """The crash writer as a child process whose stdout lines are read with a deadline."""

    def __init__(self, state_dir: Path, mode: str, stderr: IO[str]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, str(WRITER), str(state_dir), mode],
                                     stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self.stderr = stderr
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, wanted: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + CHILD_DEADLINE_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the crash writer did not get there within {CHILD_DEADLINE_S}s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.stderr.flush()
                self.stderr.seek(0)
                pytest.fail(f"the crash writer exited early ({self.proc.wait()}):\n{self.stderr.read()}")
            if wanted(line):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=CHILD_DEADLINE_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def writer_stderr(tmp_path: Path) -> Iterator[IO[str]]:
    with open(tmp_path / "writer.stderr", "w+") as stream:
        yield stream


def assert_store_accepts_writes(store: Store) -> None:
    job = add(store)
    store.set_state(job.id, JobState.running)
    assert store.get_job(job.id).state == JobState.running  # type: ignore[union-attr]


def test_a_writer_killed_inside_a_transaction_leaves_only_committed_jobs(
        state_dir: Path, writer_stderr: IO[str]) -> None:
    writer = Writer(state_dir, "in-transaction", writer_stderr)
    try:
        committed = writer.wait_for(lambda line: line.startswith("committed ")).split(" ", 1)[1].split(",")
        writer.wait_for(lambda line: line == "in-transaction")
        # The uncommitted transaction has spilled into the WAL: the crash hits real half-written state.
        assert os.path.getsize(state_dir / f"{DB_FILENAME}-wal") > 256 * 1024
    finally:
        writer.kill()
    assert writer.proc.returncode == -signal.SIGKILL

    with Store.open(state_dir) as store:
        store.integrity_check()
        assert sorted(j.id for j in store.list_jobs()) == sorted(committed)
        for n, job_id in enumerate(committed):
            job = store.get_job(job_id)
            assert job is not None and job.spec == spec_for(n) and job.identity == identity_for(n)
        assert not [e for e in store.audit_entries() if e.actor == UNCOMMITTED_ACTOR]
        assert_store_accepts_writes(store)


def test_a_writer_killed_between_many_commits_loses_none_of_them(
        state_dir: Path, writer_stderr: IO[str]) -> None:
    reported = 40
    writer = Writer(state_dir, "commits", writer_stderr)
    seen: dict[str, int] = {}
    try:
        def note(line: str) -> bool:
            _, seq, job_id = line.split(" ")
            seen[job_id] = int(seq)
            return len(seen) >= reported
        writer.wait_for(note)
    finally:
        writer.kill()

    with Store.open(state_dir) as store:
        store.integrity_check()
        jobs = store.list_jobs()
        assert len(jobs) >= reported
        by_id = {job.id: job for job in jobs}
        for job_id, seq in seen.items():
            # Reported means both of its transactions committed: the job and its decision.
            job = by_id[job_id]
            assert job.decision == {"allowed": True, "account": "a"}
            assert [e.action for e in store.audit_entries(job_id=job_id)] == ["decision"]
            assert job.spec == spec_for(seq)
        for job in jobs:
            # Every row there is whole, including those committed after the last report.
            seq = job.spec["seq"]
            assert job.external_id == f"crash-{seq}"
            assert job.spec == spec_for(seq) and job.identity == identity_for(seq)
        assert_store_accepts_writes(store)
