"""`hpc-runner remote`, run as a process against a real hub on loopback: tokens minted by the OIDC
issuer emulator and checked by the hub's verifier, an agent (`fakes.hub_agent`) leasing the job and
publishing its state and log through the hub's agent endpoints, and the CI systems' token services
emulated (`fakes.ci_token_endpoints`, the fake `buildkite-agent`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from fakes.ci_token_endpoints import BUILDKITE_AGENT, CiTokenEndpoints
from fakes.hub_agent import HubAgent
from fakes.oidc_issuer import COMMIT, OidcIssuerEmulator

from runner.gateway.callers import authenticator
from runner.gateway.server import GatewayServer, JobsApiSettings
from runner.gateway.tokens import parse_agent_tokens
from runner.oidc.binding import bound_audience
from runner.oidc.issuers import OidcIssuer
from runner.oidc.verify import TokenVerifier

REPO_ROOT = Path(__file__).resolve().parents[2]
AUDIENCE = "hpc-runner"
PUBLIC_URL = "https://hub.example.org"
AGENT_TOKEN = "agent-a-0123456789abcdef0123456789abcdef"
REPOSITORY = "CliMA/Oceananigans.jl"
JOB_TOML = """\
[job]
name = "unit"
image = "julia"
command = ["julia", "--project", "-e", "using Pkg; Pkg.test()"]

