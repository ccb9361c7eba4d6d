"""The gateway's HTTP server: GitHub's webhooks in, agents' long polls and leases out.

I/O only: what to do with a webhook is decided in `webhook`, who an agent is in `tokens`, and the
state lives in `queue`. The queue's SQLite connection lives on one thread of its own, so a synced
commit (or a 25 MB body) never stalls the event loop that answers GitHub and the waiting agents.
A webhook is answered only after it is committed, and no GitHub API call is ever made here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from runner.gateway import protocol
from runner.gateway.queue import DeliveryQueue, Enqueued, LeasedDelivery
from runner.gateway.tokens import AgentTokens
from runner.gateway.webhook import (
    MAX_BODY_BYTES,
    Accepted,
    Ignored,
    Refused,
    check_webhook,
    refuse_before_reading,
    too_large,
)
from runner.logging_setup import get_logger
from runner.sqlitefile import StoreError

log = get_logger("runner.gateway")

T = TypeVar("T")

# Signature and JSON checks of larger bodies run off the event loop (25 MB take ~0.1 s).
_OFF_LOOP_BYTES = 256 * 1024
_PRUNE_INTERVAL_SECONDS = 3600.0
_SHUTDOWN_TIMEOUT_SECONDS = 10.0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class GatewayServer:
    """Start with `await server.start(host, port)`, stop with `await server.close()`."""

    def __init__(self, *, state_dir: Path, webhook_secret: str, tokens: AgentTokens,
                 clock: Callable[[], float] = time.time) -> None:
        self._state_dir = state_dir
        self._secret = webhook_secret.encode("utf-8")
        self._tokens = tokens
        self._clock = clock
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gateway-queue")
        self._queue: DeliveryQueue | None = None
        self._runner: web.AppRunner | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._stopping = False
        self._polling: collections.Counter[str] = collections.Counter()   # agents in a long poll now
        self.addresses: list[Any] = []

    # --- life cycle ---

    async def start(self, host: str, port: int) -> None:
        """Open the queue, then listen; raises StoreError or OSError (for example the port is taken)."""
        self._queue = await self._db(DeliveryQueue.open, self._state_dir, clock=self._clock)
        counts = await self._db(self._queue.counts)
        log.info("gateway queue opened", path=str(self._queue.path), waiting=counts.waiting,
                 leased=counts.leased, acknowledged=counts.acknowledged)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(protocol.WEBHOOK_PATH, self._webhook)
        app.router.add_get(protocol.HEALTH_PATH, self._health)
        app.router.add_get(protocol.STATUS_PATH, self._status)
        app.router.add_post(protocol.LEASES_PATH, self._lease)
        app.router.add_post(
            f"{protocol.LEASES_PATH}/{{lease_id:{protocol.LEASE_ID_PATTERN}}}/{{action:extend|ack|release}}",
            self._lease_action)
        # An agent that hangs up ends its long poll at once; its request must not lease anything.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=_SHUTDOWN_TIMEOUT_SECONDS)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.addresses = list(self._runner.addresses)
        self._pruner = asyncio.create_task(self._prune_periodically())

    @property
    def port(self) -> int:
        return int(self.addresses[0][1])

    async def close(self) -> None:
        """Stop listening, end the long polls (503), let webhooks being stored finish, close the queue."""
        self._stopping = True
        self._notify()
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._queue is not None:
            await self._db(self._queue.close)
            self._queue = None
        self._db_thread.shutdown(wait=True)

    def replace_tokens(self, tokens: AgentTokens) -> None:
        """New agent tokens for the requests from now on (after the file was edited)."""
        self._tokens = tokens

    # --- helpers ---

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, functools.partial(fn, *args, **kwargs))

    @property
    def _q(self) -> DeliveryQueue:
        assert self._queue is not None, "the gateway is not started"
        return self._queue

    def _notify(self) -> None:
        """Wake every waiting long poll: the queue changed (or the gateway stops)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _agent(self, request: web.Request) -> str | None:
        agent = self._tokens.agent_for_header(request.headers.get("Authorization"))
        if agent is None:
            log.warning("agent request refused: no valid bearer token", path=request.path,
                        remote=request.remote)
        return agent

    @staticmethod
    def _unauthorized() -> web.Response:
        return _error(401, "a valid agent token is required (Authorization: Bearer <token>)",
                      {"WWW-Authenticate": 'Bearer realm="hpc-runner gateway"'})

    async def _prune_periodically(self) -> None:
        while True:
            try:
                pruned = await self._db(self._q.prune_acknowledged)
                if pruned:
                    log.info("forgot old acknowledged deliveries", count=pruned)
            except StoreError as exc:
                log.error("cannot prune the gateway queue", error=str(exc))
            await asyncio.sleep(_PRUNE_INTERVAL_SECONDS)

    # --- GitHub ---

    async def _webhook(self, request: web.Request) -> web.Response:
        # Whatever an unauthenticated sender put there reaches the log only if it looks like an id.
        claimed = request.headers.get(protocol.DELIVERY_HEADER, "")
        if not protocol.DELIVERY_ID_PATTERN.fullmatch(claimed):
            claimed = "(none or malformed)"
        early = refuse_before_reading(request.headers, request.content_length)
        if early is not None:
            return self._refuse(request, early, claimed)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(request, too_large(), claimed)
        if len(body) > _OFF_LOOP_BYTES:
            verdict = await asyncio.to_thread(check_webhook, request.headers, body, self._secret)
        else:
            verdict = check_webhook(request.headers, body, self._secret)
        if isinstance(verdict, Refused):
            return self._refuse(request, verdict, claimed)
        if isinstance(verdict, Ignored):
            log.info("webhook ignored, not queued", github_event=verdict.event, delivery=verdict.delivery_id,
                     reason=verdict.reason)
            return web.json_response({"result": "ignored", "reason": verdict.reason}, status=200)
        return await self._store(verdict)

    async def _store(self, accepted: Accepted) -> web.Response:
        try:
            # Shielded: once stored, the waiting agents must hear of it even if GitHub hung up.
            enqueued = await asyncio.shield(self._enqueue(accepted))
        except StoreError as exc:
            # Not 2xx: GitHub then shows the delivery as failed, and it can be redelivered.
            log.error("webhook not stored", github_event=accepted.event, delivery=accepted.delivery_id,
                      error=str(exc))
            return _error(503, "the delivery could not be stored")
        if not enqueued.new:
            log.info("webhook redelivered, already queued once", github_event=accepted.event,
                     delivery=accepted.delivery_id)
            return web.json_response({"result": "duplicate", "delivery": accepted.delivery_id}, status=200)
        log.info("webhook queued", github_event=accepted.event, action=accepted.action,
                 delivery=accepted.delivery_id, bytes=len(accepted.body), seq=enqueued.seq)
        return web.json_response({"result": "queued", "delivery": accepted.delivery_id}, status=202)

    async def _enqueue(self, accepted: Accepted) -> Enqueued:
        enqueued = await self._db(self._q.enqueue, event=accepted.event,
                                  delivery_id=accepted.delivery_id, body=accepted.body)
        if enqueued.new:
            self._notify()
        return enqueued

    @staticmethod
    def _refuse(request: web.Request, refused: Refused, claimed_delivery: str) -> web.Response:
        log.warning("webhook refused, not queued", status=refused.status, reason=refused.reason,
                    claimed_delivery=claimed_delivery, remote=request.remote)
        return _error(refused.status, refused.reason)

    # --- agents ---

    async def _health(self, request: web.Request) -> web.Response:
        if self._stopping:
            return _error(503, "the gateway is stopping")
        return web.json_response({"status": "ok"})

    async def _status(self, request: web.Request) -> web.Response:
        if self._agent(request) is None:
            return self._unauthorized()
        counts = await self._db(self._q.counts)
        return web.json_response({"waiting": counts.waiting, "leased": counts.leased,
                                  "acknowledged": counts.acknowledged,
                                  "agents_polling": sorted(+self._polling)})

    async def _lease(self, request: web.Request) -> web.Response:
        agent = self._agent(request)
        if agent is None:
            return self._unauthorized()
        try:
            wait = protocol.parse_seconds(request.query.get("wait"), name="wait",
                                          default=protocol.DEFAULT_WAIT_SECONDS, minimum=0,
                                          maximum=protocol.MAX_WAIT_SECONDS)
            seconds = _lease_seconds(request)
        except ValueError as exc:
            return _error(400, str(exc))
        self._polling[agent] += 1
        try:
            return await self._long_poll(agent, wait, seconds)
        finally:
            self._polling[agent] -= 1

    async def _long_poll(self, agent: str, wait: int, seconds: int) -> web.Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._stopping:
            changed = self._changed   # taken before looking, so no wake-up is missed
            leased, next_expiry = await self._take(agent, seconds)
            if leased is not None:
                return self._leased_response(leased, seconds)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return web.Response(status=204)
            if next_expiry is not None:
                # A lease running out makes a delivery available without any request.
                remaining = min(remaining, max(next_expiry - self._clock(), 0.0) + 0.01)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return _error(503, "the gateway is stopping", {"Retry-After": "5"})

    async def _take(self, agent: str, seconds: int) -> tuple[LeasedDelivery | None, float | None]:
        def take() -> tuple[LeasedDelivery | None, float | None]:
            leased = self._q.lease(agent, seconds)
            return leased, (None if leased is not None else self._q.next_expiry())

        future = asyncio.get_running_loop().run_in_executor(self._db_thread, take)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The agent hung up while the lease was being taken: give the delivery straight back
            # rather than leave it with nobody until the lease runs out.
            future.add_done_callback(self._release_orphan)
            raise

    def _release_orphan(self, future: asyncio.Future[tuple[LeasedDelivery | None, float | None]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        leased = future.result()[0]
        if leased is None or self._queue is None:
            return

        async def release() -> None:
            with contextlib.suppress(StoreError, RuntimeError):
                await self._db(self._q.release, leased.lease_id, leased.lease_agent)
                self._notify()
        asyncio.get_running_loop().create_task(release())

    def _leased_response(self, leased: LeasedDelivery, seconds: int) -> web.Response:
        if leased.previous_agent is not None:
            log.warning("lease ran out; delivery handed out again", delivery=leased.delivery_id,
                        previous_agent=leased.previous_agent, agent=leased.lease_agent,
                        attempt=leased.attempt)
        else:
            log.info("delivery leased", delivery=leased.delivery_id, github_event=leased.event,
                     agent=leased.lease_agent, attempt=leased.attempt, seconds=seconds)
        headers = protocol.lease_headers(
            event=leased.event, delivery_id=leased.delivery_id, lease_id=leased.lease_id,
            lease_seconds=seconds, lease_expires_at=leased.lease_expires_at,
            received_at=leased.received_at, attempt=leased.attempt)
        return web.Response(status=200, body=leased.body, content_type="application/json", headers=headers)

    async def _lease_action(self, request: web.Request) -> web.Response:
        agent = self._agent(request)
        if agent is None:
            return self._unauthorized()
        lease_id, action = request.match_info["lease_id"], request.match_info["action"]
        if action == "extend":
            try:
                seconds = _lease_seconds(request)
            except ValueError as exc:
                return _error(400, str(exc))
            expires_at = await self._db(self._q.extend, lease_id, agent, seconds)
            if expires_at is None:
                return self._lease_lost(agent, action)
            return web.json_response({"lease_id": lease_id, "seconds": seconds,
                                      "expires_at": protocol.format_time(expires_at)})
        if action == "ack":
            delivery_id = await self._db(self._q.acknowledge, lease_id, agent)
            if delivery_id is None:
                return self._lease_lost(agent, action)
            log.info("delivery acknowledged", delivery=delivery_id, agent=agent)
            return web.json_response({"result": "acknowledged", "delivery": delivery_id})
        delivery_id = await self._db(self._q.release, lease_id, agent)
        if delivery_id is None:
            return self._lease_lost(agent, action)
        self._notify()
        log.info("delivery released back to the queue", delivery=delivery_id, agent=agent)
        return web.json_response({"result": "released", "delivery": delivery_id})

    @staticmethod
    def _lease_lost(agent: str, action: str) -> web.Response:
        log.warning("lease not held", agent=agent, action=action)
        return _error(409, "this agent holds no such lease: it ran out and the delivery was handed to "
                           "another agent, or it was released or acknowledged")


def _lease_seconds(request: web.Request) -> int:
    """The lease length an agent asks for (`?seconds=`), within the gateway's bounds."""
    return protocol.parse_seconds(request.query.get("seconds"), name="seconds",
                                  default=protocol.DEFAULT_LEASE_SECONDS, minimum=protocol.MIN_LEASE_SECONDS,
                                  maximum=protocol.MAX_LEASE_SECONDS)
