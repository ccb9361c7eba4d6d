"""The hub's jobs API over HTTP, in process: tokens minted by an OIDC issuer emulator and checked by
the real verifier, jobs leased and published by agents over their agent tokens, logs read back
byte-exact, and a restarted hub that still holds everything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.oidc_issuer import COMMIT, OidcIssuerEmulator
from structlog.testing import capture_logs

from runner.gateway import jobs_protocol as protocol
from runner.gateway.callers import authenticator
from runner.gateway.jobs_protocol import MAX_SUBMISSION_BYTES
from runner.gateway.server import GatewayServer, JobsApiSettings
from runner.gateway.tokens import parse_agent_tokens
from runner.oidc.binding import bound_audience
from runner.oidc.issuers import OidcIssuer
from runner.oidc.verify import TokenVerifier

AUDIENCE = "hpc-runner"
PUBLIC_URL = "https://hub.example.org"
TOKEN_A = "agent-a-0123456789abcdef0123456789abcdef"
TOKEN_B = "agent-b-fedcba9876543210fedcba9876543210"
TOKENS = parse_agent_tokens(f"login-a:{TOKEN_A}\nlogin-b:{TOKEN_B}\n", "tokens")
REPOSITORY = "CliMA/Oceananigans.jl"
JOB = {"name": "unit", "image": "julia", "command": ["julia", "--project", "-e", "using Pkg; Pkg.test()"],
       "resources": {"nodes": 1, "time": "10m"}}


@dataclass
class Hub:
    server: GatewayServer
    url: str
    issuer: OidcIssuerEmulator
    http: aiohttp.ClientSession

    def token(self, repository: str = REPOSITORY, *, actor: str = "octocat", **claims: Any) -> str:
        """A GitHub Actions token of `repository`, for the hub's audience unless `claims` say otherwise."""
        return self.issuer.mint("github", repository=repository, repository_owner=repository.split("/")[0],
                                actor=actor, **({"aud": AUDIENCE} | claims))

    async def call(self, method: str, path: str, *, token: str | None = None, agent: str | None = None,
                   body: Any = None, data: bytes | None = None) -> tuple[int, Any, bytes]:
        """One request: its status, its JSON (or None) and its raw body."""
        headers = {}
        if token is not None or agent is not None:
            headers["Authorization"] = f"Bearer {token if token is not None else agent}"
        raw = data if data is not None else (None if body is None else json.dumps(body).encode())
        if raw is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(method, self.url + path, data=raw, headers=headers) as response:
            content = await response.read()
            try:
                parsed = json.loads(content) if content else None
            except ValueError:
                parsed = None
            return response.status, parsed, content

    async def submit(self, token: str | None = None, **body: Any) -> dict[str, Any]:
        status, answer, _ = await self.call("POST", "/api/v1/jobs", token=token or self.token(),
                                            body={"job": JOB, **body})
        assert status == 201, answer
        assert isinstance(answer, dict)
        return answer

    async def lease(self, agent: str = TOKEN_A, cluster: str = "hpc1",
                    wait: int = 0) -> dict[str, Any] | None:
        status, answer, _ = await self.call(
            "POST", f"/api/v1/agent/jobs/lease?cluster={cluster}&wait={wait}", agent=agent)
        assert status in (200, 204), answer
        return answer if status == 200 else None

    async def publish(self, job_id: str, state: str, agent: str = TOKEN_A, **fields: Any) -> tuple[int, Any]:
        status, answer, _ = await self.call("POST", protocol.agent_state_path(job_id), agent=agent,
                                            body=protocol.state_body(state, **fields))
        return status, answer

    async def append(self, job_id: str, offset: int, data: bytes, agent: str = TOKEN_A) -> tuple[int, Any]:
        status, answer, _ = await self.call("POST", f"{protocol.agent_log_path(job_id)}?offset={offset}",
                                            agent=agent, data=data)
        return status, answer

    async def polling(self) -> list[str]:
        _, status, _ = await self.call("GET", "/api/v1/status", agent=TOKEN_A)
        return list(status["agents_polling"])


