"""`hpc-runner gateway` as a real process: refusing bad setups, SIGKILL without loss, SIGTERM, SIGHUP;
and the same process as `hpc-runner hub`, serving the jobs API.

No Slurm here: the gateway runs where GitHub can reach it, far from the cluster. Webhooks are the
official examples of ``@octokit/webhooks-examples``, signed as GitHub signs them; the agents are
the real client; tokens of the jobs API come from the OIDC issuer emulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from fakes.github_webhooks import SECRET, Example, examples, new_delivery_id, send
from fakes.oidc_issuer import OidcIssuerEmulator

from runner.sources.github.gateway_client import Delivery, GatewayClient, GatewayError

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "login-node-token-0123456789abcdef0123456789abcdef"
NEW_TOKEN = "rotated-token-fedcba9876543210fedcba9876543210"
START_TIMEOUT_S = 20.0


@dataclass
class Site:
    root: Path
    port: int

    @property
    def config(self) -> Path:
        return self.root / "gateway.toml"

    @property
    def secret_file(self) -> Path:
        return self.root / "webhook-secret"

    @property
    def tokens_file(self) -> Path:
        return self.root / "agent-tokens"

    @property
    def state_dir(self) -> Path:
        return self.root / "gateway-state"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, *, secret: str = SECRET, tokens: str = f"login-1:{TOKEN}\n",
              section: bool = True, issuer: str | None = None, public_url: str = "https://hub.example.org",
              extra: str = "") -> None:
        """A `[gateway]` section as before; with `issuer`, a `[hub]` section serving the jobs API
        to tokens of that issuer at `public_url`; `extra` (more tables) after it."""
        write_secret(self.secret_file, secret + "\n")
        write_secret(self.tokens_file, tokens)
        gateway = f"""
[{"gateway" if issuer is None else "hub"}]
listen = "127.0.0.1:{self.port}"
webhook_secret_file = "{self.secret_file}"
agent_tokens_file = "{self.tokens_file}"
state_dir = "{self.state_dir}"
"""
        if issuer is not None:
            gateway += f"""public_url = "{public_url}"

