"""The hub's background task that POSTs the hooks' outbox (see `hooks` and `outbox`).

At least once and in order per (job, hook): a delivery is forgotten only after a 2xx answer (or
when given up, logged), and the next one of its pair is due only then. A slow or failing receiver
holds only its own pairs: at most `concurrency` POSTs run at once, each bounded by `timeout`, and
the job store is used on its own thread, never from the API's requests. On close, the POSTs under
way are let finish and recorded, so a restarted hub neither loses nor repeats them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import aiohttp

from runner.gateway import hooks
from runner.gateway.hooks import DEFAULT_SCHEDULE, HookTarget, RetrySchedule
from runner.gateway.jobstore import JobStore
from runner.gateway.outbox import HookEvent
from runner.gateway.statethread import StateThread
from runner.logging_setup import get_logger
from runner.metrics import hub_hook_delivery
from runner.sqlitefile import StoreError
from runner.tasks import pause

log = get_logger("runner.gateway.hooks")

DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT_SECONDS = 10.0
# Looked at again at least this often, whatever the schedule says (a clock step, a lost wakeup).
_LONGEST_IDLE_SECONDS = 60.0
_ERROR_TEXT = 200


class HookDeliverer:
    """Start with `await deliverer.start()` once the job store is open; `await close()` before
    closing it. `wake()` (from any thread) says the outbox has something new."""

    def __init__(self, jobs: StateThread[JobStore], targets: Sequence[HookTarget], *,
                 schedule: RetrySchedule = DEFAULT_SCHEDULE, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self._jobs = jobs
        self._targets = {target.url: target for target in targets}
        self._schedule = schedule
        self._concurrency = concurrency
        self._timeout = timeout
        self._clock = clock
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        """Thread-safe: look at the outbox again soon."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._changed.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        dropped = await self._jobs.run(self._jobs.file.forget_hooks_except, tuple(self._targets))
        if dropped:
            log.warning("hook deliveries dropped: their hook is no longer configured", count=dropped)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Take no more deliveries; let those under way finish (each within its timeout)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sending:
            await asyncio.gather(*self._sending.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            try:
                wait = await self._start_due()
            except StoreError as exc:
                log.error("cannot read the hooks' outbox", error=str(exc))
                wait = _LONGEST_IDLE_SECONDS
            await pause(wait, self._changed)

    async def _start_due(self) -> float:
        """Send what is due and free to go; the seconds until something else may be."""
        store = self._jobs.file
        free = self._concurrency - len(self._sending)
        due, next_at = await self._jobs.run(store.hook_schedule, free, frozenset(self._sending))
        for event in due:
            self._sending[event.pair] = asyncio.create_task(self._deliver(event))
        if next_at is None:
            return _LONGEST_IDLE_SECONDS
        return min(max(next_at - self._clock(), 0.0), _LONGEST_IDLE_SECONDS)

    async def _deliver(self, event: HookEvent) -> None:
        try:
            target = self._targets.get(event.hook)
            failure = ("the hook is no longer configured" if target is None
                       else await self._post(target, event))
            await self._record(event, failure)
        except StoreError as exc:
            # Left as it was: the delivery is made again later (at least once).
            log.error("cannot record a hook delivery", hook=event.hook, job=event.job_id,
                      delivery=event.delivery_id, error=str(exc))
        finally:
            del self._sending[event.pair]
            self._changed.set()

    async def _post(self, target: HookTarget, event: HookEvent) -> str | None:
        """None if the receiver took it (2xx), else why not."""
        assert self._session is not None
        try:
            async with self._session.post(target.url, data=event.body,
                                          headers=hooks.headers(target.secret, event.body, event.delivery_id),
                                          allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return None
                text = (await response.content.read(_ERROR_TEXT)).decode("utf-8", "replace")
                return f"HTTP {response.status}: {text}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _record(self, event: HookEvent, failure: str | None) -> None:
        store = self._jobs.file
        if failure is None:
            await self._jobs.run(store.hook_done, event.seq)
            hub_hook_delivery("delivered")
            log.info("hook delivered", hook=event.hook, job=event.job_id, delivery=event.delivery_id,
                     attempt=event.attempts + 1)
            return
        now = self._clock()
        if self._schedule.gives_up(event.created, now) or event.hook not in self._targets:
            await self._jobs.run(store.hook_done, event.seq)
            hub_hook_delivery("given_up")
            log.error("hook delivery given up", hook=event.hook, job=event.job_id, delivery=event.delivery_id,
                      attempts=event.attempts + 1, error=failure)
            return
        delay = self._schedule.delay(event.attempts + 1)
        await self._jobs.run(store.hook_retry_at, event.seq, now + delay)
        hub_hook_delivery("retrying")
        log.warning("hook delivery failed; retrying", hook=event.hook, job=event.job_id,
                    delivery=event.delivery_id, attempt=event.attempts + 1, retry_in=delay, error=failure)