StartHub = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuerEmulator]:
    async with OidcIssuerEmulator() as emulator:
        yield emulator


@pytest.fixture
async def start_hub(tmp_path: Path, issuer: OidcIssuerEmulator,
                    http: aiohttp.ClientSession) -> AsyncIterator[StartHub]:
    started: list[GatewayServer] = []

    async def start(state_dir: Path = tmp_path / "hub-state") -> Hub:
        trusted = OidcIssuer(name="github-actions", issuer=issuer.url, audience=AUDIENCE, kind="github")
        verifier = TokenVerifier([trusted])
        settings = JobsApiSettings(public_url=PUBLIC_URL, authenticate=authenticator(verifier))
        server = GatewayServer(state_dir=state_dir, webhook_secret=None, tokens=TOKENS, jobs_api=settings)
        await server.start("127.0.0.1", 0)
        started.append(server)
        return Hub(server, f"http://127.0.0.1:{server.port}", issuer, http)

    yield start
    for server in started:
        await server.close()


@pytest.fixture
async def hub(start_hub: StartHub) -> Hub:
    return await start_hub()


# --- submitting and looking ---

async def test_a_submitted_job_is_queued_and_shown_to_its_repository(hub: Hub) -> None:
    with capture_logs() as logs:
        answer = await hub.submit(cluster="hpc1")
    job_id = answer["id"]
    assert answer == {"id": job_id, "url": f"{PUBLIC_URL}/jobs/{job_id}", "state": "queued"}
    status, view, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}", token=hub.token(actor="someone-else"))
    assert status == 200
    assert set(view) == set(protocol.VIEW_FIELDS)
    assert {key: view[key] for key in ("id", "state", "exit_status", "reasons", "cluster", "account", "grant",
                                       "slurm_job_id", "started", "ended", "url")} == {
        "id": job_id, "state": "queued", "exit_status": None, "reasons": [], "cluster": "hpc1",
        "account": None, "grant": None, "slurm_job_id": None, "started": None, "ended": None,
        "url": answer["url"]}
    assert view["created"].endswith("Z")
    status, listing, _ = await hub.call("GET", "/api/v1/jobs", token=hub.token())
    assert (status, [job["id"] for job in listing["jobs"]], listing["next"]) == (200, [job_id], None)
    # The agent gets the job exactly as submitted, and the token and what the token names.
    token = hub.token()
    job_id = (await hub.submit(token))["id"]
    leased = await hub.lease()
    assert leased is not None and leased["id"] != job_id
    leased = await hub.lease()
    assert leased is not None
    assert (leased["id"], leased["job"], leased["token"], leased["repository"], leased["commit"],
            leased["issuer"], leased["cluster"]) == (job_id, JOB, token, REPOSITORY, COMMIT, "github-actions",
                                                     None)
    assert all(token not in json.dumps(entry) for entry in logs)


@pytest.mark.parametrize("attack", ["forged", "expired", "wrong audience", "wrong issuer", "alg none",
                                    "unknown kid", "no token", "not a jwt"])
async def test_a_token_failing_verification_is_401_with_its_reason_and_nothing_is_stored(
        attack: str, hub: Hub) -> None:
    tokens = {
        "forged": lambda: hub.token(forged=True),
        "expired": lambda: hub.issuer.mint("github", aud=AUDIENCE, now=1_700_000_000),
        "wrong audience": lambda: hub.token(aud="https://github.com/CliMA"),
        "wrong issuer": lambda: hub.token(iss="https://token.actions.githubusercontent.com"),
        "alg none": lambda: hub.issuer.mint("github", aud=AUDIENCE, alg="none"),
        "unknown kid": lambda: hub.issuer.mint("github", aud=AUDIENCE, kid="rsa-999"),
        "no token": lambda: None,
        "not a jwt": lambda: "hunter2",
    }
    token = tokens[attack]()
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with hub.http.post(hub.url + "/api/v1/jobs", json={"job": JOB}, headers=headers) as response:
        answer = await response.json()
        assert response.status == 401, answer
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert answer["error"]
    assert await hub.lease(cluster="hpc1") is None
    assert (await hub.call("GET", "/api/v1/jobs", token=hub.token()))[1] == {"jobs": [], "next": None}


