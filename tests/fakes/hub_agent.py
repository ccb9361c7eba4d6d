"""An agent as the hub sees one: it leases API jobs and publishes their state and log through the
hub's real agent endpoints (`runner.gateway.jobs_protocol`), standing in for a cluster in unit
tests. What it publishes is up to the test."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from runner.gateway import jobs_protocol as protocol


class HubAgent:
    def __init__(self, http: aiohttp.ClientSession, hub_url: str, token: str) -> None:
        self._http = http
        self._hub = hub_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self.offsets: dict[str, int] = {}

    async def _call(self, method: str, path: str, *, data: bytes | None = None,
                    expect: tuple[int, ...] = (200,)) -> Any:
        async with self._http.request(method, self._hub + path, data=data, headers=self._headers) as response:
            body = await response.read()
            assert response.status in expect, (method, path, response.status, body[:500])
            return json.loads(body) if body else None

    async def lease(self, cluster: str = "hpc1", *, wait: int = 20) -> dict[str, Any] | None:
        """The next API job for `cluster`, waiting up to `wait` seconds for one; None if none came."""
        answer = await self._call("POST", f"{protocol.AGENT_LEASE_PATH}?cluster={cluster}&wait={wait}",
                                  expect=(200, 204))
        return answer if isinstance(answer, dict) else None

    async def publish(self, job_id: str, state: str, **fields: Any) -> dict[str, Any]:
        body = json.dumps(protocol.state_body(state, **fields)).encode()
        answer: dict[str, Any] = await self._call("POST", protocol.agent_state_path(job_id), data=body)
        return answer

    async def write(self, job_id: str, data: bytes) -> None:
        """Append `data` to the job's log, after what this agent wrote before."""
        offset = self.offsets.get(job_id, 0)
        await self._call("POST", f"{protocol.agent_log_path(job_id)}?offset={offset}", data=data)
        self.offsets[job_id] = offset + len(data)

    async def view(self, job_id: str) -> dict[str, Any]:
        """{"id", "state", "cancel_requested", "log_length"}."""
        answer: dict[str, Any] = await self._call("GET", protocol.agent_job_path(job_id))
        return answer
