"""One Slurm job from submission to its final status, with its log fed to the sinks.

Shared by `hpc-runner run --executor slurm` and the agent. The log is read from the job's
output file (Slurm writes it, in append mode) from a persisted byte offset, so an agent that
restarts carries on exactly where the last one stopped: nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from runner.executors.slurm import SlurmExecutor, SlurmJob
from runner.executors.slurm.cli import SlurmUnavailable
from runner.executors.slurm.tracker import StateChanged, TrackerEvent
from runner.job import Outcome
from runner.logs.tail import follow

# (offset, data) of each new piece of the log; (0, b"") says the file restarted from 0.
ChunkSink = Callable[[int, bytes], Awaitable[None]]


async def pump_log(path: Path, *, offset: int, done: Callable[[], bool], sink: ChunkSink) -> None:
    """Feed the log from `offset` to `sink` until `done()` and everything written is read."""
    async for chunk_offset, data in follow(path, offset=offset, done=done):
        await sink(chunk_offset, data)


async def follow_slurm_job(executor: SlurmExecutor, job: SlurmJob, *, offset: int, sink: ChunkSink,
                           cancel: asyncio.Event, grace_seconds: float,
                           on_running: Callable[[], None] | None = None) -> Outcome:
    """Watch a submitted job to its end while its log streams; `cancel` cancels it in Slurm."""

    def on_event(event: TrackerEvent) -> None:
        if isinstance(event, StateChanged) and event.phase == "running" and on_running is not None:
            on_running()

    watch = asyncio.create_task(executor.watch(job, on_event=on_event))
    pump = asyncio.create_task(pump_log(job.log_path, offset=offset, done=watch.done, sink=sink))
    canceller: asyncio.Task[None] | None = None
    try:
        waiter = asyncio.create_task(cancel.wait())
        await asyncio.wait({watch, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not watch.done() and job.slurm_id is not None:
            canceller = asyncio.create_task(_cancel(executor, job.slurm_id, grace_seconds))
        outcome = await watch
        await pump
        return outcome
    finally:
        for task in (watch, pump, canceller):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _cancel(executor: SlurmExecutor, slurm_id: str, grace_seconds: float) -> None:
    # Slurm may be briefly unreachable (a controller restart): keep asking until it answers.
    delay = 1.0
    while True:
        try:
            await executor.cancel(slurm_id, grace_seconds)
            return
        except SlurmUnavailable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