@pytest.mark.parametrize("body, field, words", [
    ({"job": {k: v for k, v in JOB.items() if k != "image"}}, "job.image",
     "request body: job.image: is required"),
    ({"job": JOB | {"resources": {"nodes": 0}}}, "job.resources.nodes", "must be at least 1"),
    ({"job": JOB | {"walltime": "1h"}}, "job.walltime", "walltime"),
    ({"job": JOB, "callback_url": "https://x"}, "callback_url", "unknown field(s) 'callback_url'"),
    ({"job": JOB, "repository": "Other/Repo"}, "repository", "contradicts the token"),
    ({"job": JOB, "commit": "f" * 40}, "commit", "contradicts the token"),
    ({"jobs": [JOB]}, "jobs", "unknown field(s) 'jobs'"),
])
async def test_an_invalid_submission_is_400_naming_the_field(body: dict[str, Any], field: str, words: str,
                                                             hub: Hub) -> None:
    status, answer, _ = await hub.call("POST", "/api/v1/jobs", token=hub.token(), body=body)
    assert (status, answer["field"]) == (400, field)
    assert words in answer["error"]
    assert await hub.lease(cluster="hpc1") is None


async def test_deep_or_malformed_json_is_400_and_a_large_body_413(hub: Hub) -> None:
    for data, words in ((b'{"job": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
                        (b'{"job": {"name": "a", "name": "b"}}', "twice"), (b'{"job": }', "not JSON")):
        status, answer, _ = await hub.call("POST", "/api/v1/jobs", token=hub.token(), data=data)
        assert status == 400 and words in answer["error"]
    large = json.dumps({"job": JOB | {"script": "x" * MAX_SUBMISSION_BYTES}}).encode()
    status, answer, _ = await hub.call("POST", "/api/v1/jobs", token=hub.token(), data=large)
    assert status == 413 and str(MAX_SUBMISSION_BYTES) in answer["error"]

    async def chunks() -> AsyncIterator[bytes]:    # no Content-Length: the limit holds while reading
        for start in range(0, len(large), 1 << 18):
            yield large[start:start + (1 << 18)]
    async with hub.http.post(hub.url + "/api/v1/jobs", data=chunks(),
                             headers={"Authorization": f"Bearer {hub.token()}"}) as response:
        assert response.status == 413
    assert await hub.lease(cluster="hpc1") is None


async def test_a_digest_bound_token_submits_its_own_job_and_no_other(hub: Hub) -> None:
    bound = hub.token(aud=bound_audience(AUDIENCE, JOB))
    same_job_reordered = dict(reversed(list(JOB.items())))
    status, answer, _ = await hub.call("POST", "/api/v1/jobs", token=bound, body={"job": same_job_reordered})
    assert status == 201, answer
    other = JOB | {"command": ["rm", "-rf", "/"]}
    status, answer, _ = await hub.call("POST", "/api/v1/jobs", token=bound, body={"job": other})
    assert status == 401 and "bound to job digest sha256:" in answer["error"]
    leased = await hub.lease(cluster="hpc1")
    assert leased is not None and leased["job"] == same_job_reordered
    assert await hub.lease(cluster="hpc1") is None


# --- who may see and cancel ---

async def test_another_repositorys_token_gets_404_and_the_accounts_admins_see_the_job(hub: Hub) -> None:
    job_id = (await hub.submit())["id"]
    stranger = hub.token("CliMA/ClimaCore.jl")
    for method, path in (("GET", f"/api/v1/jobs/{job_id}"), ("GET", f"/api/v1/jobs/{job_id}/log"),
                         ("DELETE", f"/api/v1/jobs/{job_id}")):
        status, answer, _ = await hub.call(method, path, token=stranger)
        assert status == 404 and "no job" in answer["error"]
    assert (await hub.call("GET", "/api/v1/jobs", token=stranger))[1]["jobs"] == []
    status, answer, _ = await hub.call("GET", "/api/v1/jobs/0000000000000", token=hub.token())
    assert status == 404

    # The agent's decision names the account's admins: a token of theirs now sees the job.
    leased = await hub.lease(cluster="hpc1")
    assert leased is not None
    assert (await hub.publish(job_id, "denied", account="clima", reasons=("no grant for this event",),
                              admins=("github:repo:CliMA/*",)))[0] == 200
    status, view, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}", token=stranger)
    assert (status, view["state"], view["reasons"], view["account"]) == (200, "denied",
                                                                         ["no grant for this event"], "clima")
    listing = (await hub.call("GET", "/api/v1/jobs", token=stranger))[1]
    assert [job["id"] for job in listing["jobs"]] == [job_id]


