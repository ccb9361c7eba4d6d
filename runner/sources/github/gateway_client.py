"""The agent's side of the webhook gateway: long-poll it for deliveries, keep their leases, acknowledge.

The gateway checked each webhook's HMAC, so a delivery came from someone holding the webhook
secret; that is all. The agent trusts the gateway for nothing (see SECURITY.md): what a payload
says (pull request, head SHA, commenter, permission) is a hint of where to look, and must be
re-read through the GitHub API with the app's own credentials before anything runs.

    async with GatewayClient.from_config(config.github) as gateway:
        async for delivery in gateway.deliveries():
            async with gateway.keep_leased(delivery) as kept:   # extends the lease in the background
                ...                                             # confirm through the API, run the job
                if kept.lost.is_set(): ...                      # another agent may now have it
            await gateway.acknowledge(delivery)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from runner.config import FILE_DESCRIPTIONS, GithubConfig
from runner.errors import InfrastructureError, InputError
from runner.gateway import protocol
from runner.httpsession import SessionHolder
from runner.logging_setup import get_logger
from runner.secrets import read_secret_file

log = get_logger("runner.sources.github.gateway")

# A request that is not a long poll gets this long; a long poll gets its wait on top.
REQUEST_TIMEOUT_SECONDS = 30.0
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
# Extend three times per lease period: two extensions may fail before the lease runs out.
EXTENSIONS_PER_PERIOD = 3


class GatewayError(InfrastructureError):
    """The gateway could not be reached, or answered something unexpected; worth retrying."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GatewayAuthError(GatewayError):
    """The gateway does not accept this agent's token: retrying will not help."""


class LeaseLost(GatewayError):
    """The lease is no longer this agent's: it ran out and the delivery went to another agent,
    or it was acknowledged or released."""


@dataclass
class Lease:
    """This agent's hold on one delivery, until `deadline` (this host's monotonic clock)."""

    id: str
    seconds: int
    deadline: float

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery handed out by the gateway, with the lease that holds it.

    `payload` is the webhook's JSON body as received: UNVERIFIED content. Use it to find what
    to re-read through the GitHub API, never as the truth about a repository, a commit or a person.
    """

    event: str                  # X-GitHub-Event, e.g. "pull_request"
    delivery_id: str            # X-GitHub-Delivery; the same on a redelivery by GitHub
    payload: dict[str, Any] = field(repr=False)
    received_at: float          # when the gateway received it (epoch seconds, the gateway's clock)
    attempt: int                # 1 unless an earlier lease of it ran out or was released
    lease: Lease


def retry_delay(failures: int, *, initial: float = RETRY_INITIAL_SECONDS, maximum: float = RETRY_MAX_SECONDS,
                retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after `failures` consecutive failures: jittered exponential backoff,
    never shorter than the gateway's Retry-After."""
    base = min(maximum, initial * 2.0 ** max(failures - 1, 0))
    delay = base * (0.5 + rng() / 2)   # jitter, so agents restarted together do not poll in step
    return max(delay, retry_after or 0.0)


def delivery_from_answer(headers: Any, body: bytes, *, sent_at: float) -> Delivery:
    """The delivery in a `200` lease answer; ValueError naming what is wrong.

    The lease's deadline counts from when the request was sent, so the time the answer took
    on the way back is never counted as lease time the agent still has.
    """
    meta = protocol.parse_lease_headers(headers)
    try:
        payload = json.loads(body)
    except ValueError:
        raise ValueError(f"delivery {meta.delivery_id}: the body is not JSON") from None
    if not isinstance(payload, dict):
        raise ValueError(f"delivery {meta.delivery_id}: the body is not a JSON object")
    lease = Lease(meta.lease_id, meta.lease_seconds, sent_at + meta.lease_seconds)
    return Delivery(meta.event, meta.delivery_id, payload, meta.received_at, meta.attempt, lease)


class LeaseKeeper:
    """Extends one delivery's lease in the background; `lost` is set when it could not."""

    def __init__(self, client: GatewayClient, delivery: Delivery) -> None:
        self._client = client
        self.delivery = delivery
        self.lost = asyncio.Event()
        self.extensions = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.delivery.delivery_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        lease = self.delivery.lease
        interval = max(lease.seconds / EXTENSIONS_PER_PERIOD, 0.2)
        wait = interval
        while True:
            await asyncio.sleep(wait)
            try:
                await self._client.extend(self.delivery)
            except LeaseLost as exc:
                self._lose(str(exc))
                return
            except GatewayError as exc:
                if lease.remaining() <= 0:
                    self._lose(f"the lease ran out while the gateway could not be reached: {exc}")
                    return
                log.warning("lease not extended yet; retrying", delivery=self.delivery.delivery_id,
                            error=str(exc), remaining=round(lease.remaining(), 1))
                wait = min(interval, max(lease.remaining() / 2, 0.1))
                continue
            self.extensions += 1
            wait = interval

    def _lose(self, why: str) -> None:
        log.error("lease lost: another agent may get this delivery", delivery=self.delivery.delivery_id,
                  github_event=self.delivery.event, reason=why)
        self.lost.set()


