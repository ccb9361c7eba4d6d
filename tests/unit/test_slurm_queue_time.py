"""queue_time: a job still pending in Slurm when its queue time has passed is taken out of the
queue and ends `expired`, saying how long and why it waited; one that started runs on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

from conftest import wait_until

from runner.executors.slurm import QueueLimit, SlurmCli, SlurmExecutor, SlurmJob
from unit.test_slurm_tracker import FakeJob, FakeSlurm


class CancellingSlurm(FakeSlurm):
    """FakeSlurm that also cancels as scancel does: `pending_only` leaves a started job alone."""

    def __init__(self) -> None:
        super().__init__()
        self.scancels: list[tuple[str, dict[str, Any]]] = []

    async def scancel(self, slurm_id: str, **options: Any) -> bool:
        self.scancels.append((slurm_id, options))
        job = self.jobs.get(slurm_id)
        if job is None or (options.get("pending_only") and job.state != "PENDING"):
            return False
        job.state, job.exit_code = "CANCELLED", "0:15"
        return True


def _executor(slurm: CancellingSlurm) -> SlurmExecutor:
    return SlurmExecutor(cast(SlurmCli, slurm), user="ci", poll_interval=0.05, max_poll_delay=0.05)


def _job(tmp_path: Path, slurm_id: str = "41") -> SlurmJob:
    (tmp_path / "output.log").touch()
    return SlurmJob("j1", tmp_path, tmp_path / "output.log", slurm_id)


async def test_a_job_pending_past_its_queue_time_expires_with_how_long_and_why(tmp_path: Path) -> None:
    slurm = CancellingSlurm()
    slurm.jobs["41"] = FakeJob("PENDING", reason="Resources")
    executor = _executor(slurm)
    try:
        outcome = await asyncio.wait_for(executor.follow(
            _job(tmp_path), cancel=asyncio.Event(), grace_seconds=1,
            queue_limit=QueueLimit(1, time.time())), 10)
    finally:
        await executor.close()
    assert outcome.state == "expired" and outcome.exit_status is None
    assert outcome.detail == ("waited 1s in Slurm's queue, past its queue_time of 1s (Slurm's reason: "
                              "Resources); taken out of the queue before it started")
    assert slurm.scancels == [("41", {"pending_only": True})]
    log = (tmp_path / "output.log").read_text()
    assert "hpc-runner: pending: Resources" in log
    assert f"hpc-runner: expired: {outcome.detail}" in log


async def test_the_deadline_counts_from_the_submission_so_a_restarted_agent_keeps_it(tmp_path: Path) -> None:
    slurm = CancellingSlurm()
    slurm.jobs["41"] = FakeJob("PENDING", reason="Priority")
    executor = _executor(slurm)
    started = time.monotonic()
    try:
        outcome = await asyncio.wait_for(executor.follow(
            _job(tmp_path), cancel=asyncio.Event(), grace_seconds=1,
            queue_limit=QueueLimit(3600, time.time() - 3700)), 10)
    finally:
        await executor.close()
    assert time.monotonic() - started < 5
    assert outcome.state == "expired"
    waited, _, rest = outcome.detail.partition(" in Slurm's queue")
    assert waited.startswith("waited 1h1m4")  # 3700 s, and however long the test took to get there
    assert rest.startswith(", past its queue_time of 1h (Slurm's reason: Priority)")


async def test_a_job_that_started_before_its_queue_time_runs_to_its_end(tmp_path: Path) -> None:
    slurm = CancellingSlurm()
    slurm.jobs["41"] = FakeJob("PENDING", reason="Resources")
    executor = _executor(slurm)
    follow = asyncio.create_task(executor.follow(_job(tmp_path), cancel=asyncio.Event(), grace_seconds=1,
                                                 queue_limit=QueueLimit(1, time.time())))
    try:
        await wait_until(lambda: any(name == "squeue" for name, _ in slurm.calls), "the first squeue")
        slurm.jobs["41"] = FakeJob("RUNNING", node_list="vm")
        await wait_until(lambda: executor.tracker.state_of("41") == "RUNNING", "the job seen running")
        past_the_deadline = time.time() + 1.5
        await wait_until(lambda: time.time() > past_the_deadline, "the queue time to pass")
        assert not follow.done() and slurm.scancels == []
        slurm.jobs["41"] = FakeJob("COMPLETED", exit_code="0:0", node_list="vm")
        outcome = await asyncio.wait_for(follow, 10)
    finally:
        follow.cancel()
        await executor.close()
    assert outcome.state == "succeeded"


async def test_a_job_that_starts_as_it_expires_is_not_cancelled_and_runs_on(tmp_path: Path) -> None:
    """Slurm itself checks that the job still pends (scancel --state=PENDING): the race between
    the last look and the cancel cannot kill a job that has just started."""
    slurm = CancellingSlurm()
    slurm.jobs["41"] = FakeJob("PENDING", reason="Resources")

    original = slurm.scancel

    async def starts_first(slurm_id: str, **options: Any) -> bool:
        slurm.jobs[slurm_id] = FakeJob("COMPLETED", exit_code="0:0", node_list="vm")
        return await original(slurm_id, **options)

    slurm.scancel = starts_first  # type: ignore[method-assign]
    executor = _executor(slurm)
    try:
        outcome = await asyncio.wait_for(executor.follow(
            _job(tmp_path), cancel=asyncio.Event(), grace_seconds=1,
            queue_limit=QueueLimit(1, time.time() - 5)), 10)
    finally:
        await executor.close()
    assert outcome.state == "succeeded"
    assert slurm.scancels == [("41", {"pending_only": True})]
