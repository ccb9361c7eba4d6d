"""Buildkite's job starts when the runner job runs, not while it waits in Slurm's queue: the step's
timeout (counted by Buildkite from the start) never runs on a busy cluster's time. What the log
said while the job waited is sent first, right after the start; a job that expires while it waits
is started only to be given its log and its finish (exit status 75 and the reason)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from conftest import wait_until
from fakes.buildkite_api import BuildkiteEmulator
from fakes.buildkite_signer import StepSigner, signed_job

from runner.job import Ended, JobState
from runner.sources import LogSink
from runner.sources.buildkite.source import START_LOOK_S
from unit import test_buildkite_source as bk_tests
from unit.test_buildkite_source import PLUGIN, Running, finished, queue, unstamped

from .buildkite_host import FakeHost

# test_buildkite_source's fixtures: the emulator, a source on a fake host, a signer and a repository.
bk, make_source, signer, repo = bk_tests.bk, bk_tests.make_source, bk_tests.signer, bk_tests.repo

PENDING_LINES = b"hpc-runner: submitted to Slurm as job 41\nhpc-runner: pending: Resources\n"
EXPIRED = ("waited 20s in Slurm's queue, past its queue_time of 20s (Slurm's reason: Resources); taken "
           "out of the queue before it started")


class PendingHost(FakeHost):
    """Its jobs first pend in "Slurm" (saying so in their log) until `slurm_starts` is set, then
    run as FakeHost's do; or, when `expires`, end expired while they pend."""

    def __init__(self, root: Path, *, expires: bool = False) -> None:
        super().__init__(root)
        self.expires = expires
        self.slurm_starts = asyncio.Event()
        self.running_at: float | None = None   # time.monotonic() when the job began to run

    async def run(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                  on_change: Callable[..., None] | None = None) -> Ended:
        record = self.store.get_job(job_id)
        assert record is not None
        name = str(record.spec["name"])
        self.ran.append(job_id)

        def changed(state: JobState, detail: str | None = None) -> None:
            now = self.store.set_state(job_id, state, outcome_detail=detail)
            if on_change is not None:
                on_change(now)

        async def pend_then_run() -> None:
            changed(JobState.pending)
            self.note(job_id, PENDING_LINES.decode())
            waits = [asyncio.ensure_future(self.slurm_starts.wait()), asyncio.ensure_future(cancel.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if cancel.is_set():  # as Slurm does with a pending job: it ends, never having run
                self.note(job_id, "hpc-runner: job cancelled before it started\n")
                changed(JobState.cancelled, "cancelled before it started")
            elif self.expires:  # the queue time passed
                self.note(job_id, f"hpc-runner: expired: {EXPIRED}\n")
                changed(JobState.expired, EXPIRED)
            else:
                self.running_at = time.monotonic()
                changed(JobState.running)
                await self._write(job_id, name, cancel)

        return await self._follow(job_id, asyncio.create_task(pend_then_run()), sink, offset)


async def _pending_and_watched(bk: BuildkiteEmulator, host: PendingHost, job_id: str) -> None:
    """Until the job pends, its log says so, and the source has looked at Buildkite's job state
    (and its runner job's) more than once since: time enough to have started it, had it wanted."""
    await wait_until(lambda: host.store.list_jobs(states=[JobState.pending]), "the job to pend")
    polls = len(bk.requests("job_state"))
    looked = time.monotonic() + 2 * START_LOOK_S
    await wait_until(lambda: len(bk.requests("job_state")) >= polls + 2 and time.monotonic() > looked,
                     "the source to watch the pending job")


async def test_the_job_starts_at_buildkite_when_it_runs_and_the_pending_lines_come_first(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    host = PendingHost(tmp_path / "site")
    make_source(host)
    job_id = queue(bk, signed_job(signer, "echo hello", repo=str(repo), plugins=[PLUGIN]))

    await _pending_and_watched(bk, host, job_id)
    assert bk.job_state(job_id) == "accepted"           # not started: no timeout runs
    assert bk.requests("start") == [] and bk.chunks(job_id) == []

    host.slurm_starts.set()
    body = await finished(bk, job_id)

    assert body["exit_status"] == "0"
    started = bk.started_at(job_id)
    assert started is not None and host.running_at is not None and started >= host.running_at
    chunks = bk.chunks(job_id)
    assert chunks and all(chunk.received_at >= started for chunk in chunks)
    log = unstamped(bk.log(job_id))
    assert log.index(PENDING_LINES) < log.index(b"hello from the job\n")
    holding = {text: next(c for c in chunks if text in unstamped(c.data))
               for text in (b"pending: Resources", b"hello from the job")}
    assert holding[b"pending: Resources"].received_at <= holding[b"hello from the job"].received_at


async def test_a_job_that_expires_while_it_pends_finishes_with_75_and_the_reason(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    host = PendingHost(tmp_path / "site", expires=True)
    make_source(host)
    job_id = queue(bk, signed_job(signer, "echo hello", repo=str(repo), plugins=[PLUGIN]))

    await _pending_and_watched(bk, host, job_id)
    assert bk.job_state(job_id) == "accepted"
    host.slurm_starts.set()  # here: its queue time passes
    body = await finished(bk, job_id)

    assert (body["exit_status"], body.get("signal"), body.get("signal_reason")) == ("75", None, None)
    log = unstamped(bk.log(job_id))
    assert PENDING_LINES in log and f"hpc-runner: expired: {EXPIRED}\n".encode() in log
    assert b"hello from the job" not in log


async def test_a_job_cancelled_in_buildkite_while_it_pends_is_cancelled_and_finished(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    host = PendingHost(tmp_path / "site")
    make_source(host)
    job_id = queue(bk, signed_job(signer, "sleep 100", repo=str(repo), plugins=[PLUGIN]))
    await _pending_and_watched(bk, host, job_id)

    bk.cancel_job(job_id)
    body = await finished(bk, job_id)

    assert (body["exit_status"], body["signal"], body["signal_reason"]) == ("-1", "SIGTERM", "cancel")
    assert bk.requests("start") == []   # never started: Buildkite took its log and finish as it was
    assert PENDING_LINES in unstamped(bk.log(job_id))
