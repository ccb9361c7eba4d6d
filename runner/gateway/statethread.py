"""A state file used from a thread of its own, so that a synced commit (or a 25 MB body) never
stalls the event loop that answers webhooks, submitters and waiting agents."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from runner.sqlitefile import StateFile, StoreError

S = TypeVar("S", bound=StateFile)
T = TypeVar("T")


class StateThread(Generic[S]):
    """One state file and the one thread that uses its connection."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._file: S | None = None

    async def open(self, opener: Callable[[], S]) -> S:
        self._file = await self.run(opener)
        return self._file

    @property
    def file(self) -> S:
        assert self._file is not None, "the state file is not open"
        return self._file

    @property
    def is_open(self) -> bool:
        return self._file is not None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def take(self, fn: Callable[[], T], give_back: Callable[[T], Awaitable[None]]) -> T:
        """`fn()` on the thread; if the caller is cancelled meanwhile (an agent hung up while a
        lease was being taken), what it took is handed to `give_back` rather than left with nobody."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(self._give_back, give_back))
            raise

    def _give_back(self, give_back: Callable[[T], Awaitable[None]], future: asyncio.Future[T]) -> None:
        if future.cancelled() or future.exception() is not None or self._file is None:
            return

        async def hand_back() -> None:
            with contextlib.suppress(StoreError, RuntimeError):
                await give_back(future.result())
        asyncio.get_running_loop().create_task(hand_back())

    async def close(self) -> None:
        if self._file is not None:
            await self.run(self._file.close)
            self._file = None
        self._pool.shutdown(wait=True)
