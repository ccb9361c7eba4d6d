"""The hub's HTTP server: GitHub's webhooks in, agents' long polls and leases out, and the jobs API.

I/O only: what to do with a webhook is decided in `webhook`, who an agent is in `tokens`, and the
state lives in `queue` (webhook deliveries) and `jobstore` (API jobs), each used from a thread of
its own (`statethread`). The routes of API jobs are in `jobs_api` (submitters) and
`agent_jobs_api` (agents). A webhook is answered only after it is committed, and no GitHub API
call is ever made here. Webhooks are taken only with a webhook secret, and the jobs API is served
only with a public URL and a way to verify tokens (`JobsApiSettings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from runner.gateway import protocol
from runner.gateway.agent_jobs_api import AgentJobsApi
from runner.gateway.answers import agent_unauthorized, error, stopping
from runner.gateway.board import HubBoard
from runner.gateway.callers import Authenticate
from runner.gateway.hook_delivery import HookDeliverer
from runner.gateway.hooks import DEFAULT_SCHEDULE, HookTarget, RetrySchedule, outbox_entries
from runner.gateway.jobs_api import JobsApi
from runner.gateway.jobstore import JobStore, StoredJob
from runner.gateway.outputs import OutputFiles
from runner.gateway.polling import LongPolls, Stopping, Wakeups
from runner.gateway.queue import DeliveryQueue, Enqueued, LeasedDelivery
from runner.gateway.statethread import StateThread
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
from runner.metrics import count_hub_requests, hub_leased
from runner.sqlitefile import StoreError
from runner.web.board import Viewer
from runner.web.login import Login
from runner.web.pages import Dashboard
from runner.web.security import add_security_headers
from runner.web.sessions import setup_sessions

log = get_logger("runner.gateway")

DELIVERIES_CHANGED = "deliveries"
# Signature and JSON checks of larger bodies run off the event loop (25 MB take ~0.1 s).
_OFF_LOOP_BYTES = 256 * 1024
_PRUNE_INTERVAL_SECONDS = 3600.0
_SHUTDOWN_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class JobsApiSettings:
    """What serving the jobs API takes: the hub's public URL (for jobs' `url`) and a way to verify
    a token into a caller; and for its dashboard, the key of the session cookies and the login at
    the site's provider (None: nobody can log in, and the pages say so)."""

    public_url: str
    authenticate: Authenticate
    session_key: bytes | None = None
    login: Login | None = None


async def _nobody(request: web.Request) -> Viewer | None:
    return None


