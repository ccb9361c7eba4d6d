"""The GitHub source's work in flight (every trigger's jobs and, in gateway mode, every delivery),
so the source can wait for all of it or stop all of it, and the pauses a drain cuts short."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any


class Background:
    """Tasks started by the source and not finished yet."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

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


async def pause(draining: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less when the agent starts draining meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(draining.wait(), seconds)