async def test_members_of_the_account_see_the_job_and_may_not_cancel_it_others_get_404(hub: Hub) -> None:
    job_id = (await hub.submit())["id"]
    assert await hub.lease(cluster="hpc1") is not None
    assert (await hub.publish(job_id, "running", account="clima", admins=("github:team:CliMA/leads",),
                              members=("github:repo:CliMA/ClimaCore.jl",)))[0] == 200
    await hub.append(job_id, 0, b"step 1\n")
    member = hub.token("CliMA/ClimaCore.jl")
    status, view, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}", token=member)
    assert (status, view["state"], view["account"]) == (200, "running", "clima")
    assert (await hub.call("GET", f"/api/v1/jobs/{job_id}/log", token=member))[2] == b"step 1\n"
    assert [job["id"] for job in (await hub.call("GET", "/api/v1/jobs", token=member))[1]["jobs"]] == [job_id]
    status, answer, _ = await hub.call("DELETE", f"/api/v1/jobs/{job_id}", token=member)
    assert status == 403
    assert answer["error"] == f"only its submitter and its account's admins may cancel job {job_id}"
    agent_view = (await hub.call("GET", protocol.agent_job_path(job_id), agent=TOKEN_A))[1]
    assert agent_view["cancel_requested"] is False

    # A member of another account: no such job, in the list or by its id.
    other = hub.token("Ocean/Model.jl")
    for method, path in (("GET", f"/api/v1/jobs/{job_id}"), ("GET", f"/api/v1/jobs/{job_id}/log"),
                         ("DELETE", f"/api/v1/jobs/{job_id}")):
        assert (await hub.call(method, path, token=other))[0] == 404, (method, path)
    assert (await hub.call("GET", "/api/v1/jobs", token=other))[1]["jobs"] == []

    # Its submitter cancels it.
    status, view, _ = await hub.call("DELETE", f"/api/v1/jobs/{job_id}", token=hub.token())
    assert (status, view["state"]) == (202, "running")
    assert (await hub.call("GET", protocol.agent_job_path(job_id), agent=TOKEN_A))[1]["cancel_requested"]


async def test_the_list_is_paginated_newest_first(hub: Hub) -> None:
    ids = [(await hub.submit())["id"] for _ in range(5)]
    _, page, _ = await hub.call("GET", "/api/v1/jobs?limit=2", token=hub.token())
    assert [job["id"] for job in page["jobs"]] == ids[:2:-1] and page["next"] == ids[3]
    _, page, _ = await hub.call("GET", f"/api/v1/jobs?limit=2&before={page['next']}", token=hub.token())
    assert [job["id"] for job in page["jobs"]] == [ids[2], ids[1]]
    _, page, _ = await hub.call("GET", f"/api/v1/jobs?limit=2&before={page['next']}", token=hub.token())
    assert [job["id"] for job in page["jobs"]] == [ids[0]] and page["next"] is None
    for query in ("limit=0", "limit=x", "before=../x"):
        assert (await hub.call("GET", f"/api/v1/jobs?{query}", token=hub.token()))[0] == 400