[job.resources]
nodes = 1
time = "10m"
"""
JOB_TABLE = tomllib.loads(JOB_TOML)["job"]
# What a job may write: not UTF-8, carriage returns, NULs, a last line without its newline.
LOG = [b"Testing Oceananigans\n", b"\x00\xff\xfe progress 10%\r progress 100%\r\n", b"done, no newline"]
# Variables of the CI system the tests run in, which would tell the client where its token is.
_CI_VARIABLES = ("ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "BUILDKITE", "GITHUB_",
                 "CI_", "HPC_RUNNER_")


@dataclass
class Remote:
    """The hub, its issuers, an agent for cluster `hpc1`, and the `hpc-runner remote` command."""

    url: str
    github: OidcIssuerEmulator
    agent: HubAgent
    http: aiohttp.ClientSession
    tmp: Path
    restart: Callable[[], Awaitable[None]]      # stop the hub and start it again on its port

    def token(self, **claims: Any) -> str:
        return self.github.mint("github", repository=REPOSITORY, repository_owner=REPOSITORY.split("/")[0],
                                actor="octocat", **({"aud": AUDIENCE} | claims))

    def token_file(self, token: str | None = None) -> Path:
        path = self.tmp / "token"
        path.write_text((token or self.token()) + "\n")
        path.chmod(0o600)
        return path

    def job_file(self) -> Path:
        path = self.tmp / "job.toml"
        path.write_text(JOB_TOML)
        return path

    async def start(self, *args: str, env: Mapping[str, str] | None = None) -> asyncio.subprocess.Process:
        base = {key: value for key, value in os.environ.items() if not key.startswith(_CI_VARIABLES)}
        base["PYTHONPATH"] = str(REPO_ROOT)
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runner", "remote", *args, "--hub", self.url, cwd=self.tmp,
            env=base | dict(env or {}), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def run(self, *args: str, env: Mapping[str, str] | None = None) -> tuple[int, bytes, str]:
        process = await self.start(*args, env=env)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out, err.decode()

    async def submit(self) -> str:
        async with self.http.post(self.url + "/api/v1/jobs", json={"job": JOB_TABLE},
                                  headers={"Authorization": f"Bearer {self.token()}"}) as response:
            assert response.status == 201
            return str((await response.json())["id"])


@pytest.fixture
async def issuers() -> AsyncIterator[tuple[OidcIssuerEmulator, OidcIssuerEmulator]]:
    async with OidcIssuerEmulator() as github, OidcIssuerEmulator(path="/buildkite") as buildkite:
        yield github, buildkite


@pytest.fixture
async def remote(tmp_path: Path, http: aiohttp.ClientSession,
                 issuers: tuple[OidcIssuerEmulator, OidcIssuerEmulator]) -> AsyncIterator[Remote]:
    github, buildkite = issuers
    verifier = TokenVerifier([
        OidcIssuer(name="github-actions", issuer=github.url, audience=AUDIENCE, kind="github"),
        OidcIssuer(name="buildkite", issuer=buildkite.url, audience=AUDIENCE, kind="buildkite",
                   organization="acme-inc")])
    settings = JobsApiSettings(public_url=PUBLIC_URL, authenticate=authenticator(verifier))
    tokens = parse_agent_tokens(f"login-a:{AGENT_TOKEN}\n", "tokens")
    servers = [GatewayServer(state_dir=tmp_path / "hub", webhook_secret=None, tokens=tokens,
                             jobs_api=settings)]
    await servers[0].start("127.0.0.1", 0)
    port = servers[0].port

    async def restart() -> None:
        await servers[-1].close()
        servers.append(GatewayServer(state_dir=tmp_path / "hub", webhook_secret=None, tokens=tokens,
                                     jobs_api=settings))
        await servers[-1].start("127.0.0.1", port)

    url = f"http://127.0.0.1:{port}"
    try:
        yield Remote(url, github, HubAgent(http, url, AGENT_TOKEN), http, tmp_path, restart)
    finally:
        await servers[-1].close()


async def run_job(agent: HubAgent, state: str, exit_status: int | None = None, *,
                  reasons: tuple[str, ...] = ()) -> dict[str, Any]:
    """Lease the next job, write LOG to it piece by piece as it runs, and end it in `state`."""
    leased = await agent.lease()
    assert leased is not None
    job_id = leased["id"]
    if state != "denied":
        await agent.publish(job_id, "running", slurm_job_id="4242")
        for piece in LOG:
            await agent.write(job_id, piece)
    await agent.publish(job_id, state, exit_status=exit_status, reasons=reasons)
    return leased


async def eventually(read: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await read()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return value


@pytest.mark.parametrize("state, exit_status, expected", [
    ("succeeded", 0, 0), ("failed", 3, 3), ("timed_out", None, 124), ("cancelled", None, 130)])
async def test_remote_run_streams_the_log_byte_exact_and_exits_with_the_jobs_status(
        remote: Remote, state: str, exit_status: int | None, expected: int) -> None:
    token = remote.token()
    running = asyncio.create_task(remote.run("run", str(remote.job_file()), "--cluster", "hpc1",
                                             "--token-file", str(remote.token_file(token))))
    leased = await run_job(remote.agent, state, exit_status)
    status, out, err = await running
    assert (status, out) == (expected, b"".join(LOG)), err
    assert (leased["job"], leased["cluster"], leased["repository"]) == (JOB_TABLE, "hpc1", REPOSITORY)
    assert f"job {leased['id']} queued: {PUBLIC_URL}/jobs/{leased['id']}" in err
    assert token not in err


async def test_remote_run_reads_on_from_its_offset_across_a_hub_restart(remote: Remote) -> None:
    process = await remote.start("run", str(remote.job_file()), "--token-file", str(remote.token_file()))
    leased = await remote.agent.lease()
    assert leased is not None and process.stdout is not None
    job_id = leased["id"]
    await remote.agent.publish(job_id, "running")
    await remote.agent.write(job_id, LOG[0])
    assert await asyncio.wait_for(process.stdout.readexactly(len(LOG[0])), 30) == LOG[0]
    await remote.restart()                   # the followed log's connection drops
    for piece in LOG[1:]:
        await remote.agent.write(job_id, piece)
    await remote.agent.publish(job_id, "succeeded", exit_status=0)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, LOG[0] + out) == (0, b"".join(LOG)), err


async def test_a_denied_job_exits_126_with_every_reason_on_stderr(remote: Remote) -> None:
    reasons = ("no grant lets github:repo:CliMA/Oceananigans.jl use the account climate",
               "the image julia is not in the policy")
    token = str(remote.token_file())
    running = asyncio.create_task(remote.run("run", str(remote.job_file()), "--token-file", token))
    await run_job(remote.agent, "denied", reasons=reasons)
    status, out, err = await running
    assert (status, out) == (126, b"")
    assert all(f"denied: {reason}" in err for reason in reasons), err


async def test_a_forged_token_exits_125_naming_the_hubs_error_and_nothing_is_queued(remote: Remote) -> None:
    status, out, err = await remote.run("run", str(remote.job_file()),
                                        "--token-file", str(remote.token_file(remote.token(forged=True))))
    assert (status, out) == (125, b"")
    assert "the hub refused the token (401)" in err and "signature" in err, err
    assert await remote.agent.lease(wait=0) is None


async def test_an_invalid_job_file_exits_125_with_the_parsers_message_and_asks_nobody(remote: Remote) -> None:
    job = remote.tmp / "job.toml"
    job.write_text(JOB_TOML.replace("nodes = 1", "nodes = 0"))
    status, _, err = await remote.run("run", str(job), "--token-file", str(remote.token_file()))
    assert status == 125
    assert "job.toml:7: job.resources.nodes: must be at least 1" in err, err


async def test_ctrl_c_cancels_the_job_through_the_hub_and_exits_130_once_it_reports_cancelled(
        remote: Remote) -> None:
    process = await remote.start("run", str(remote.job_file()), "--token-file", str(remote.token_file()))
    leased = await remote.agent.lease()
    assert leased is not None
    job_id = leased["id"]
    await remote.agent.publish(job_id, "running")
    await remote.agent.write(job_id, LOG[0])
    assert process.stdout is not None and process.stderr is not None
    assert await asyncio.wait_for(process.stdout.readexactly(len(LOG[0])), 30) == LOG[0]
    process.send_signal(signal.SIGINT)

    async def cancel_requested() -> bool:
        return bool((await remote.agent.view(job_id))["cancel_requested"])
    await eventually(cancel_requested, "the hub to get the cancel")
    assert process.returncode is None        # streaming on until the job ends
    await remote.agent.write(job_id, b"caught SIGTERM, cleaning up\n")
    await remote.agent.publish(job_id, "cancelled")
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130
    assert LOG[0] + out == LOG[0] + b"caught SIGTERM, cleaning up\n"
    assert f"cancelling job {job_id}" in err.decode()


async def test_inside_github_actions_the_token_is_asked_for_the_jobs_digest_bound_audience(
        remote: Remote, issuers: tuple[OidcIssuerEmulator, OidcIssuerEmulator]) -> None:
    github, buildkite = issuers
    claims = {"repository": REPOSITORY, "repository_owner": REPOSITORY.split("/")[0], "actor": "octocat"}
    async with CiTokenEndpoints(github=github, buildkite=buildkite, github_claims=claims) as endpoints:
        env = endpoints.github_env() | {"GITHUB_REPOSITORY": REPOSITORY, "GITHUB_SHA": COMMIT}
        running = asyncio.create_task(remote.run("run", str(remote.job_file()), env=env))
        leased = await run_job(remote.agent, "succeeded", 0)
        status, out, err = await running
    bound = bound_audience(AUDIENCE, JOB_TABLE)
    assert (status, out) == (0, b"".join(LOG)), err
    assert endpoints.audiences["github"] == [bound]
    assert jwt.decode(leased["token"], options={"verify_signature": False})["aud"] == bound
    assert (leased["repository"], leased["commit"]) == (REPOSITORY, COMMIT)
    assert endpoints.request_token not in err


async def test_inside_buildkite_the_agent_is_asked_for_the_jobs_digest_bound_audience(
        remote: Remote, issuers: tuple[OidcIssuerEmulator, OidcIssuerEmulator]) -> None:
    github, buildkite = issuers
    async with CiTokenEndpoints(github=github, buildkite=buildkite) as endpoints:
        env = endpoints.buildkite_env() | {"PATH": f"{BUILDKITE_AGENT.parent}:{os.environ['PATH']}",
                                           "BUILDKITE_REPO": "git@github.com:acme-inc/super-duper-app.git",
                                           "BUILDKITE_COMMIT": COMMIT}
        running = asyncio.create_task(remote.run("run", str(remote.job_file()), env=env))
        leased = await run_job(remote.agent, "failed", 7)
        status, out, err = await running
    bound = bound_audience(AUDIENCE, JOB_TABLE)
    assert (status, out) == (7, b"".join(LOG)), err
    assert endpoints.audiences["buildkite"] == [bound]
    claims = jwt.decode(leased["token"], options={"verify_signature": False})
    assert (claims["aud"], claims["organization_slug"], leased["commit"]) == (bound, "acme-inc", COMMIT)


async def test_without_a_token_source_remote_run_says_where_one_comes_from(remote: Remote) -> None:
    status, _, err = await remote.run("run", str(remote.job_file()))
    assert status == 125
    assert "--token-file or --token-env" in err


async def test_remote_status_logs_and_cancel_with_a_token_from_a_variable(remote: Remote) -> None:
    job_id = await remote.submit()
    env = {"HPC_ID_TOKEN": remote.token()}
    token = ("--token-env", "HPC_ID_TOKEN")
    leased = await remote.agent.lease()
    assert leased is not None and leased["id"] == job_id
    await remote.agent.publish(job_id, "running", slurm_job_id="4242")
    await remote.agent.write(job_id, LOG[0])

    status, out, err = await remote.run("status", job_id, "--json", *token, env=env)
    view = json.loads(out)
    assert (status, view["id"], view["state"], view["slurm_job_id"]) == (0, job_id, "running", "4242"), err
    assert await remote.run("logs", job_id, *token, env=env) == (0, LOG[0], "")

    following = asyncio.create_task(remote.run("logs", job_id, "--follow", *token, env=env))
    status, _, err = await remote.run("cancel", job_id, *token, env=env)
    assert status == 0 and "cancel requested" in err
    assert (await remote.agent.view(job_id))["cancel_requested"] is True
    await remote.agent.write(job_id, LOG[1])
    await remote.agent.publish(job_id, "cancelled")
    assert await following == (0, LOG[0] + LOG[1], "")

    status, out, _ = await remote.run("status", job_id, *token, env=env)
    assert status == 0 and "state: cancelled" in out.decode()
    status, _, err = await remote.run("status", "0" * 26, *token, env=env)
    assert status == 125 and "(404)" in err
