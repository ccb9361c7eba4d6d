"""Sending the agent API's requests over HTTP, with Buildkite's retry rules.

One `AgentSession` is one registered agent: it holds the session token, the endpoint (which
register and ping answers may move) and the `Buildkite-` headers the server asked for, and it
sends job calls with the job's own token. What to send and whether to retry is decided by
`protocol`; this module only does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from runner import __version__
from runner.errors import HpcRunnerError
from runner.logging_setup import get_logger
from runner.metrics import ci_request
from runner.sources.buildkite import protocol
from runner.sources.buildkite.protocol import ApiRequest, RetryPolicy

log = get_logger("runner.sources.buildkite")

USER_AGENT = f"hpc-runner/{__version__} (linux; buildkite-agent-api)"
DEFAULT_TIMEOUT_S = 60.0

Sleep = Callable[[float], Awaitable[None]]


class ApiError(HpcRunnerError):
    """A call that failed for good. `status` is None when no HTTP answer came (network error)."""

    def __init__(self, name: str, status: int | None, message: str, *, attempts: int) -> None:
        self.name = name
        self.status = status
        self.message = message
        self.attempts = attempts
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"Buildkite {name}: {where}: {message} (after {attempts} attempt(s))")


@dataclass(frozen=True)
class Answer:
    status: int
    data: Any
    attempts: int


class AgentSession:
    """The HTTP side of one agent session. `http` is shared by all sessions of the agent."""

    def __init__(self, http: aiohttp.ClientSession, endpoint: str, registration_token: str, *,
                 policies: Mapping[str, RetryPolicy] = protocol.DEFAULT_POLICIES,
                 sleep: Sleep = asyncio.sleep, rng: random.Random | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = http
        self.endpoint = endpoint
        self._registration_token = registration_token
        self.session_token: str | None = None
        self.request_headers: dict[str, str] = {}
        self._refused_told: set[str] = set()
        self._policies = policies
        self._sleep = sleep
        self.rng = rng or random.Random()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    @property
    def http(self) -> aiohttp.ClientSession:
        """The agent's HTTP client, for requests that are not the agent API's (artifact storage)."""
        return self._http

    @property
    def timeout_s(self) -> float:
        return self._timeout.total or DEFAULT_TIMEOUT_S

    def policy(self, name: str) -> RetryPolicy:
        return self._policies.get(name) or protocol.DEFAULT_POLICIES[name]

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)

    def adopt_headers(self, headers: Mapping[str, str] | None,
                      refused: Mapping[str, str] | None = None) -> None:
        """A register or ping answer's `request_headers` replace the whole set (None: keep it).
        `refused` (name: why) are the ones it asked for that no request may carry, left out of
        `headers`: each is logged once per session, however many ping answers repeat it."""
        for name, why in (refused or {}).items():
            if name not in self._refused_told:
                self._refused_told.add(name)
                log.warning("Buildkite asked for a header that cannot be sent; it is left out",
                            header=name, problem=why)
        if headers is not None:
            self.request_headers = dict(headers)

    async def call(self, request: ApiRequest, *, job_token: str | None = None,
                   policy: RetryPolicy | None = None) -> Answer:
        """Send `request`, retrying as its endpoint's policy says; raise ApiError when it fails."""
        rule = policy or self.policy(request.name)
        attempt = 0
        while True:
            attempt += 1
            status, raw, retry_after = await self._send(request, job_token)
            decodable, data = _decode(raw) if status is not None else (False, None)
            if status is not None and 200 <= status < 300 and decodable:
                return Answer(status, data, attempt)
            delay = protocol.next_delay(rule, attempt, status, decodable=decodable, retry_after=retry_after,
                                        rng=self.rng)
            message = _message(status, raw)
            if delay is None:
                raise ApiError(request.name, status, message, attempts=attempt)
            log.info("Buildkite call failed; retrying", call=request.name, status=status, error=message,
                     attempt=attempt, retry_in=round(delay, 2))
            await self._sleep(delay)

    async def _send(self, request: ApiRequest, job_token: str | None
                    ) -> tuple[int | None, bytes, str | None]:
        token = self._token(request, job_token)
        headers = {"Authorization": f"Token {token}", "User-Agent": USER_AGENT,
                   **request.content_headers(), **self.request_headers}
        url = protocol.join_url(self.endpoint, request.path)
        try:
            async with self._http.request(request.method, url, params=dict(request.query) or None,
                                          data=request.encoded_body(), headers=headers,
                                          timeout=self._timeout) as response:
                raw = await response.read()
                ci_request("buildkite", request.name, response.status)
                return response.status, raw, response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ci_request("buildkite", request.name, None)
            return None, str(exc).encode() or type(exc).__name__.encode(), None

    def _token(self, request: ApiRequest, job_token: str | None) -> str:
        if request.token == "registration":
            return self._registration_token
        if request.token == "job" and job_token:
            return job_token
        # A job that came without a token is served with the session token, as the agent does.
        if not self.session_token:
            raise HpcRunnerError(f"Buildkite {request.name}: the agent is not registered")
        return self.session_token


def _decode(raw: bytes) -> tuple[bool, Any]:
    if not raw.strip():
        return True, None
    try:
        return True, json.loads(raw)
    except (ValueError, RecursionError):
        # json recurses once per level: an answer nested deeper than the interpreter allows is as
        # unreadable as a proxy's page, and must not end the agent's session.
        return False, None


def _message(status: int | None, raw: bytes) -> str:
    if status is None:
        return raw.decode("utf-8", "replace")
    if 200 <= status < 300:
        return "the answer is not JSON (a proxy's page?)"
    return protocol.error_message(raw)