async def test_deleting_a_queued_job_cancels_it_at_once_and_a_taken_one_asks_its_agent(hub: Hub) -> None:
    waiting = (await hub.submit())["id"]
    status, view, _ = await hub.call("DELETE", f"/api/v1/jobs/{waiting}", token=hub.token())
    assert (status, view["state"]) == (202, "cancelled") and view["ended"] is not None
    assert await hub.lease(cluster="hpc1") is None

    running = (await hub.submit())["id"]
    assert await hub.lease(cluster="hpc1") is not None
    await hub.publish(running, "running", slurm_job_id="77")
    status, view, _ = await hub.call("DELETE", f"/api/v1/jobs/{running}", token=hub.token())
    assert (status, view["state"]) == (202, "running")
    status, agent_view, _ = await hub.call("GET", protocol.agent_job_path(running), agent=TOKEN_A)
    assert (status, agent_view) == (200, {"id": running, "state": "running", "cancel_requested": True,
                                          "log_length": 0})
    await hub.publish(running, "cancelled", exit_status=143)
    view = (await hub.call("GET", f"/api/v1/jobs/{running}", token=hub.token()))[1]
    assert (view["state"], view["exit_status"], view["slurm_job_id"]) == ("cancelled", 143, "77")


# --- agents, states and logs ---

async def test_a_waiting_agent_gets_a_job_as_soon_as_it_is_submitted(hub: Hub) -> None:
    poll = asyncio.create_task(hub.lease(wait=30))

    async def until_polling() -> None:
        while "login-a" not in await hub.polling():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(until_polling(), 5)
    job_id = (await hub.submit(cluster="hpc1"))["id"]
    leased = await asyncio.wait_for(poll, 5)    # woken by the job, well before its 30 s
    assert leased is not None and leased["id"] == job_id


async def test_a_log_published_in_pieces_is_read_back_byte_exact_from_any_offset_and_followed(
        hub: Hub) -> None:
    job_id = (await hub.submit())["id"]
    assert await hub.lease(cluster="hpc1") is not None
    await hub.publish(job_id, "running")
    pieces = [b"starting\n", b"\x00\x01\xff\xfe raw bytes\r\n", "µs ünïcode ✓\n".encode(), b"x" * 300_000,
              b"no newline at the end"]
    whole = b""
    follower = asyncio.create_task(read_log(hub, job_id, follow=True))
    for piece in pieces:
        status, answer = await hub.append(job_id, len(whole), piece)
        assert (status, answer) == (200, {"length": len(whole) + len(piece)})
        whole += piece
    # The same append again, as after a lost answer: nothing changes.
    assert await hub.append(job_id, 0, pieces[0]) == (200, {"length": len(whole)})
    # A gap is refused with the length to resume from.
    status, answer = await hub.append(job_id, len(whole) + 5, b"later")
    assert (status, answer["length"]) == (409, len(whole)) and "gap" in answer["error"]
    assert not follower.done()
    await hub.publish(job_id, "succeeded", exit_status=0)
    assert await asyncio.wait_for(follower, 10) == whole
    for offset in (0, 1, 9, 10, len(whole) - 1, len(whole), len(whole) + 100):
        assert await read_log(hub, job_id, offset=offset) == whole[offset:]
    assert await read_log(hub, job_id, offset=3, follow=True) == whole[3:]   # ended: no waiting


async def read_log(hub: Hub, job_id: str, *, offset: int = 0, follow: bool = False) -> bytes:
    query = f"?offset={offset}" + ("&follow=1" if follow else "")
    async with hub.http.get(f"{hub.url}/api/v1/jobs/{job_id}/log{query}",
                            headers={"Authorization": f"Bearer {hub.token()}"}) as response:
        assert response.status == 200
        return await response.read()


async def test_only_the_agent_holding_a_job_publishes_it(hub: Hub) -> None:
    job_id = (await hub.submit())["id"]
    assert await hub.lease(TOKEN_A, cluster="hpc1") is not None
    assert (await hub.publish(job_id, "running", agent=TOKEN_B))[0] == 409
    assert (await hub.append(job_id, 0, b"x", agent=TOKEN_B))[0] == 409
    assert (await hub.publish("0000000000000", "running"))[0] == 404
    status, answer = await hub.publish(job_id, "running")
    assert (status, answer["state"]) == (200, "running")
    assert (await hub.publish(job_id, "succeeded", exit_status=0))[0] == 200
    assert (await hub.publish(job_id, "succeeded"))[0] == 200        # repeated: harmless
    status, answer = await hub.publish(job_id, "failed")
    assert status == 409 and "already ended succeeded" in answer["error"]
    status, answer, _ = await hub.call("POST", protocol.agent_state_path(job_id), agent=TOKEN_A,
                                       body={"state": "failed", "admins": ["nobody"]})
    assert status == 400 and "admins" in answer["error"]


