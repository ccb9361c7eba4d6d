"""The hub's agent endpoints for API jobs, as this agent calls them (paths and bodies from the hub's
own `jobs_protocol`, so both sides agree by construction).

    client = HubClient(url, agent_token)
    lease = await client.lease("hpc1", wait=25, seconds=120)     # a JobLease, or None after `wait`
    await client.publish(lease.id, "queued")                     # the job is this agent's for good
    length = await client.append_log(lease.id, 0, b"...")        # the hub's log length afterwards
    view = await client.show(lease.id)                           # state, cancel_requested, log_length
    await client.register(job_id, registration_body(...))         # a job of another source
    url = await client.public_url()                              # where users reach the hub

The hub is trusted for nothing but handing out jobs and keeping what the agent publishes: the
token it forwards is verified here (`confirm`). Failures come in three kinds, the first two shared
with the hub's webhook client (`runner.sources.github.gateway_client`): `GatewayError` (not
reached, or a 5xx: worth retrying), `GatewayAuthError` (the agent token is refused), and
`HubRefused` (a 4xx about the job itself: not held by this agent, unknown, or a log append that
would leave a gap, whose `length` says where the hub's log ends).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import aiohttp

from runner.config import FILE_DESCRIPTIONS
from runner.errors import HpcRunnerError
from runner.gateway import jobs_protocol as protocol
from runner.gateway.protocol import DEFAULT_LEASE_SECONDS, DEFAULT_WAIT_SECONDS
from runner.httpsession import SessionHolder
from runner.logging_setup import get_logger
from runner.metrics import ci_call
from runner.secrets import read_secret_file
from runner.sources.github.gateway_client import (
    RETRY_INITIAL_SECONDS,
    GatewayAuthError,
    GatewayError,
    answer_error,
    retry_delay,
)

log = get_logger("runner.sources.api")

T = TypeVar("T")

# A request that is not a long poll gets this long; a long poll gets its wait on top.
REQUEST_TIMEOUT_SECONDS = 30.0
# The slowest upload of an output file waited for (its timeout grows with its size).
UPLOAD_BYTES_PER_SECOND = 1024 * 1024


class HubRefused(HpcRunnerError):
    """The hub refused a request about one job (a 4xx): `status`, its message, and for a log append
    the length of the log the hub holds (`length`), to carry on from."""

    def __init__(self, status: int, message: str, *, length: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.length = length


@dataclass(frozen=True)
class AgentView:
    """What the hub holds of a job this agent holds."""

    id: str
    state: str
    cancel_requested: bool
    log_length: int


@dataclass(frozen=True)
class HeldOutput:
    """An output a job's record names, and whether the hub holds its file."""

    path: str
    sha256: str
    size: int
    held: bool


