"""Tests of the Buildkite agent API emulator itself, driven by a plain aiohttp client."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from .buildkite_api import BuildkiteEmulator, LogGapError, make_job

# `bk` (the emulator, asking for the header Buildkite-Shard: 7) comes from conftest.


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No automatic decompression or retries: the tests look at exactly what the server sent.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str | None,
    *,
    body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Token {token}"
    if body is not None:
        hdrs["Content-Type"] = "application/json"
        data = (json.dumps(body) + "\n").encode()
    async with http.request(
        method, url, data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as resp:
        raw = await resp.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return resp.status, parsed, resp


def chunk_url(bk: BuildkiteEmulator, job_id: str, sequence: int, offset: int, size: int) -> str:
    return f"{bk.url}/jobs/{job_id}/chunks?sequence={sequence}&offset={offset}&size={size}"


async def upload(
    http: aiohttp.ClientSession,
    bk: BuildkiteEmulator,
    job_id: str,
    token: str,
    seq: int,
    off: int,
    data: bytes,
) -> int:
    status, _, _ = await call(
        http,
        "POST",
        chunk_url(bk, job_id, seq, off, len(data)),
        token,
        data=gzip.compress(data),
        headers={"Content-Type": "text/plain", "Content-Encoding": "gzip", "Buildkite-Shard": "7"},
    )
    return status


SHARD = {"Buildkite-Shard": "7"}


async def register_and_connect(
    http: aiohttp.ClientSession, bk: BuildkiteEmulator, tags: list[str] | None = None
) -> dict[str, Any]:
    status, reg, _ = await call(
        http,
        "POST",
        f"{bk.url}/register",
        bk.registration_token,
        body={"name": "hpc-1", "hostname": "login1", "meta_data": tags or ["queue=hpc"], "features": []},
    )
    assert status == 200, reg
    status, _, _ = await call(http, "POST", f"{bk.url}/connect", reg["access_token"], headers=SHARD)
    assert status == 200
    return dict(reg)


async def running_job(
    http: aiohttp.ClientSession, bk: BuildkiteEmulator, **job_fields: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Register, connect, ping, accept and start a job; returns (registration, accepted job)."""
    job_id = bk.queue_job(make_job("srun hostname", **job_fields), agent_query_rules=["queue=hpc"])
    reg = await register_and_connect(http, bk)
    status, ping, _ = await call(http, "GET", f"{bk.url}/ping", reg["access_token"], headers=SHARD)
    assert status == 200 and ping["job"]["id"] == job_id, ping
    status, job, _ = await call(
        http, "PUT", f"{bk.url}/jobs/{job_id}/accept", reg["access_token"], headers=SHARD
    )
    assert status == 200, job
    status, _, _ = await call(
        http, "PUT", f"{bk.url}/jobs/{job_id}/start", job["token"], body={"started_at": "x"}, headers=SHARD
    )
    assert status == 200
    return reg, job


FINISH = {"exit_status": "0", "finished_at": "2026-01-01T00:00:00Z", "chunks_failed_count": 0}