[[oidc]]
name = "github-actions"
issuer = "{issuer}"
audience = "hpc-runner"
kind = "github"
"""
        agent = f'state_dir = "{self.root / "agent-state"}"\n'
        self.config.write_text(agent + (gateway if section else "") + extra)


def write_secret(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


class GatewayProcess:
    """One `hpc-runner gateway` (or `hub`) process, its stderr (JSON log lines) in a file."""

    def __init__(self, site: Site, log: Path, command: str = "gateway") -> None:
        self.site = site
        self.log = log
        with open(log, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runner", command, "--config", str(site.config)],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    async def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while True:
                exited = self.proc.poll()
                assert exited is None, f"gateway exited {exited}: {self.log.read_text()}"
                try:
                    async with http.get(self.site.url + "/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not start listening"
                await asyncio.sleep(0.05)

    async def exit_status(self, timeout: float = 10.0) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def site(tmp_path: Path, unused_tcp_port: int) -> Site:
    found = Site(tmp_path, unused_tcp_port)
    found.write()
    return found


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for process in started:
        process.kill()


Start = Callable[[], Awaitable[GatewayProcess]]


@pytest.fixture
async def start(site: Site, processes: list[GatewayProcess], tmp_path: Path) -> Start:
    async def start_one() -> GatewayProcess:
        process = GatewayProcess(site, tmp_path / f"gateway-{len(processes)}.log")
        processes.append(process)
        await process.ready()
        return process
    return start_one


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def until_polling(http: aiohttp.ClientSession, site: Site) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with http.get(site.url + "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            if (await r.json())["agents_polling"]:
                return
        assert time.monotonic() < deadline, "the agent never started polling"
        await asyncio.sleep(0.02)


def run_gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runner", "gateway", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


# --- refusing to start ---

def test_refuses_to_start_without_a_config() -> None:
    result = run_gateway()
    assert result.returncode == 1
    assert "refusing to start the gateway: it needs --config FILE" in result.stderr


def test_refuses_to_start_without_a_gateway_section(site: Site) -> None:
    site.write(section=False)
    result = run_gateway("--config", str(site.config))
    assert result.returncode == 1
    assert f"{site.config} has no [gateway] section" in result.stderr


def test_refuses_a_webhook_secret_open_to_others(site: Site) -> None:
    site.secret_file.chmod(0o644)
    result = run_gateway("--config", str(site.config))
    assert result.returncode == 1
    assert f"GitHub webhook secret {site.secret_file} is open to group or others" in result.stderr
    assert f"chmod 600 {site.secret_file}" in result.stderr
    assert SECRET not in result.stderr and not site.state_dir.exists()


def test_refuses_a_missing_agent_tokens_file(site: Site) -> None:
    site.tokens_file.unlink()
    result = run_gateway("--config", str(site.config))
    assert result.returncode == 1
    assert f"gateway's agent tokens {site.tokens_file} does not exist" in result.stderr


def test_refuses_a_malformed_agent_tokens_file_naming_the_line(site: Site) -> None:
    site.write(tokens=f"# agents\nlogin-1 {TOKEN}\n")
    result = run_gateway("--config", str(site.config))
    assert result.returncode == 1
    assert f"{site.tokens_file}:2: is not NAME:TOKEN" in result.stderr
    assert TOKEN not in result.stderr


def test_refuses_a_short_webhook_secret(site: Site) -> None:
    site.write(secret="hunter2")
    result = run_gateway("--config", str(site.config))
    assert result.returncode == 1
    assert "shorter than 16 characters" in result.stderr and "openssl rand -hex 32" in result.stderr


async def test_refuses_a_port_in_use(site: Site, start: Start) -> None:
    await start()
    result = await asyncio.to_thread(run_gateway, "--config", str(site.config))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{site.port}" in result.stderr


# --- running ---

async def test_a_gateway_killed_with_sigkill_loses_no_queued_or_leased_delivery(
        site: Site, start: Start, http: aiohttp.ClientSession) -> None:
    gateway = await start()
    sent: dict[str, Example] = {}
    for example in examples("pull_request", "issue_comment", "push", "check_run")[::3]:
        delivery_id = new_delivery_id()
        answer = await send(http, site.url + "/webhook", example.event, example.body, delivery_id=delivery_id)
        assert answer.status == 202
        sent[delivery_id] = example
    async with GatewayClient(site.url, TOKEN, lease_seconds=2) as agent:
        done = await agent.next_delivery(wait_seconds=0)
        leased = await agent.next_delivery(wait_seconds=0)
        assert done is not None and leased is not None
        await agent.acknowledge(done)

        gateway.proc.send_signal(signal.SIGKILL)
        assert await gateway.exit_status() == -signal.SIGKILL
        await start()

        # The acknowledged one is remembered: GitHub redelivering it changes nothing.
        answer = await send(http, site.url + "/webhook", sent[done.delivery_id].event,
                            sent[done.delivery_id].body, delivery_id=done.delivery_id)
        assert (answer.status, answer.json["result"]) == (200, "duplicate")
        received: dict[str, Delivery] = {}
        while len(received) < len(sent) - 1:
            delivery = await agent.next_delivery(wait_seconds=5)
            assert delivery is not None, f"lost: {set(sent) - set(received) - {done.delivery_id}}"
            assert delivery.delivery_id not in received
            received[delivery.delivery_id] = delivery
            await agent.acknowledge(delivery)
        assert await agent.next_delivery(wait_seconds=0) is None
    assert set(received) == set(sent) - {done.delivery_id}
    for delivery_id, delivery in received.items():
        assert delivery.payload == sent[delivery_id].payload
    # The one leased before the kill came back once its lease ran out.
    assert received[leased.delivery_id].attempt == 2


async def test_sigterm_stops_the_gateway_cleanly_and_ends_long_polls(
        site: Site, start: Start, http: aiohttp.ClientSession) -> None:
    gateway = await start()
    async with GatewayClient(site.url, TOKEN) as agent:
        poll = asyncio.create_task(agent.next_delivery(wait_seconds=30))
        await until_polling(http, site)
        stopped_at = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        assert await gateway.exit_status() == 0
        with pytest.raises(GatewayError):
            await poll
    assert time.monotonic() - stopped_at < 5.0
    events = [entry["event"] for entry in gateway.log_events()]
    assert events[-2:] == ["gateway stopping", "gateway stopped"]


async def test_sighup_rereads_the_agent_tokens(site: Site, start: Start, http: aiohttp.ClientSession) -> None:
    gateway = await start()
    write_secret(site.tokens_file, f"login-2:{NEW_TOKEN}\n")
    gateway.proc.send_signal(signal.SIGHUP)

    async def status(token: str) -> int:
        async with http.get(site.url + "/api/v1/status", headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status

    deadline = time.monotonic() + 10
    while await status(NEW_TOKEN) != 200:
        assert time.monotonic() < deadline, "the new token was never accepted"
        await asyncio.sleep(0.05)
    assert await status(TOKEN) == 401

    # A broken file is not taken: the tokens in force stay.
    write_secret(site.tokens_file, "broken\n")
    os.kill(gateway.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any(entry["event"] == "agent tokens not reloaded; the old ones stay in force"
                  for entry in gateway.log_events()):
        assert time.monotonic() < deadline, "the broken tokens file was not reported"
        await asyncio.sleep(0.05)
    assert await status(NEW_TOKEN) == 200


# --- the hub ---

async def test_gateway_still_starts_and_hub_serves_the_jobs_api_from_the_same_config(
        site: Site, processes: list[GatewayProcess], tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with OidcIssuerEmulator() as issuer:
        site.write(issuer=issuer.url)
        token = issuer.mint("github", aud="hpc-runner", repository="CliMA/Oceananigans.jl",
                            repository_owner="CliMA")
        authorization = {"Authorization": f"Bearer {token}"}
        submitted: list[str] = []
        for command in ("gateway", "hub"):
            process = GatewayProcess(site, tmp_path / f"{command}.log", command)
            processes.append(process)
            await process.ready()
            body = {"job": {"name": "unit", "image": "julia", "command": ["true"]}}
            async with http.post(site.url + "/api/v1/jobs", json=body, headers=authorization) as response:
                answer = await response.json()
                assert response.status == 201, answer
            submitted.insert(0, answer["id"])
            async with http.get(f"{site.url}/api/v1/jobs/{answer['id']}", headers=authorization) as response:
                view = await response.json()
                assert (response.status, view["state"], view["url"]) == (
                    200, "queued", f"https://hub.example.org/jobs/{answer['id']}")
            # The one state dir: the job the gateway took is still there for the hub.
            async with http.get(site.url + "/api/v1/jobs", headers=authorization) as response:
                assert [job["id"] for job in (await response.json())["jobs"]] == submitted
            process.proc.send_signal(signal.SIGTERM)
            assert await process.exit_status() == 0
            events = [entry["event"] for entry in process.log_events()]
            assert events[-2:] == [f"{command} stopping", f"{command} stopped"]
            assert token not in process.log.read_text()


def test_the_hub_refuses_to_start_without_its_section_or_an_issuer(site: Site) -> None:
    site.write(section=False)
    result = run_gateway("--config", str(site.config))
    assert f"{site.config} has no [gateway] section" in result.stderr
    result = subprocess.run([sys.executable, "-m", "runner", "hub", "--config", str(site.config)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"refusing to start the hub: {site.config} has no [hub] section" in result.stderr
    site.write(issuer="https://token.actions.githubusercontent.com")
    site.config.write_text(site.config.read_text().split("[[oidc]]")[0])
    result = subprocess.run([sys.executable, "-m", "runner", "hub", "--config", str(site.config)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "add an [[oidc]] table" in result.stderr
