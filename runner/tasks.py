"""Work in flight: the tasks a part of the agent started and has not seen end, and the pauses that
a drain (or another event) cuts short.

asyncio keeps only a weak reference to a running task, so a task nobody holds may vanish before it
ends; a `TaskSet` holds each one until it ends, and can wait for all of them (those they start
meanwhile included) or cancel them all. Each source keeps its work in flight in one; so does the
local queue its connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


class TaskSet:
    """Tasks started and not finished yet."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_idle(self) -> None:
        """Until every task, including those the running ones start meanwhile, has ended."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def pause(seconds: float, *events: asyncio.Event) -> None:
    """Wait `seconds`, or less when one of `events` (the agent's draining, say) is set meanwhile.

    Rather than `asyncio.wait_for(event.wait(), seconds)`: in Python 3.11 a task cancelled while
    in that wait, as the event is set, can stay stuck cancelling for good (a hub's hook deliverer
    did so when the hub stopped); `asyncio.wait` takes a cancel as it comes."""
    if not events:
        await asyncio.sleep(seconds)
        return
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