class GatewayServer:
    """Start with `await server.start(host, port)`, stop with `await server.close()`."""

    def __init__(self, *, state_dir: Path, webhook_secret: str | None, tokens: AgentTokens,
                 jobs_api: JobsApiSettings | None = None, hooks: Sequence[HookTarget] = (),
                 hook_schedule: RetrySchedule = DEFAULT_SCHEDULE,
                 clock: Callable[[], float] = time.time) -> None:
        if hooks and jobs_api is None:
            raise ValueError("hooks are sent only by a hub serving the jobs API (their body is a job's view)")
        self._state_dir = state_dir
        self._secret = None if webhook_secret is None else webhook_secret.encode("utf-8")
        self._tokens = tokens
        self._jobs_api = jobs_api
        self._clock = clock
        self._queue_thread: StateThread[DeliveryQueue] = StateThread("gateway-queue")
        self._jobs_thread: StateThread[JobStore] = StateThread("hub-jobs")
        self._hooks = tuple(target.hook for target in hooks)
        self._deliverer = HookDeliverer(self._jobs_thread, hooks, schedule=hook_schedule, clock=clock) \
            if hooks else None
        self._runner: web.AppRunner | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._wakeups = Wakeups()
        self._polls = LongPolls(self._wakeups, clock)
        self._outputs = OutputFiles(state_dir)
        self.addresses: list[Any] = []

    # --- life cycle ---

    async def start(self, host: str, port: int) -> None:
        """Open the queue and the job store, then listen; raises StoreError or OSError (for example
        the port is taken)."""
        queue = await self._queue_thread.open(lambda: DeliveryQueue.open(self._state_dir, clock=self._clock))
        counts = await self._queue_thread.run(queue.counts)
        log.info("gateway queue opened", path=str(queue.path), waiting=counts.waiting,
                 leased=counts.leased, acknowledged=counts.acknowledged)
        announce = self._announce if self._deliverer is not None else None
        jobs = await self._jobs_thread.open(lambda: JobStore.open(self._state_dir, clock=self._clock,
                                                                  announce=announce))
        log.info("hub job store opened", path=str(jobs.path))
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[count_hub_requests])
        if self._secret is not None:
            app.router.add_post(protocol.WEBHOOK_PATH, self._webhook)
        app.router.add_get(protocol.HEALTH_PATH, self._health)
        app.router.add_get(protocol.STATUS_PATH, self._status)
        app.router.add_post(protocol.LEASES_PATH, self._lease)
        app.router.add_post(
            f"{protocol.LEASES_PATH}/{{lease_id:{protocol.LEASE_ID_PATTERN}}}/{{action:extend|ack|release}}",
            self._lease_action)
        AgentJobsApi(jobs=self._jobs_thread, wakeups=self._wakeups, polls=self._polls, agent_of=self._agent,
                     public_url=None if self._jobs_api is None else self._jobs_api.public_url,
                     outputs=self._outputs).add_routes(app)
        if self._jobs_api is not None:
            JobsApi(jobs=self._jobs_thread, wakeups=self._wakeups, authenticate=self._jobs_api.authenticate,
                    public_url=self._jobs_api.public_url, outputs=self._outputs).add_routes(app)
            self._add_dashboard(app, self._jobs_api)
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
        if self._deliverer is not None:
            await self._deliverer.start()

    def _add_dashboard(self, app: web.Application, settings: JobsApiSettings) -> None:
        """The dashboard's pages at the public URL's root, for people logged in at `[login]`."""
        if settings.session_key is None:
            return
        login = settings.login
        setup_sessions(app, settings.session_key,
                       secure=settings.public_url.startswith("https://"))
        add_security_headers(app)
        host = urllib.parse.urlsplit(settings.public_url).hostname or "hub"
        board = HubBoard(self._jobs_thread, self._wakeups, self._outputs)
        Dashboard(board, login.viewer if login is not None else _nobody,
                  site_name=host, login_path="/login" if login is not None else None,
                  logout=login is not None,
                  nobody="log in to see jobs" if login is not None else
                  "nobody can log in to this hub's dashboard: its config needs a [login] section "
                  "(the site's OpenID Connect provider)").add_routes(app)
        if login is not None:
            login.add_routes(app)

    @property
    def port(self) -> int:
        return int(self.addresses[0][1])

    async def close(self) -> None:
        """Stop listening, end the long polls (503) and log follows, let webhooks and jobs being
        stored finish, close the state files."""
        self._wakeups.stop()
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._deliverer is not None:
            await self._deliverer.close()
        await self._queue_thread.close()
        await self._jobs_thread.close()

    def replace_tokens(self, tokens: AgentTokens) -> None:
        """New agent tokens for the requests from now on (after the file was edited)."""
        self._tokens = tokens

    # --- helpers ---

    @property
    def _q(self) -> DeliveryQueue:
        return self._queue_thread.file

    def _notify(self) -> None:
        """Wake the agents waiting for a delivery: the queue changed."""
        self._wakeups.notify(DELIVERIES_CHANGED)

    def _announce(self, job: StoredJob) -> list[tuple[str, bytes]]:
        """On the job store's thread, in the transaction of a job's state change: its hook deliveries."""
        assert self._deliverer is not None and self._jobs_api is not None
        entries = outbox_entries(self._hooks, job.state, job.view(self._jobs_api.public_url))
        if entries:
            self._deliverer.wake()
        return entries

    def _agent(self, request: web.Request) -> str | None:
        agent = self._tokens.agent_for_header(request.headers.get("Authorization"))
        if agent is None:
            log.warning("agent request refused: no valid bearer token", path=request.path,
                        remote=request.remote)
        return agent

    async def _prune_periodically(self) -> None:
        while True:
            try:
                pruned = await self._queue_thread.run(self._q.prune_acknowledged)
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
        assert self._secret is not None, "the webhook route is only served with a secret"
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
            return error(503, "the delivery could not be stored")
        if not enqueued.new:
            log.info("webhook redelivered, already queued once", github_event=accepted.event,
                     delivery=accepted.delivery_id)
            return web.json_response({"result": "duplicate", "delivery": accepted.delivery_id}, status=200)
        log.info("webhook queued", github_event=accepted.event, action=accepted.action,
                 delivery=accepted.delivery_id, bytes=len(accepted.body), seq=enqueued.seq)
        return web.json_response({"result": "queued", "delivery": accepted.delivery_id}, status=202)

    async def _enqueue(self, accepted: Accepted) -> Enqueued:
        enqueued = await self._queue_thread.run(self._q.enqueue, event=accepted.event,
                                  delivery_id=accepted.delivery_id, body=accepted.body)
        if enqueued.new:
            self._notify()
        return enqueued

    @staticmethod
    def _refuse(request: web.Request, refused: Refused, claimed_delivery: str) -> web.Response:
        log.warning("webhook refused, not queued", status=refused.status, reason=refused.reason,
                    claimed_delivery=claimed_delivery, remote=request.remote)
        return error(refused.status, refused.reason)

    # --- agents ---

    async def _health(self, request: web.Request) -> web.Response:
        if self._wakeups.stopping:
            return error(503, "the gateway is stopping")
        return web.json_response({"status": "ok"})

    async def _status(self, request: web.Request) -> web.Response:
        if self._agent(request) is None:
            return agent_unauthorized()
        counts = await self._queue_thread.run(self._q.counts)
        return web.json_response({"waiting": counts.waiting, "leased": counts.leased,
                                  "acknowledged": counts.acknowledged,
                                  "agents_polling": self._polls.agents})

    async def _lease(self, request: web.Request) -> web.Response:
        agent = self._agent(request)
        if agent is None:
            return agent_unauthorized()
        try:
            wait = protocol.parse_wait(request.query.get("wait"))
            seconds = protocol.parse_lease_seconds(request.query.get("seconds"))
        except ValueError as exc:
            return error(400, str(exc))
        queue = self._q

        def take() -> tuple[LeasedDelivery | None, float | None]:
            leased = queue.lease(agent, seconds)
            # A lease running out makes a delivery available without any request.
            return leased, (None if leased is not None else queue.next_expiry())

        async def give_back(taken: tuple[LeasedDelivery | None, float | None]) -> None:
            # The agent hung up while the lease was being taken: give the delivery straight back
            # rather than leave it with nobody until the lease runs out.
            leased = taken[0]
            if leased is not None:
                await self._queue_thread.run(queue.release, leased.lease_id, leased.lease_agent)
                self._notify()

        try:
            leased = await self._polls.wait(agent, DELIVERIES_CHANGED, wait,
                                            lambda: self._queue_thread.take(take, give_back))
        except Stopping:
            return stopping()
        if leased is None:
            return web.Response(status=204)
        hub_leased("webhook")
        return self._leased_response(leased, seconds)

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
            return agent_unauthorized()
        lease_id, action = request.match_info["lease_id"], request.match_info["action"]
        if action == "extend":
            try:
                seconds = protocol.parse_lease_seconds(request.query.get("seconds"))
            except ValueError as exc:
                return error(400, str(exc))
            expires_at = await self._queue_thread.run(self._q.extend, lease_id, agent, seconds)
            if expires_at is None:
                return self._lease_lost(agent, action)
            return web.json_response({"lease_id": lease_id, "seconds": seconds,
                                      "expires_at": protocol.format_time(expires_at)})
        if action == "ack":
            delivery_id = await self._queue_thread.run(self._q.acknowledge, lease_id, agent)
            if delivery_id is None:
                return self._lease_lost(agent, action)
            log.info("delivery acknowledged", delivery=delivery_id, agent=agent)
            return web.json_response({"result": "acknowledged", "delivery": delivery_id})
        delivery_id = await self._queue_thread.run(self._q.release, lease_id, agent)
        if delivery_id is None:
            return self._lease_lost(agent, action)
        self._notify()
        log.info("delivery released back to the queue", delivery=delivery_id, agent=agent)
        return web.json_response({"result": "released", "delivery": delivery_id})

    @staticmethod
    def _lease_lost(agent: str, action: str) -> web.Response:
        log.warning("lease not held", agent=agent, action=action)
        return error(409, "this agent holds no such lease: it ran out and the delivery was handed to "
                           "another agent, or it was released or acknowledged")