class GatewayClient(SessionHolder):
    """Talks to one gateway with one agent token. Use as an async context manager."""

    def __init__(self, url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                 wait_seconds: int = protocol.DEFAULT_WAIT_SECONDS,
                 lease_seconds: int = protocol.DEFAULT_LEASE_SECONDS,
                 retry_initial: float = RETRY_INITIAL_SECONDS, retry_max: float = RETRY_MAX_SECONDS) -> None:
        if not 0 <= wait_seconds <= protocol.MAX_WAIT_SECONDS:
            raise ValueError(f"wait_seconds must be between 0 and {protocol.MAX_WAIT_SECONDS}")
        if not protocol.MIN_LEASE_SECONDS <= lease_seconds <= protocol.MAX_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be between {protocol.MIN_LEASE_SECONDS} and "
                             f"{protocol.MAX_LEASE_SECONDS}")
        self._base = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        super().__init__(session)
        self.wait_seconds = wait_seconds
        self.lease_seconds = lease_seconds
        self._retry_initial = retry_initial
        self._retry_max = retry_max

    @classmethod
    def from_config(cls, github: GithubConfig, **options: Any) -> GatewayClient:
        """The client of `[github] mode = "gateway"`; reads the token file (0600, ours)."""
        if github.mode != "gateway" or github.gateway_url is None or github.gateway_token_file is None:
            raise InputError('needs mode = "gateway" with gateway_url and gateway_token_file', field="github")
        token = read_secret_file(github.gateway_token_file,
                                 what=FILE_DESCRIPTIONS["github.gateway_token_file"])
        return cls(github.gateway_url, token, **options)

    def __repr__(self) -> str:   # never the token
        return f"GatewayClient({self._base!r})"

    # --- taking deliveries ---

    async def next_delivery(self, *, wait_seconds: int | None = None) -> Delivery | None:
        """One long poll: the next delivery, leased to this agent, or None if none came in time."""
        wait = self.wait_seconds if wait_seconds is None else wait_seconds
        params = {"wait": str(wait), "seconds": str(self.lease_seconds)}
        sent_at = time.monotonic()
        status, headers, body = await self._post(protocol.LEASES_PATH, params,
                                                 timeout=wait + REQUEST_TIMEOUT_SECONDS)
        if status == 204:
            return None
        if status != 200:
            raise self._unexpected(status, body, headers)
        try:
            return delivery_from_answer(headers, body, sent_at=sent_at)
        except ValueError as exc:
            await self._drop_malformed(headers, str(exc))
            return None

    async def _drop_malformed(self, headers: Any, why: str) -> None:
        # The gateway only queues JSON objects, so this is a broken gateway: acknowledging it keeps
        # one unusable delivery from being handed out (and failing) forever.
        log.error("unusable delivery from the gateway, acknowledged and dropped", reason=why)
        lease_id = headers.get(protocol.LEASE_ID_HEADER, "")
        with contextlib.suppress(GatewayError, ValueError):
            await self._lease_call(lease_id, "ack")

    async def deliveries(self) -> AsyncIterator[Delivery]:
        """Deliveries as they come, forever; waits and retries while the gateway is unreachable.

        Raises GatewayAuthError when the gateway refuses the token.
        """
        failures = 0
        while True:
            try:
                delivery = await self.next_delivery()
            except GatewayAuthError:
                raise
            except GatewayError as exc:
                failures += 1
                delay = retry_delay(failures, initial=self._retry_initial, maximum=self._retry_max,
                                    retry_after=exc.retry_after)
                log.warning("gateway not reachable; retrying", error=str(exc), failures=failures,
                            retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            failures = 0
            if delivery is not None:
                yield delivery

    # --- leases ---

    async def extend(self, delivery: Delivery) -> None:
        """Extend the lease by its period from now; LeaseLost if it is no longer ours."""
        lease = delivery.lease
        sent_at = time.monotonic()
        await self._lease_call(lease.id, "extend", {"seconds": str(lease.seconds)})
        lease.deadline = sent_at + lease.seconds

    async def acknowledge(self, delivery: Delivery) -> None:
        """Done with the delivery: the gateway forgets it. Safe to repeat."""
        await self._lease_call(delivery.lease.id, "ack")

    async def release(self, delivery: Delivery) -> None:
        """Give the delivery back now (for example when this agent stops), for another agent to take."""
        await self._lease_call(delivery.lease.id, "release")

    @contextlib.asynccontextmanager
    async def keep_leased(self, delivery: Delivery) -> AsyncIterator[LeaseKeeper]:
        """Extend the delivery's lease in the background while the block runs."""
        keeper = LeaseKeeper(self, delivery)
        keeper.start()
        try:
            yield keeper
        finally:
            await keeper.stop()

    async def _lease_call(self, lease_id: str, action: str, params: dict[str, str] | None = None) -> None:
        status, headers, body = await self._post(protocol.lease_action_path(lease_id, action), params or {},
                                                 timeout=REQUEST_TIMEOUT_SECONDS)
        if status == 409:
            raise LeaseLost(f"lease {action}: {answer_error(body)}")
        if status != 200:
            raise self._unexpected(status, body, headers)

    # --- plumbing ---

    async def _post(self, path: str, params: dict[str, str], *, timeout: float
                    ) -> tuple[int, Any, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(self._base + path, params=params, headers=self._headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout),
                                          allow_redirects=False) as response:
                return response.status, response.headers, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(f"gateway {self._base}: {type(exc).__name__}: {exc}") from None

    def _unexpected(self, status: int, body: bytes, headers: Any) -> GatewayError:
        message = f"gateway {self._base} answered {status}: {answer_error(body)}"
        if status == 401:
            return GatewayAuthError(message + " (check github.gateway_token_file against the gateway's "
                                              "agent tokens file)")
        retry_after = headers.get("Retry-After", "")
        return GatewayError(message, retry_after=float(retry_after) if retry_after.isdigit() else None)


def answer_error(body: bytes) -> str:
    """What an answer of the hub says went wrong: its `error`, else the start of its body."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, str):
        return error[:300]
    return body[:300].decode("utf-8", "replace") or "(empty answer)"
