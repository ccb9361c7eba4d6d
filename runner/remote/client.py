"""The hub's jobs API over HTTP, for `hpc-runner remote`: one aiohttp session, one bearer token.

A hub that cannot be reached, or answers 5xx, is asked again with backoff for `patience` seconds
before `HubUnreachable`; any other refusal is `HubRefused` with the hub's `error`. The token goes
only into the Authorization header: never into a message or a log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from runner.auditlines import read_line
from runner.errors import HpcRunnerError
from runner.gateway import jobs_protocol as protocol
from runner.remote.calls import is_ended, log_path

T = TypeVar("T")
Sink = Callable[[bytes], Awaitable[None]]
EntrySink = Callable[[dict[str, Any]], None]

DEFAULT_PATIENCE_SECONDS = 120.0
_FIRST_BACKOFF_SECONDS = 0.5
_MOST_BACKOFF_SECONDS = 10.0


class HubUnreachable(HpcRunnerError):
    """The hub did not answer (or answered 5xx) for as long as the client waits."""


class HubRefused(HpcRunnerError):
    def __init__(self, status: int, error: str, answer: dict[str, Any]) -> None:
        self.status = status
        self.error = error
        self.answer = answer
        super().__init__(f"the hub refused ({status}): {error}")


class _Retry(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HubClient:
    def __init__(self, session: aiohttp.ClientSession, hub_url: str, token: str, *,
                 patience: float = DEFAULT_PATIENCE_SECONDS) -> None:
        self._http = session
        self._hub = hub_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._patience = patience

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /api/v1/jobs`: the hub's answer ({"id", "url", "state"})."""
        # Never repeated: a submission whose answer was lost could otherwise queue the job twice.
        return await self._json("POST", protocol.JOBS_PATH, body=body, retry=False)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", protocol.job_path(job_id))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._json("DELETE", protocol.job_path(job_id))

    async def copy_log(self, job_id: str, sink: Sink, *, offset: int = 0, follow: bool) -> int:
        """Write the job's log from `offset` to `sink`; with `follow`, until the job has ended,
        reading on from where a dropped connection left off. The offset reached."""
        reached = [offset]

        async def read(follow_now: bool) -> None:
            await self._with_retries(lambda: self._read_log(job_id, reached, sink, follow=follow_now),
                                     progress=lambda: reached[0])
        await read(follow)
        while follow:
            if is_ended(await self.job(job_id)):
                # Bytes the agent sent after the job's last state: read once more, without following.
                await read(False)
                break
            await read(True)     # the hub closed the stream early (it is stopping): follow on
        return reached[0]

    async def audit(self, sink: EntrySink, *, account: str | None = None, job_id: str | None = None,
                    since: str | None = None) -> int:
        """Give each entry of the audit trail to `sink`, oldest first, as it streams in; when the
        connection drops, read on after the last entry received. How many entries."""
        last = [0]
        count = [0]

        async def read() -> None:
            path = protocol.audit_query(account=account, job_id=job_id, since=since, after=last[0])
            try:
                async with self._http.get(self._hub + path, headers=self._headers,
                                          timeout=_STREAM_TIMEOUT) as response:
                    await self._check(response)
                    pending = b""
                    async for data in response.content.iter_any():
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            item = self._entry(line)
                            sink(item)
                            last[0], count[0] = int(item["seq"]), count[0] + 1
                    if pending.strip():
                        raise _Retry("the answer ended within a line")
            except (TimeoutError, aiohttp.ClientError) as error:
                raise _Retry(_describe(error)) from None
        await self._with_retries(read, progress=lambda: last[0])
        return count[0]

    def _entry(self, line: bytes) -> dict[str, Any]:
        try:
            item = read_line(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HpcRunnerError(f"the hub at {self._hub} answered the audit trail with a line that is no "
                                 f"entry: {exc}") from None
        if not isinstance(item["seq"], int) or isinstance(item["seq"], bool):
            raise HpcRunnerError(f"the hub at {self._hub} answered the audit trail with an entry whose seq "
                                 "is no number")
        return item

    async def _read_log(self, job_id: str, reached: list[int], sink: Sink, *, follow: bool) -> None:
        """One request for the log from `reached[0]`, which moves on as bytes arrive."""
        try:
            async with self._http.get(self._hub + log_path(job_id, reached[0], follow=follow),
                                      headers=self._headers, timeout=_STREAM_TIMEOUT) as response:
                await self._check(response)
                async for data in response.content.iter_any():
                    await sink(data)
                    reached[0] += len(data)
        except (TimeoutError, aiohttp.ClientError) as error:
            raise _Retry(_describe(error)) from None

    async def _json(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                    retry: bool = True) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            try:
                async with self._http.request(method, self._hub + path, json=body, headers=self._headers,
                                              timeout=_CALL_TIMEOUT) as response:
                    await self._check(response)
                    answer = await response.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError) as error:
                raise _Retry(_describe(error)) from None
            except ValueError:
                raise self._unreachable(f"{method} {path} was answered with no JSON") from None
            if not isinstance(answer, dict):
                raise self._unreachable(f"{method} {path} was answered with no JSON object")
            return answer
        if not retry:
            try:
                return await once()
            except _Retry as failed:
                raise self._unreachable(failed.reason) from None
        return await self._with_retries(once)

    async def _with_retries(self, call: Callable[[], Awaitable[T]], *,
                            progress: Callable[[], object] | None = None) -> T:
        """`call`, again with backoff while it raises _Retry, for `patience` seconds (counted
        afresh whenever `progress` moved)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._patience
        backoff = _FIRST_BACKOFF_SECONDS
        seen = progress() if progress is not None else None
        while True:
            try:
                return await call()
            except _Retry as failed:
                now = progress() if progress is not None else None
                if now != seen:
                    seen, give_up, backoff = now, loop.time() + self._patience, _FIRST_BACKOFF_SECONDS
                if loop.time() + backoff > give_up:
                    raise self._unreachable(failed.reason) from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MOST_BACKOFF_SECONDS)

    def _unreachable(self, reason: str) -> HubUnreachable:
        return HubUnreachable(f"the hub at {self._hub} cannot be reached: {reason}")

    async def _check(self, response: aiohttp.ClientResponse) -> None:
        """Raise for an answer other than 2xx: _Retry for 5xx, HubRefused with the hub's error else."""
        if response.status < 300:
            return
        text = (await response.read())[:64 * 1024].decode("utf-8", "replace")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            answer = {"error": text.strip()[:500] or response.reason or "no reason given"}
        error = str(answer.get("error") or response.reason or "no reason given")
        if response.status >= 500:
            raise _Retry(f"{response.status} {error}")
        raise HubRefused(response.status, error, answer)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


# A call is answered at once; a followed log may stay quiet for as long as the job is pending.
_CALL_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=15)
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=None)
