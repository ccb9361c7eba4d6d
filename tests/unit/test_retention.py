"""`[retention]`: what of a finished job's files expires, removing it without leaving work_root, the
agent doing it on its own, `hpc-runner gc`, and `hpc-runner logs` of a job whose log expired.

A real store and real files in tmp_path; the time is a clock the tests move.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.github_api import ManualClock

from runner import retention
from runner.agent import Agent
from runner.commands import gc
from runner.config import AgentConfig, RetentionConfig, SandboxConfig, parse_config_text
from runner.errors import InputError
from runner.job import JobRecord, JobState
from runner.localqueue.client import LocalQueueClient, LogGone, RequestFailed
from runner.localqueue.server import LocalQueueServer
from runner.site_policy import load_site_policy
from runner.store import DB_FILENAME, Store

DAY = 86400
DEADLINE_S = 5.0
ME = {"source": "local", "user": "root" if os.geteuid() == 0 else os.environ.get("USER", "me")}


# -- config ----------------------------------------------------------------------------------------


def test_retention_defaults_to_two_weeks_of_job_directories_and_ninety_days_of_logs() -> None:
    config = parse_config_text('executor = "local"\n')
    assert config.retention == RetentionConfig(job_dirs=14 * DAY, logs=90 * DAY, outputs=90 * DAY)


def test_retention_periods_are_durations() -> None:
    config = parse_config_text('[retention]\njob_dirs = "30d"\nlogs = "1d12h"\noutputs = "2h"\n')
    assert config.retention == RetentionConfig(job_dirs=30 * DAY, logs=36 * 3600, outputs=7200)


@pytest.mark.parametrize(("text", "message"), [
    ('job_dirs = "soon"', "retention.job_dirs"),
    ('logs = "10m"', "at least 1h"),
    ('keep = "1d"', "keep"),
])
def test_a_bad_retention_value_names_its_key(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_config_text(f"[retention]\n{text}\n", "agent.toml")


# -- the plan --------------------------------------------------------------------------------------


def record(job_id: str, *, state: JobState = JobState.succeeded, finished_at: float | None = 1000.0,
           log_path: str | None = None) -> JobRecord:
    return JobRecord(id=job_id, source="local", external_id=None, identity=dict(ME), spec={}, decision=None,
                     executor="local", slurm_id=None, state=state, exit_status=0, outcome_detail=None,
                     log_path=log_path, log_offset=0, created_at=0.0, updated_at=0.0,
                     finished_at=finished_at if state.is_terminal else None, final_reported=True)


KEEP = RetentionConfig(job_dirs=10 * DAY, logs=30 * DAY, outputs=60 * DAY)
ENTRIES = frozenset({"workspace", "tmp", "meta", "output.log", "outputs"})


def planned(files: list[retention.JobFiles], now: float, **kw: Any) -> set[tuple[str, str]]:
    work_root = Path("/work")
    return {(str(item.path.relative_to(item.root)), item.kind)
            for item in retention.plan(files, retention=KEEP, now=now, work_root=work_root, **kw)}


def test_nothing_expires_before_its_period() -> None:
    files = [retention.JobFiles(record("a1"), ENTRIES)]
    assert planned(files, 1000 + 10 * DAY - 1) == set()


def test_the_job_directory_goes_first_and_the_log_and_outputs_stay() -> None:
    files = [retention.JobFiles(record("a1"), ENTRIES)]
    assert planned(files, 1000 + 10 * DAY) == {("a1/workspace", "job_dirs"), ("a1/tmp", "job_dirs"),
                                               ("a1/meta", "job_dirs")}


def test_the_log_goes_after_its_own_period_and_the_directory_with_its_last_entry() -> None:
    after_logs = [retention.JobFiles(record("a1"), frozenset({"output.log", "outputs"}))]
    assert planned(after_logs, 1000 + 30 * DAY) == {("a1/output.log", "logs")}
    last = [retention.JobFiles(record("a1"), frozenset({"outputs"}))]
    assert planned(last, 1000 + 60 * DAY) == {("a1", "job_dirs")}


def test_a_job_that_has_not_ended_keeps_everything() -> None:
    files = [retention.JobFiles(record(f"j{i}", state=state), ENTRIES)
             for i, state in enumerate((JobState.queued, JobState.pending, JobState.running))]
    assert planned(files, 1000 + 1000 * DAY) == set()


def test_a_scratch_under_workdir_root_goes_with_the_job_directory() -> None:
    files = [retention.JobFiles(record("a1"), None, scratch=True)]
    items = retention.plan(files, retention=KEEP, now=1000 + 10 * DAY, work_root=Path("/work"),
                           workdir_root=Path("/scratch/jobs"))
    assert [(item.path, item.root) for item in items] == [(Path("/scratch/jobs/a1"), Path("/scratch/jobs"))]


def test_nothing_that_is_or_holds_a_protected_path_is_planned() -> None:
    files = [retention.JobFiles(record("a1"), ENTRIES)]
    assert planned(files, 1000 + 100 * DAY, protected=[Path("/work/a1/meta")]) == set()


# -- removing --------------------------------------------------------------------------------------


def test_a_link_inside_a_job_directory_is_removed_not_what_it_points_at(tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data").write_text("keep me")
    work_root = tmp_path / "work"
    (work_root / "a1").mkdir(parents=True)
    (work_root / "a1" / "workspace").symlink_to(outside)
    removed = retention.remove(retention.Expired("a1", work_root / "a1" / "workspace", "job_dirs", work_root))
    assert removed.gone
    assert not (work_root / "a1" / "workspace").is_symlink()
    assert (outside / "data").read_text() == "keep me"


def test_a_job_directory_that_is_a_link_out_of_work_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    (outside / "workspace").mkdir(parents=True)
    work_root = tmp_path / "work"
    work_root.mkdir()
    (work_root / "a1").symlink_to(outside)
    for path in (work_root / "a1", work_root / "a1" / "workspace"):
        with pytest.raises(retention.RefusedPath):
            retention.remove(retention.Expired("a1", path, "job_dirs", work_root))
    assert (outside / "workspace").is_dir()


def test_a_path_outside_work_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    work_root = tmp_path / "work"
    for path in (tmp_path / "state", work_root / ".." / "state", work_root / "a1" / "x" / "y"):
        with pytest.raises(retention.RefusedPath):
            retention.remove(retention.Expired("a1", path, "job_dirs", tmp_path / "work"))
    assert (tmp_path / "state").is_dir()


def test_a_read_only_copy_of_a_workspace_is_removed_and_measured(tmp_path: Path) -> None:
    work_root = tmp_path / "work"
    inner = work_root / "a1" / "workspace" / "src"
    inner.mkdir(parents=True)
    (inner / "big").write_bytes(b"x" * 3000)
    (inner / "small").write_bytes(b"y" * 100)
    inner.chmod(0o500)
    item = retention.Expired("a1", work_root / "a1" / "workspace", "job_dirs", work_root)
    assert retention.remove(item, dry_run=True) == retention.Removed(item, 3100, False)
    assert (inner / "big").exists()
    assert retention.remove(item) == retention.Removed(item, 3100, True)
    assert not (work_root / "a1" / "workspace").exists()


# -- with a real store -----------------------------------------------------------------------------


class Site:
    """A config, a store with jobs, and their directories in tmp_path."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.config = AgentConfig(state_dir=root / "state", work_root=root / "work", policy=None,
                                  executor="local", max_jobs=1, retention=KEEP, **config)
        self.store = Store.open(self.config.state_dir)

    def job(self, *, state: JobState = JobState.succeeded, log: bytes = b"hello\n") -> JobRecord:
        added = self.store.add_job(source="local", identity=ME, spec={"name": "j"}, state=JobState.queued)
        directory = self.config.work_root / added.id
        for name in ("workspace", "tmp", "meta"):
            (directory / name).mkdir(parents=True)
        (directory / "workspace" / "result.dat").write_bytes(b"r" * 500)
        (directory / "output.log").write_bytes(log)
        self.store.set_log_path(added.id, directory / "output.log")
        if state != JobState.queued:
            self.store.set_state(added.id, state, exit_status=0 if state.is_terminal else None)
        found = self.store.get_job(added.id)
        assert found is not None
        return found

    def clock_after(self, job: JobRecord, seconds: float) -> ManualClock:
        assert job.finished_at is not None
        return ManualClock(start=job.finished_at + seconds)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path)
    yield made
    made.store.close()


