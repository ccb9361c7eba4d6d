"""API jobs in: the long poll that leases the hub's jobs for this agent's cluster.

One lease is asked for at a time, and only while fewer than `slots` jobs taken this way are in
flight, so an agent never holds more than it would run soon: the rest stay at the hub for the
other agents of the cluster. A lease is the agent's for `lease_seconds` until it publishes the
job's first state (`source`), which makes the job its own for good. A drain ends the long poll at
once (the hub gives back a lease whose request was abandoned); a hub out of reach is asked again
after a growing pause, a refused agent token after a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from runner.gateway.jobs_protocol import JobLease
from runner.logging_setup import get_logger
from runner.sources.api.client import HubClient
from runner.sources.github.gateway_client import GatewayAuthError, GatewayError, retry_delay
from runner.tasks import TaskSet, pause

log = get_logger("runner.sources.api")

AUTH_RETRY_SECONDS = 60.0


class Intake:
    def __init__(self, client: HubClient, *, cluster: str, draining: asyncio.Event, background: TaskSet,
                 slots: int) -> None:
        if slots < 1:
            raise ValueError("an intake needs at least one slot")
        self.client = client
        self.cluster = cluster
        self.draining = draining
        self.background = background
        self._slots = asyncio.Semaphore(slots)

    async def serve(self, take: Callable[[JobLease], Awaitable[None]]) -> None:
        """Lease jobs and `take` each in a task of its own (in `background`), until the drain."""
        failures = 0
        while not self.draining.is_set():
            if not await self._free_slot():
                return
            try:
                lease = await self._lease()
            except GatewayError as exc:
                self._slots.release()
                failures += 1
                await pause(self._backoff(exc, failures), self.draining)
                continue
            failures = 0
            if lease is None:
                self._slots.release()
                continue
            log.info("API job leased", job=lease.id, attempt=lease.attempt, cluster=lease.cluster,
                     repository=lease.repository)
            task = self.background.spawn(take(lease))
            task.add_done_callback(lambda _: self._slots.release())

    async def _free_slot(self) -> bool:
        """Wait for a free slot; False when the drain came first."""
        return await _first(self._slots.acquire(), self.draining, on_loss=self._slots.release)

    async def _lease(self) -> JobLease | None:
        """One long poll; None when nothing came, or when the drain cut it short."""
        leased: list[JobLease | None] = []

        async def ask() -> None:
            leased.append(await self.client.lease(self.cluster))

        if not await _first(ask(), self.draining):
            return None
        return leased[0]

    def _backoff(self, exc: GatewayError, failures: int) -> float:
        if isinstance(exc, GatewayAuthError):
            # Only a new token (or the hub's tokens file fixed) helps: say so loudly, now and then.
            log.error("the hub refuses this agent's token; asking again in a minute", error=str(exc))
            return AUTH_RETRY_SECONDS
        delay = retry_delay(failures, initial=self.client.retry_initial, retry_after=exc.retry_after)
        log.warning("the hub is not reachable; asking again", error=str(exc), failures=failures,
                    retry_in=round(delay, 2))
        return delay


async def _first(work: Awaitable[object], event: asyncio.Event,
                 on_loss: Callable[[], None] | None = None) -> bool:
    """Run `work` until it ends (True; its exception raised) or `event` is set first (False: the work
    is cancelled, and `on_loss` undoes it if it had ended all the same)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, GatewayError):
        await task
    if on_loss is not None and task.done() and not task.cancelled() and task.exception() is None:
        on_loss()
    return False
