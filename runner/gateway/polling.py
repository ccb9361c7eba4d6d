"""Waiting for a change: the events long polls and log followers wait on, and the long poll itself.

A waiter takes the event for what it waits on before it looks, then waits on that event: a change
made between its look and its wait has already set that very event, so no wake-up is missed. A
notification wakes every waiter of its key and retires the event; the next waiter takes a new one.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import TypeVar

from runner.tasks import pause

T = TypeVar("T")

# Every long poll and follower wakes up this often even without a change (a safety net).
_LONGEST_SLEEP_SECONDS = 60.0


class Stopping(Exception):
    """The hub is stopping: a long poll ends without an answer (503)."""


class Wakeups:
    """Events keyed by what changed ("deliveries", "jobs", "job:ID")."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self.stopping = False

    def event(self, key: str) -> asyncio.Event:
        """The event the next change of `key` sets; take it before looking."""
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
            if self.stopping:
                event.set()
        return event

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def stop(self) -> None:
        """Wake every waiter for good: the hub is stopping."""
        self.stopping = True
        for event in self._events.values():
            event.set()
        self._events.clear()


async def wait_for_change(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` passed, whichever comes first."""
    await pause(min(max(seconds, 0.0), _LONGEST_SLEEP_SECONDS), event)


async def long_poll(wakeups: Wakeups, key: str, wait: float,
                    take: Callable[[], Awaitable[tuple[T | None, float | None]]],
                    clock: Callable[[], float]) -> T | None:
    """What `take` finds within `wait` seconds, or None; Stopping when the hub stops meanwhile.

    `take` answers what it found, or None and the wall-clock time at which something may become
    available without any notification (a lease running out), or None.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not wakeups.stopping:
        changed = wakeups.event(key)
        found, next_expiry = await take()
        if found is not None:
            return found
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        if next_expiry is not None:
            remaining = min(remaining, max(next_expiry - clock(), 0.0) + 0.01)
        await wait_for_change(changed, remaining)
    raise Stopping


class LongPolls:
    """The agents' long polls: each waits with `long_poll`, counted while it waits (for
    `/api/v1/status`, which names the agents polling now)."""

    def __init__(self, wakeups: Wakeups, clock: Callable[[], float]) -> None:
        self._wakeups = wakeups
        self._clock = clock
        self._agents: collections.Counter[str] = collections.Counter()

    @property
    def agents(self) -> list[str]:
        return sorted(+self._agents)

    async def wait(self, agent: str, key: str, wait: float,
                   take: Callable[[], Awaitable[tuple[T | None, float | None]]]) -> T | None:
        """`long_poll` for `agent`: what `take` found, None after `wait` seconds, Stopping."""
        self._agents[agent] += 1
        try:
            return await long_poll(self._wakeups, key, wait, take, self._clock)
        finally:
            self._agents[agent] -= 1