def test_gc_dry_run_says_what_would_go_with_sizes_and_removes_nothing(site: Site) -> None:
    done = site.job()
    running = site.job(state=JobState.running)
    out = io.StringIO()
    clock = site.clock_after(done, 11 * DAY)
    assert gc.collect(site.config, out, dry_run=True, clock=clock.time) == 0
    text = out.getvalue()
    assert f"would remove {site.config.work_root / done.id / 'workspace'} (500 B; job {done.id}, " \
           "job_dirs expired)" in text
    assert running.id not in text
    assert text.endswith("gc: would remove 3 paths, 500 B\n")
    assert (site.config.work_root / done.id / "workspace" / "result.dat").exists()


def test_gc_removes_the_job_directory_then_the_log_and_audits_both(site: Site) -> None:
    done = site.job(log=b"L" * 2048)
    running = site.job(state=JobState.running)
    clock = site.clock_after(done, 11 * DAY)
    out = io.StringIO()
    assert gc.collect(site.config, out, dry_run=False, clock=clock.time) == 0
    assert out.getvalue().endswith("gc: removed 3 paths, 500 B\n")
    directory = site.config.work_root / done.id
    assert sorted(os.listdir(directory)) == ["output.log"]
    assert sorted(os.listdir(site.config.work_root / running.id)) == ["meta", "output.log", "tmp",
                                                                      "workspace"]
    clock.advance(20 * DAY)
    out = io.StringIO()
    assert gc.collect(site.config, out, dry_run=False, clock=clock.time) == 0
    assert out.getvalue() == (f"removed {directory} (2.0 KiB; job {done.id}, job_dirs expired)\n"
                              "gc: removed 1 paths, 2.0 KiB\n")
    assert not directory.exists()
    # The record and the store stay; the audit log says what went.
    assert site.store.get_job(done.id) is not None
    assert (site.config.state_dir / DB_FILENAME).exists()
    audits = [entry for entry in site.store.audit_entries(job_id=done.id) if entry.action == "retention"]
    assert [entry.detail["bytes"] for entry in audits] == [500, 2048]
    assert audits[0].actor.startswith("hpc-runner gc (")