async def test_happy_path_with_the_right_tokens(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    job_id = bk.queue_job(make_job("srun hostname"), agent_query_rules=["queue=hpc"])

    status, reg, _ = await call(
        http,
        "POST",
        f"{bk.url}/register",
        bk.registration_token,
        body={"name": "hpc-1", "hostname": "login1", "meta_data": ["queue=hpc"], "features": []},
    )
    assert status == 200
    assert reg["access_token"].startswith("bkaa_")
    assert reg["endpoint"] == bk.url
    assert reg["request_headers"] == {"Buildkite-Shard": "7"}
    for key in ("ping_interval", "job_status_interval", "heartbeat_interval"):
        assert isinstance(reg[key], int) and reg[key] > 0
    session = reg["access_token"]

    assert (await call(http, "POST", f"{bk.url}/connect", session, headers=SHARD))[0] == 200
    status, beat, _ = await call(
        http, "POST", f"{bk.url}/heartbeat", session, body={"sent_at": "t0"}, headers=SHARD
    )
    assert status == 200 and beat["sent_at"] == "t0" and beat["received_at"]

    status, ping, _ = await call(http, "GET", f"{bk.url}/ping", session, headers=SHARD)
    assert status == 200
    assert ping["action"] == "idle"
    assert "ping_interval" not in ping  # intervals come from register only
    assert ping["job"]["id"] == job_id
    assert bk.job_state(job_id) == "assigned"

    status, job, _ = await call(http, "PUT", f"{bk.url}/jobs/{job_id}/accept", session, headers=SHARD)
    assert status == 200
    assert job["state"] == "accepted"
    token = job["token"]
    assert token.startswith("bkaj_")
    env = job["env"]
    assert env["BUILDKITE_COMMAND"] == "srun hostname"
    assert env["BUILDKITE_REPO"] and env["BUILDKITE_COMMIT"]
    assert env["BUILDKITE_AGENT_META_DATA_QUEUE"] == "hpc"
    assert job["chunks_max_size_bytes"] > 0 and job["chunks_interval_seconds"] > 0

    status, _, _ = await call(
        http, "PUT", f"{bk.url}/jobs/{job_id}/start", token, body={"started_at": "t1"}, headers=SHARD
    )
    assert status == 200
    status, state, _ = await call(http, "GET", f"{bk.url}/jobs/{job_id}", token, headers=SHARD)
    assert (status, state) == (200, {"state": "running"})

    assert await upload(http, bk, job_id, token, 1, 0, b"hello ") == 201
    assert await upload(http, bk, job_id, token, 2, 6, b"world\n") == 201

    status, _, _ = await call(
        http, "PUT", f"{bk.url}/jobs/{job_id}/finish", token, body=FINISH, headers=SHARD
    )
    assert status == 200
    assert bk.job_state(job_id) == "finished"

    status, ping, _ = await call(http, "GET", f"{bk.url}/ping", session, headers=SHARD)
    assert status == 200 and "job" not in ping
    assert (await call(http, "POST", f"{bk.url}/disconnect", session, headers=SHARD))[0] == 200

    assert bk.log(job_id) == b"hello world\n"
    assert bk.finishes(job_id) == [FINISH]
    assert bk.header_violations() == []
    agent = bk.agent_by_name("hpc-1")
    assert agent.disconnected and len(agent.heartbeats) == 1
    kinds = [(r.endpoint, r.token_kind) for r in bk.requests()]
    assert kinds == [
        ("register", "registration"),
        ("connect", "session"),
        ("heartbeat", "session"),
        ("ping", "session"),
        ("accept", "session"),
        ("start", "job"),
        ("job_state", "job"),
        ("chunks", "job"),
        ("chunks", "job"),
        ("finish", "job"),
        ("ping", "session"),
        ("disconnect", "session"),
    ]


async def test_wrong_token_kinds_are_401(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    reg, job = await running_job(http, bk)
    session, job_token, job_id = reg["access_token"], job["token"], job["id"]

    # Session or job token on register; registration or job token on agent calls; registration or
    # session token on job calls; garbage and missing tokens everywhere.
    cases: list[tuple[str, str, str | None, Any]] = [
        ("POST", "/register", session, {"name": "x"}),
        ("POST", "/register", job_token, {"name": "x"}),
        ("POST", "/register", None, {"name": "x"}),
        ("POST", "/connect", bk.registration_token, None),
        ("POST", "/heartbeat", job_token, {"sent_at": "t"}),
        ("GET", "/ping", bk.registration_token, None),
        ("GET", "/ping", job_token, None),
        ("PUT", f"/jobs/{job_id}/accept", job_token, None),
        ("PUT", f"/jobs/{job_id}/start", session, {"started_at": "t"}),
        ("GET", f"/jobs/{job_id}", session, None),
        ("GET", f"/jobs/{job_id}", bk.registration_token, None),
        ("PUT", f"/jobs/{job_id}/finish", session, FINISH),
        ("PUT", f"/jobs/{job_id}/finish", "bkaj_forged", FINISH),
        ("POST", "/disconnect", job_token, None),
    ]
    for method, path, token, body in cases:
        status, payload, _ = await call(http, method, bk.url + path, token, body=body)
        assert status == 401, (method, path, token)
        assert isinstance(payload["message"], str)
    status, _, _ = await call(
        http,
        "POST",
        chunk_url(bk, job_id, 1, 0, 1),
        session,
        data=gzip.compress(b"x"),
        headers={"Content-Encoding": "gzip"},
    )
    assert status == 401
    # Bearer is the REST API's scheme, not the agent API's.
    async with http.get(f"{bk.url}/ping", headers={"Authorization": f"Bearer {session}"}) as resp:
        assert resp.status == 401
    assert bk.finishes(job_id) == []
    assert bk.job_state(job_id) == "running"

    # After disconnect the session token is dead.
    assert (await call(http, "POST", f"{bk.url}/disconnect", session, headers=SHARD))[0] == 200
    assert (await call(http, "GET", f"{bk.url}/ping", session))[0] == 401


async def test_job_token_is_bound_to_its_job(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    other = bk.queue_job(make_job())
    status, _, _ = await call(http, "GET", f"{bk.url}/jobs/{other}", job["token"])
    assert status == 404


async def test_out_of_order_and_retried_chunks_reassemble(
    bk: BuildkiteEmulator, http: aiohttp.ClientSession
) -> None:
    _, job = await running_job(http, bk)
    payload = bytes(range(256)) * 40 + "émoji ✓\n".encode()
    pieces = []
    for seq, off in enumerate(range(0, len(payload), 1000), start=1):
        pieces.append((seq, off, payload[off : off + 1000]))
    order = [*reversed(pieces), pieces[3], pieces[0]]  # reversed, then two retries
    results = await asyncio.gather(*(upload(http, bk, job["id"], job["token"], *p) for p in order))
    assert set(results) == {201}
    assert bk.log(job["id"]) == payload
    assert bk.jobs[job["id"]].duplicate_chunks == 2
    assert [c.offset for c in bk.chunks(job["id"])] == [p[1] for p in pieces]


async def test_sequences_from_zero_are_accepted(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    assert await upload(http, bk, job["id"], job["token"], 0, 0, b"ab") == 201
    assert await upload(http, bk, job["id"], job["token"], 1, 2, b"cd") == 201
    assert bk.log(job["id"]) == b"abcd"


async def test_log_gap_is_detected(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    assert await upload(http, bk, job["id"], job["token"], 1, 0, b"abc") == 201
    assert await upload(http, bk, job["id"], job["token"], 3, 6, b"ghi") == 201
    with pytest.raises(LogGapError, match=r"\[3, 6\)"):
        bk.log(job["id"])


async def test_bad_chunks_are_rejected(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    url = chunk_url(bk, job["id"], 1, 0, 3)
    gz = {"Content-Encoding": "gzip"}
    assert (await call(http, "POST", url, job["token"], data=b"abc", headers=gz))[0] == 400  # not gzip
    assert (await call(http, "POST", url, job["token"], data=gzip.compress(b"abcd"), headers=gz))[0] == 400
    assert (await call(http, "POST", url, job["token"], data=gzip.compress(b"abc")))[0] == 400  # no encoding
    no_query = f"{bk.url}/jobs/{job['id']}/chunks"
    status, _, _ = await call(http, "POST", no_query, job["token"], data=gzip.compress(b"abc"), headers=gz)
    assert status == 400
    assert await upload(http, bk, job["id"], job["token"], 1, 0, b"abc") == 201
    # Same offset, other bytes: a client bug, not a retry.
    assert await upload(http, bk, job["id"], job["token"], 2, 0, b"xyz") == 422
    assert bk.jobs[job["id"]].chunk_conflicts


async def test_finish_exactly_once_and_late_chunks(
    bk: BuildkiteEmulator, http: aiohttp.ClientSession
) -> None:
    _, job = await running_job(http, bk)
    url = f"{bk.url}/jobs/{job['id']}/finish"
    assert (await call(http, "PUT", url, job["token"], body=FINISH))[0] == 200
    status, payload, _ = await call(http, "PUT", url, job["token"], body=FINISH)
    assert status == 422 and "message" in payload
    assert len(bk.finishes(job["id"])) == 2  # the double finish is visible to the test
    assert await upload(http, bk, job["id"], job["token"], 9, 0, b"late") == 400


async def test_finish_body_is_validated(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    url = f"{bk.url}/jobs/{job['id']}/finish"
    for bad in (
        {**FINISH, "exit_status": 0},
        {**FINISH, "signal_reason": "cancelled"},
        {k: v for k, v in FINISH.items() if k != "chunks_failed_count"},
    ):
        assert (await call(http, "PUT", url, job["token"], body=bad))[0] == 422
    assert bk.job_state(job["id"]) == "running"


async def test_expired_job_token_after_finish() -> None:
    async with BuildkiteEmulator(job_token_expires_on_finish=True) as bk, aiohttp.ClientSession() as http:
        _, job = await running_job(http, bk)
        url = f"{bk.url}/jobs/{job['id']}/finish"
        assert (await call(http, "PUT", url, job["token"], body=FINISH))[0] == 200
        assert (await call(http, "PUT", url, job["token"], body=FINISH))[0] == 401


async def test_cancel_and_timeout_states(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    state_url = f"{bk.url}/jobs/{job['id']}"
    bk.cancel_job(job["id"])
    assert (await call(http, "GET", state_url, job["token"]))[1] == {"state": "canceling"}
    # The log keeps flowing while the job is being cancelled.
    assert await upload(http, bk, job["id"], job["token"], 1, 0, b"terminated\n") == 201
    body = {**FINISH, "exit_status": "-1", "signal": "SIGTERM", "signal_reason": "cancel"}
    assert (await call(http, "PUT", f"{state_url}/finish", job["token"], body=body))[0] == 200
    assert bk.job_state(job["id"]) == "canceled"

    queued = bk.queue_job(make_job())
    bk.cancel_job(queued)
    assert bk.job_state(queued) == "canceled"

    async with BuildkiteEmulator() as bk2:
        _, job2 = await running_job(http, bk2)
        bk2.time_out_job(job2["id"])
        _, state, _ = await call(http, "GET", f"{bk2.url}/jobs/{job2['id']}", job2["token"])
        assert state == {"state": "timing_out"}


async def test_ping_actions_and_tag_matching(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    gpu_job = bk.queue_job(make_job(), agent_query_rules=["queue=hpc", "gpu=a*"])
    reg = await register_and_connect(http, bk, tags=["queue=hpc", "gpu=none"])
    session = reg["access_token"]
    status, ping, _ = await call(http, "GET", f"{bk.url}/ping", session, headers=SHARD)
    assert status == 200 and "job" not in ping  # tags do not match

    reg2 = await register_and_connect(http, bk, tags=["queue=hpc", "gpu=a100"])
    bk.set_action("pause", message="maintenance", agent_id=reg2["id"])
    _, ping, _ = await call(http, "GET", f"{bk.url}/ping", reg2["access_token"], headers=SHARD)
    assert ping == {"action": "pause", "message": "maintenance"}
    bk.set_action("", agent_id=reg2["id"])
    _, ping, _ = await call(http, "GET", f"{bk.url}/ping", reg2["access_token"], headers=SHARD)
    assert "action" not in ping and ping["job"]["id"] == gpu_job
    bk.set_action("disconnect")
    _, ping, _ = await call(http, "GET", f"{bk.url}/ping", session, headers=SHARD)
    assert ping["action"] == "disconnect"

    unconnected = await call(
        http, "POST", f"{bk.url}/register", bk.registration_token, body={"name": "n", "meta_data": []}
    )
    assert (await call(http, "GET", f"{bk.url}/ping", unconnected[1]["access_token"]))[0] == 422


async def test_acquire(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    job_id = bk.queue_job(make_job(), agent_query_rules=["queue=elsewhere"], locked=True, lock_retry_after=3)
    reg = await register_and_connect(http, bk)
    url = f"{bk.url}/jobs/{job_id}/acquire"
    lock = {"X-Buildkite-Lock-Acquire-Job": "1", **SHARD}
    assert (await call(http, "PUT", url, reg["access_token"], headers=SHARD))[0] == 422
    status, _, resp = await call(http, "PUT", url, reg["access_token"], headers=lock)
    assert status == 423 and resp.headers["Retry-After"] == "3"
    bk.unlock_job(job_id)
    status, job, _ = await call(http, "PUT", url, reg["access_token"], headers=lock)
    assert status == 200 and job["state"] == "accepted" and job["token"].startswith("bkaj_")
    assert (await call(http, "PUT", url, reg["access_token"], headers=lock))[0] == 422


async def test_request_headers_are_checked(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    reg = await register_and_connect(http, bk)
    session = reg["access_token"]
    await call(http, "GET", f"{bk.url}/ping", session)  # forgot Buildkite-Shard
    assert [r.endpoint for r in bk.header_violations()] == ["ping"]
    assert bk.header_violations()[0].missing_headers == {"Buildkite-Shard": "7"}

    bk.ping_request_headers = {"Buildkite-Shard": "8", "X-Other": "dropped"}
    _, ping, _ = await call(http, "GET", f"{bk.url}/ping", session, headers=SHARD)
    assert ping["request_headers"] == {"Buildkite-Shard": "8", "X-Other": "dropped"}
    await call(http, "GET", f"{bk.url}/ping", session, headers={"Buildkite-Shard": "8"})
    assert len(bk.header_violations()) == 1
    await call(http, "GET", f"{bk.url}/ping", session, headers={"Buildkite-Shard": "8", "X-Other": "dropped"})
    assert bk.header_violations()[-1].unexpected_headers == {"X-Other": "dropped"}


async def test_fault_status_with_retry_after(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    bk.fail("register", 429, times=2, retry_after=7)
    bk.fail("register", 503)
    body = {"name": "n", "meta_data": []}
    seen = []
    for _ in range(4):
        status, _, resp = await call(http, "POST", f"{bk.url}/register", bk.registration_token, body=body)
        seen.append((status, resp.headers.get("Retry-After")))
    assert seen == [(429, "7"), (429, "7"), (503, None), (200, None)]
    assert len(bk.agents) == 1  # the failed attempts had no effect
    assert [r.fault for r in bk.requests("register")] == ["status", "status", "status", None]


async def test_fault_401_on_job_state(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    bk.fail("job_state", 401, message="Invalid access token")
    status, payload, _ = await call(http, "GET", f"{bk.url}/jobs/{job['id']}", job["token"])
    assert (status, payload) == (401, {"message": "Invalid access token"})
    assert (await call(http, "GET", f"{bk.url}/jobs/{job['id']}", job["token"]))[0] == 200


async def test_fault_non_json_2xx(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    reg = await register_and_connect(http, bk)
    bk.non_json("heartbeat")
    status, payload, resp = await call(
        http, "POST", f"{bk.url}/heartbeat", reg["access_token"], body={"sent_at": "t"}
    )
    assert status == 200 and isinstance(payload, bytes) and resp.content_type == "text/html"
    assert bk.agents[reg["id"]].heartbeats == []


async def test_fault_delay_past_client_timeout(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    bk.delay("finish", 2.0)
    url = f"{bk.url}/jobs/{job['id']}/finish"
    with pytest.raises(asyncio.TimeoutError):
        await call(http, "PUT", url, job["token"], body=FINISH, timeout=0.3)
    # The slow call was processed: the retry meets "already finished".
    assert bk.job_state(job["id"]) == "finished"
    assert (await call(http, "PUT", url, job["token"], body=FINISH))[0] == 422
    assert len(bk.finishes(job["id"])) == 2


async def test_close_does_not_wait_for_injected_delays() -> None:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        async with BuildkiteEmulator() as bk:
            bk.delay("root", 600)
            with pytest.raises(asyncio.TimeoutError):
                await call(http, "GET", bk.root_url + "/", None, timeout=0.2)
            started = loop.time()
        assert loop.time() - started < 5


async def test_fault_delay_unprocessed(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    bk.delay("register", 0.3, processed=False)
    body = {"name": "n", "meta_data": []}
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await call(http, "POST", f"{bk.url}/register", bk.registration_token, body=body))[0] == 200
    assert loop.time() - started >= 0.3


async def test_fault_dropped_connection(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    bk.drop("chunks")
    with pytest.raises(aiohttp.ClientError):
        await upload(http, bk, job["id"], job["token"], 1, 0, b"abc")
    assert bk.chunks(job["id"]) == []
    assert await upload(http, bk, job["id"], job["token"], 1, 0, b"abc") == 201

    # aiohttp resends an idempotent method (PUT, GET) once by itself when the connection drops,
    # so two drops are needed for the caller to see the error.
    bk.drop("finish", processed=True, times=2)
    with pytest.raises(aiohttp.ClientError):
        await call(http, "PUT", f"{bk.url}/jobs/{job['id']}/finish", job["token"], body=FINISH)
    assert bk.job_state(job["id"]) == "finished"
    assert [r.status for r in bk.requests("finish")] == [None, None]
    assert len(bk.finishes(job["id"])) == 2


async def test_aiohttp_silently_resends_a_dropped_put(
    bk: BuildkiteEmulator, http: aiohttp.ClientSession
) -> None:
    # A finish that Buildkite recorded but whose answer was lost comes back, unasked, as a second
    # finish answered 422: the client sees "already finished" for its first and only call.
    _, job = await running_job(http, bk)
    bk.drop("finish", processed=True)
    status, _, _ = await call(http, "PUT", f"{bk.url}/jobs/{job['id']}/finish", job["token"], body=FINISH)
    assert status == 422
    assert [r.status for r in bk.requests("finish")] == [None, 422]


async def test_unknown_fault_endpoint_is_refused(bk: BuildkiteEmulator) -> None:
    with pytest.raises(ValueError):
        bk.fail("pings", 500)


def test_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BuildkiteEmulator(ping_interval=0)


# -- artifacts -----------------------------------------------------------------------------------


def declared(path: str, content: bytes, **override: Any) -> dict[str, Any]:
    return {"path": path, "absolute_path": f"/work/{path}", "glob_path": "*.txt", "file_size": len(content),
            "sha1sum": hashlib.sha1(content).hexdigest(), "sha256sum": hashlib.sha256(content).hexdigest(),
            "content_type": "text/plain", **override}


async def create(http: aiohttp.ClientSession, bk: BuildkiteEmulator, job: dict[str, Any],
                 artifacts: list[dict[str, Any]], batch_id: str = "batch-1") -> tuple[int, Any]:
    status, answer, _ = await call(http, "POST", f"{bk.url}/jobs/{job['id']}/artifacts", job["token"],
                                   body={"id": batch_id, "artifacts": artifacts, "upload_destination": ""},
                                   headers=SHARD)
    return status, answer


async def store(http: aiohttp.ClientSession, instructions: dict[str, Any], path: str, content: bytes, *,
                fields: dict[str, str] | None = None, file_field: str | None = None,
                headers: dict[str, str] | None = None) -> int:
    """A form upload as the instructions say, built by aiohttp rather than by the agent's code."""
    action = instructions["action"]
    form = aiohttp.FormData(quote_fields=False)
    data = fields if fields is not None else {k: v.replace("${artifact:path}", path)
                                              for k, v in instructions["data"].items()}
    for key, value in data.items():
        form.add_field(key, value)
    form.add_field(file_field or action["file_input"], content, filename=path,
                   content_type="application/octet-stream")
    url = action["url"].rstrip("/") + action["path"]
    async with http.request(action["method"], url, data=form, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_artifacts_are_created_stored_and_finished(bk: BuildkiteEmulator,
                                                        http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    files = {"out/a.txt": b"alpha\n", "b.txt": b"\x00\xff binary \r\n--not-a-boundary\r\n"}
    status, answer = await create(http, bk, job, [declared(p, c) for p, c in files.items()])
    assert status == 201 and answer["id"] == "batch-1" and len(answer["artifact_ids"]) == 2
    assert answer["per_artifact_instructions"] == {}
    template = answer["upload_instructions"]
    assert template["action"]["file_input"] == "file" and "${artifact:path}" in template["data"]["key"]
    # A retried create (same batch id) gets the same artifacts, and no new ones.
    assert (await create(http, bk, job, [declared(p, c) for p, c in files.items()]))[1] == answer
    for path, content in files.items():
        assert await store(http, template, path, content) == 204
    states = [{"id": i, "state": "finished"} for i in answer["artifact_ids"]]
    status, _, _ = await call(http, "PUT", f"{bk.url}/jobs/{job['id']}/artifacts", job["token"],
                              body={"artifacts": states}, headers=SHARD)
    assert status == 200
    assert [(a.path, a.state, a.content) for a in bk.job_artifacts(job["id"])] == [
        (p, "finished", c) for p, c in files.items()]


async def test_a_batch_create_is_checked_field_by_field(bk: BuildkiteEmulator,
                                                        http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    good = declared("a.txt", b"a")
    for bad in ({**good, "path": "/etc/passwd"}, {**good, "path": "x/../../y"},
                {**good, "absolute_path": "a.txt"}, {**good, "sha256sum": "A" * 64},
                {**good, "sha1sum": ""}, {**good, "file_size": -1}, {**good, "file_size": True},
                {k: v for k, v in good.items() if k != "glob_path"}):
        assert (await create(http, bk, job, [bad], batch_id=str(bad)))[0] == 422, bad
    assert (await create(http, bk, job, []))[0] == 422
    status, _, _ = await call(http, "POST", f"{bk.url}/jobs/{job['id']}/artifacts", job["token"],
                              body={"artifacts": [good]}, headers=SHARD)
    assert status == 422  # no batch id
    assert (await create(http, bk, job, [good], batch_id="same"))[0] == 201
    assert (await create(http, bk, job, [declared("b.txt", b"b")], batch_id="same"))[0] == 422
    # The session token is not the job's.
    status, _, _ = await call(http, "POST", f"{bk.url}/jobs/{job['id']}/artifacts", "bkaa_nope",
                              body={"id": "x", "artifacts": [good]}, headers=SHARD)
    assert status == 401
    assert [a.path for a in bk.job_artifacts(job["id"])] == ["a.txt"]


async def test_the_storage_takes_only_the_declared_content_through_the_granted_form(
        bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    content = b"the real thing\n"
    _, answer = await create(http, bk, job, [declared("r.txt", content)])
    template = answer["upload_instructions"]
    fields = {k: v.replace("${artifact:path}", "r.txt") for k, v in template["data"].items()}
    assert await store(http, template, "r.txt", b"something else\n") == 400
    assert await store(http, template, "r.txt", content + b"!") == 400
    assert await store(http, template, "r.txt", content, fields={**fields, "policy": "forged"}) == 403
    assert await store(http, template, "r.txt", content, fields={**fields, "key": "jobs/x/r.txt"}) == 403
    assert await store(http, template, "r.txt", content, file_field="upload") == 400
    # A request carrying the agent's token is refused: the form is the only credential.
    token = {"Authorization": f"Token {job['token']}"}
    assert await store(http, template, "r.txt", content, headers=token) == 400
    [artifact] = bk.job_artifacts(job["id"])
    assert artifact.content is None

    async def mark(artifact_id: str, state: str) -> int:
        status, _, _ = await call(http, "PUT", f"{bk.url}/jobs/{job['id']}/artifacts", job["token"],
                                  body={"artifacts": [{"id": artifact_id, "state": state}]})
        return status

    # Finished needs content; error does not; an unknown id is not found, an unknown state refused.
    assert await mark(artifact.id, "finished") == 422
    assert await mark("nope", "error") == 404
    assert await mark(artifact.id, "done") == 422
    assert await mark(artifact.id, "error") == 200 and artifact.state == "error"


async def test_per_artifact_instructions_and_upload_faults(bk: BuildkiteEmulator,
                                                           http: aiohttp.ClientSession) -> None:
    bk.per_artifact_instructions = True
    _, job = await running_job(http, bk)
    _, answer = await create(http, bk, job, [declared("a.txt", b"a"), declared("b.txt", b"b")])
    own = answer["per_artifact_instructions"]
    assert set(own) == set(answer["artifact_ids"])
    keys = {instructions["data"]["key"] for instructions in own.values()}
    assert len(keys) == 2 and not any("${" in key for key in keys)
    first = own[answer["artifact_ids"][0]]
    bk.fail("artifact_upload", 503)
    assert await store(http, first, "a.txt", b"a") == 503
    assert await store(http, first, "a.txt", b"a") == 204
    assert bk.job_artifacts(job["id"])[0].content == b"a"
    assert bk.job_artifacts(job["id"])[1].content is None


async def test_artifacts_only_while_the_job_runs(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    _, job = await running_job(http, bk)
    assert (await call(http, "PUT", f"{bk.url}/jobs/{job['id']}/finish", job["token"], body=FINISH))[0] == 200
    assert (await create(http, bk, job, [declared("late.txt", b"late")]))[0] == 422