async def test_agent_endpoints_need_an_agent_token_and_the_jobs_api_an_oidc_token(hub: Hub) -> None:
    job_id = (await hub.submit())["id"]
    for method, path in (("POST", "/api/v1/agent/jobs/lease?cluster=hpc1&wait=0"),
                         ("GET", protocol.agent_job_path(job_id)),
                         ("POST", protocol.agent_state_path(job_id)),
                         ("POST", protocol.agent_log_path(job_id)), ("PUT", protocol.agent_job_path(job_id))):
        for token in (None, hub.token()):
            status, _, _ = await hub.call(method, path, token=token, body={})
            assert status == 401, (method, path)
    assert (await hub.call("GET", f"/api/v1/jobs/{job_id}", agent=TOKEN_A))[0] == 401
    assert (await hub.call("POST", "/api/v1/agent/jobs/lease?wait=0", agent=TOKEN_A))[0] == 400


async def test_an_agent_registers_a_job_of_its_other_sources_and_publishes_it(hub: Hub) -> None:
    from runner.identity import Identity
    job_id = "01jz0a1b2c3d4"
    body = protocol.registration_body(JOB, Identity(source="github", repository=REPOSITORY, actor="octocat",
                                                    event="pull_request"), "hpc1", commit=COMMIT)
    status, answer, _ = await hub.call("PUT", protocol.agent_job_path(job_id), agent=TOKEN_A, body=body)
    assert (status, answer["state"]) == (201, "queued")
    assert (await hub.call("PUT", protocol.agent_job_path(job_id), agent=TOKEN_A, body=body))[0] == 200
    assert (await hub.call("PUT", protocol.agent_job_path(job_id), agent=TOKEN_B, body=body))[0] == 409
    assert await hub.lease(TOKEN_B, cluster="hpc1") is None
    assert (await hub.append(job_id, 0, b"from a pull request\n"))[0] == 200
    await hub.publish(job_id, "succeeded", exit_status=0)
    view = (await hub.call("GET", f"/api/v1/jobs/{job_id}", token=hub.token()))[1]
    assert (view["state"], view["url"]) == ("succeeded", f"{PUBLIC_URL}/jobs/{job_id}")
    assert await read_log(hub, job_id) == b"from a pull request\n"


async def test_a_restarted_hub_keeps_its_jobs_and_logs(start_hub: StartHub, tmp_path: Path) -> None:
    first = await start_hub(tmp_path / "kept")
    running = (await first.submit())["id"]
    waiting = (await first.submit())["id"]
    assert (await first.lease(cluster="hpc1"))["id"] == running   # type: ignore[index]
    await first.publish(running, "running")
    await first.append(running, 0, b"before the restart\n")
    await first.server.close()

    second = await start_hub(tmp_path / "kept")
    assert await second.append(running, 0, b"before the restart\nafter it\n") == (200, {"length": 28})
    await second.publish(running, "succeeded", exit_status=0)
    assert await read_log(second, running) == b"before the restart\nafter it\n"
    view = (await second.call("GET", f"/api/v1/jobs/{waiting}", token=second.token()))[1]
    assert view["state"] == "queued"
    # The lease the first hub gave on `running` was taken for good; `waiting` is still to lease.
    assert (await second.lease(TOKEN_B, cluster="hpc1"))["id"] == waiting   # type: ignore[index]


async def test_without_a_webhook_secret_no_webhook_is_taken(hub: Hub) -> None:
    status, _, _ = await hub.call("POST", "/webhook", data=b"{}")
    assert status == 404