def test_gc_removes_a_scratch_under_workdir_root(tmp_path: Path) -> None:
    made = Site(tmp_path, sandbox=SandboxConfig(workdir_root=tmp_path / "scratch"))
    try:
        done = made.job()
        scratch = tmp_path / "scratch" / done.id
        scratch.mkdir(parents=True)
        (scratch / "f").write_bytes(b"s" * 10)
        assert gc.collect(made.config, io.StringIO(), dry_run=False,
                          clock=made.clock_after(done, 10 * DAY).time) == 0
        assert not scratch.exists()
        assert (made.config.work_root / done.id / "output.log").exists()
    finally:
        made.store.close()


def test_gc_as_another_account_says_who_may_run_it(site: Site) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the state dir to another account")
    os.chown(site.config.state_dir, 65534, 65534)
    try:
        with pytest.raises(InputError, match=r"belongs to nobody: only nobody, the agent's account, may read "
                                             r"it \(run `sudo -u nobody hpc-runner gc"):
            gc.collect(site.config, io.StringIO(), dry_run=True)
    finally:
        os.chown(site.config.state_dir, 0, 0)


# -- the agent, on its own -------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_the_agent_removes_expired_files_at_start_and_again_each_interval(site: Site) -> None:
    done = site.job()
    agent = Agent(site.config, load_site_policy(site.config), site.store)
    clock = site.clock_after(done, 10 * DAY)
    agent.clock = clock.time
    agent.retention_interval = 0.05
    directory = site.config.work_root / done.id
    agent.start()
    try:
        await until(lambda: sorted(os.listdir(directory)) == ["output.log"],
                    "the job directory to be emptied")
        clock.advance(20 * DAY)
        await until(lambda: not directory.exists(), "the log to go")
    finally:
        agent.drain()
        await agent.stop_workers()
    assert site.store.get_job(done.id) is not None


# -- `hpc-runner logs` of an expired log -----------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A Unix socket's path must fit in 108 bytes: tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="hpcr-") as name:
        yield Path(name)


async def test_logs_of_a_job_whose_log_expired_says_so(site: Site, short_dir: Path) -> None:
    kept = site.job(log=b"still here\n")
    done = site.job()
    agent = Agent(site.config, load_site_policy(site.config), site.store)
    server = LocalQueueServer(agent, short_dir / "agent.sock")
    await server.start()
    try:
        removed, _ = retention.remove_all([retention.Expired(done.id, site.config.work_root / done.id,
                                                             "logs", site.config.work_root)])
        retention.audit_removals(site.store, removed, actor="agent")
        client = LocalQueueClient(short_dir / "agent.sock")
        with pytest.raises(LogGone, match=f"the log of job {done.id} has expired"):
            await asyncio.to_thread(lambda: list(client.stream_logs(done.id, follow=False)))
        assert b"".join(await asyncio.to_thread(
            lambda: list(client.stream_logs(kept.id, follow=False)))) == b"still here\n"
        (site.config.work_root / kept.id / "output.log").unlink()
        with pytest.raises(RequestFailed, match="is gone: it was removed"):
            await asyncio.to_thread(lambda: list(client.stream_logs(kept.id, follow=True)))
    finally:
        await server.close()
        agent.drain()
        await agent.stop_workers()