def agent_view(data: object) -> AgentView:
    """Read an agent view answer; ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("the hub's answer is not a JSON object")
    job_id, state, length = data.get("id"), data.get("state"), data.get("log_length")
    if not isinstance(job_id, str) or state not in protocol.STATES or isinstance(length, bool) \
            or not isinstance(length, int) or length < 0:
        raise ValueError("the hub's answer is not a job's agent view (id, state, log_length)")
    return AgentView(job_id, str(state), bool(data.get("cancel_requested")), length)


class HubClient(SessionHolder):
    """Talks to one hub with one agent token. Use as an async context manager (or `close`)."""

    def __init__(self, url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                 wait_seconds: int = DEFAULT_WAIT_SECONDS, lease_seconds: int = DEFAULT_LEASE_SECONDS,
                 retry_initial: float = RETRY_INITIAL_SECONDS) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        super().__init__(session)
        self.wait_seconds = wait_seconds
        self.lease_seconds = lease_seconds
        self.retry_initial = retry_initial

    @classmethod
    def from_files(cls, url: str, token_file: Path, **options: Any) -> HubClient:
        """The client of `hub_url` with the token in `token_file` (0600, this user's)."""
        return cls(url, read_secret_file(token_file, what=FILE_DESCRIPTIONS["hub_token_file"]), **options)

    def __repr__(self) -> str:   # never the token
        return f"HubClient({self.url!r})"

    async def retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """`call()`, again after a growing pause for as long as the hub cannot be reached
        (GatewayError): what this agent must tell the hub is never dropped. A refusal (HubRefused)
        is the caller's."""
        failures = 0
        while True:
            try:
                return await call()
            except GatewayError as exc:
                failures += 1
                delay = retry_delay(failures, initial=self.retry_initial, retry_after=exc.retry_after)
                log.warning("the hub did not answer; trying again", what=what, error=str(exc),
                            failures=failures, retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    # --- the calls ---

    async def lease(self, cluster: str, *, wait: int | None = None) -> protocol.JobLease | None:
        """One long poll: the next API job for `cluster`, leased to this agent, or None."""
        wait = self.wait_seconds if wait is None else wait
        params = {"cluster": cluster, "wait": str(wait), "seconds": str(self.lease_seconds)}
        status, _, body = await self._request("POST", protocol.AGENT_LEASE_PATH, params=params,
                                              timeout=wait + REQUEST_TIMEOUT_SECONDS)
        if status == 204:
            return None
        self._check(status, body)
        try:
            return protocol.parse_job_lease(_json(body))
        except ValueError as exc:
            raise GatewayError(f"hub {self.url}: {exc}") from None

    async def show(self, job_id: str) -> AgentView:
        status, _, body = await self._request("GET", protocol.agent_job_path(job_id))
        return self._view(status, body)

    async def register(self, job_id: str, registration: dict[str, Any]) -> AgentView:
        """Put a job of this agent's other sources on the hub under its own id (`registration_body`);
        registering it again is harmless."""
        status, _, answer = await self._request("PUT", protocol.agent_job_path(job_id),
                                                data=json.dumps(registration).encode(),
                                                content_type="application/json")
        return self._view(status, answer)

    async def publish(self, job_id: str, state: str, **fields: Any) -> AgentView:
        """Publish the job's `state` and `fields` (those left out keep the hub's values)."""
        body = json.dumps(protocol.state_body(state, **fields)).encode()
        status, _, answer = await self._request("POST", protocol.agent_state_path(job_id), data=body,
                                                content_type="application/json")
        return self._view(status, answer)

    async def append_log(self, job_id: str, offset: int, data: bytes) -> int:
        """Append `data` at `offset` of the job's log; the hub's log length afterwards. Bytes the hub
        holds already are compared, not added again, so repeating an append is harmless."""
        status, _, body = await self._request("POST", protocol.agent_log_path(job_id),
                                              params={"offset": str(offset)}, data=data,
                                              content_type="application/octet-stream")
        self._check(status, body)
        answer = _json(body)
        length = answer.get("length") if isinstance(answer, dict) else None
        if isinstance(length, bool) or not isinstance(length, int):
            raise GatewayError(f"hub {self.url}: a log append was answered without the log's length")
        return length

    async def put_provenance(self, job_id: str, record: bytes) -> list[HeldOutput]:
        """Give the hub the job's provenance record (again: harmless); the outputs it names, each
        with whether the hub holds its file."""
        status, _, body = await self._request("PUT", protocol.agent_provenance_path(job_id), data=record,
                                              content_type="application/json")
        self._check(status, body)
        answer = _json(body)
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        try:
            return [HeldOutput(str(item["path"]), str(item["sha256"]), int(item["size"]), bool(item["held"]))
                    for item in outputs or ()]
        except (KeyError, TypeError, ValueError):
            raise GatewayError(f"hub {self.url}: a provenance record was answered without its outputs") \
                from None

    async def put_output(self, job_id: str, path: str, file: BinaryIO, size: int) -> None:
        """Stream one output file (`size` bytes, from `file`'s start) to the hub."""
        status, _, body = await self._request(
            "PUT", protocol.agent_outputs_path(job_id), params={"path": path}, data=file,
            content_type="application/octet-stream",
            timeout=REQUEST_TIMEOUT_SECONDS + size / UPLOAD_BYTES_PER_SECOND)
        self._check(status, body)

    async def public_url(self) -> str | None:
        """The address the hub's users reach it at (None: the hub serves no jobs API)."""
        status, _, body = await self._request("GET", protocol.AGENT_HUB_PATH)
        self._check(status, body)
        try:
            return protocol.parse_hub_info(_json(body))
        except ValueError as exc:
            raise GatewayError(f"hub {self.url}: {exc}") from None

    # --- plumbing ---

    def _view(self, status: int, body: bytes) -> AgentView:
        self._check(status, body)
        try:
            return agent_view(_json(body))
        except ValueError as exc:
            raise GatewayError(f"hub {self.url}: {exc}") from None

    def _check(self, status: int, body: bytes) -> None:
        if status in (200, 201):
            return
        answer = _json(body)
        message = answer_error(body)
        if status == 401:
            raise GatewayAuthError(f"hub {self.url} refuses this agent's token: {message} (check "
                                   "hub_token_file against the hub's agent tokens file)")
        if 400 <= status < 500:
            length = answer.get("length") if isinstance(answer, dict) else None
            raise HubRefused(status, message, length=length if isinstance(length, int)
                             and not isinstance(length, bool) else None)
        raise GatewayError(f"hub {self.url} answered {status}: {message}")

    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       data: bytes | BinaryIO | None = None, content_type: str | None = None,
                       timeout: float = REQUEST_TIMEOUT_SECONDS) -> tuple[int, Any, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = dict(self._headers)
        if content_type is not None:
            headers["Content-Type"] = content_type
        try:
            async with self._session.request(method, self.url + path, params=params, data=data,
                                             headers=headers, allow_redirects=False,
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                body = await response.read()
                ci_call("hub", method, path, response.status)
                if response.status >= 500:
                    retry_after = response.headers.get("Retry-After", "")
                    raise GatewayError(f"hub {self.url} answered {response.status}: {answer_error(body)}",
                                   retry_after=float(retry_after) if retry_after.isdigit() else None)
                return response.status, response.headers, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            ci_call("hub", method, path, None)
            raise GatewayError(f"hub {self.url}: {type(exc).__name__}: {exc}") from None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None

