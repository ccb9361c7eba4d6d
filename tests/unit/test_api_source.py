"""The API source against a real hub on loopback, tokens of the OIDC issuer emulator, a stand-in
agent (no Slurm) and real git.

What a caller of the hub's API would see: a job of a granted repository runs from a real checkout
and its log arrives byte-exact; a denial carries every reason; and what must never happen: a job
run on a token this agent does not trust itself (whatever the hub trusts), a token bound to
another job, a token judged long after its life. A cancel at the hub reaches the job, and a restart
of either side loses nothing of the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TEST_IMAGE_NAME, git, image_table, policy_document, toml_table, wait_until
from fakes.github_api import GitHubEmulator
from fakes.oidc_issuer import OidcIssuerEmulator
from structlog.testing import capture_logs

import runner.lifecycle.driver as driver_module
from runner.agent import Agent
from runner.config import AgentConfig, ApiConfig
from runner.gateway.access import owner_keys
from runner.gateway.callers import authenticator
from runner.gateway.jobs_protocol import TERMINAL
from runner.gateway.jobstore import JobStore, NewJob
from runner.gateway.server import GatewayServer, JobsApiSettings
from runner.gateway.tokens import parse_agent_tokens
from runner.oidc.binding import bound_audience
from runner.oidc.issuers import OidcIssuer
from runner.oidc.verify import TokenVerifier
from runner.site_policy import load_site_policy
from runner.sources import JobHost
from runner.sources.api.checkout import AppCheckoutTokens
from runner.sources.api.client import HubClient
from runner.sources.api.source import ApiSource
from runner.sources.api.state import ApiState
from runner.sources.github.appauth import AppAuth
from runner.sources.github.client import GitHubClient
from runner.store import Store

from .buildkite_host import FakeHost, host_policy
from .github_site import GitRepo
from .oidc_trust import AUDIENCE, trusted
from .test_agent import SHA256, FakeExecutor, fake_prepare
from .test_github_checkout import GitServer

AGENT_TOKEN = "agent-a-0123456789abcdef0123456789abcdef"
REPOSITORY = "octo-org/octo-repo"
CLUSTER = "hpc1"
JOB = {"name": "unit", "image": TEST_IMAGE_NAME, "command": ["make", "test"], "resources": {"time": "5m"}}
POLICY = host_policy(toml_table("[[grants]]", name="octo", principals=[f"github:repo:{REPOSITORY}"],
                                account="ci", images=[TEST_IMAGE_NAME]))


@dataclass
class Running:
    source: ApiSource
    task: asyncio.Task[None]


@dataclass
class Site:
    root: Path
    issuer: OidcIssuerEmulator
    http: aiohttp.ClientSession
    repo: GitRepo
    commit: str
    host: FakeHost
    kind: str = "github"                    # the kind of tokens the hub and the agent trust
    hub_clock: Callable[[], float] = time.time
    hub: GatewayServer | None = None
    port: int = 0
    running: list[Running] = field(default_factory=list)
    clients: list[HubClient] = field(default_factory=list)
    states: list[ApiState] = field(default_factory=list)

    @property
    def hub_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start_hub(self) -> None:
        """The hub, trusting the emulator's tokens; again on the same port and state after a stop."""
        verifier = TokenVerifier([trusted(self.issuer, self.kind)], clock=self.hub_clock)
        settings = JobsApiSettings(public_url="https://hub.example.org", authenticate=authenticator(verifier))
        self.hub = GatewayServer(state_dir=self.root / "hub-state", webhook_secret=None, jobs_api=settings,
                                 tokens=parse_agent_tokens(f"login-a:{AGENT_TOKEN}\n", "tokens"),
                                 clock=self.hub_clock)
        await self.hub.start("127.0.0.1", self.port)
        self.port = self.hub.port

    async def stop_hub(self) -> None:
        assert self.hub is not None
        await self.hub.close()

    def token(self, repository: str = REPOSITORY, **claims: Any) -> str:
        """A GitHub Actions token of `repository` at the repository's commit (or a token of a site's
        identity provider), for the audience, issued as the hub's clock says it is now."""
        claims.setdefault("now", self.hub_clock())
        if self.kind == "generic":
            return self.issuer.mint("generic", **({"aud": AUDIENCE} | claims))
        return self.issuer.mint("github", repository=repository, repository_owner=repository.split("/")[0],
                                sha=self.commit, **({"aud": AUDIENCE} | claims))

    async def call(self, method: str, path: str, *, token: str | None = None, body: Any = None
                   ) -> tuple[int, Any, bytes]:
        headers = {"Authorization": f"Bearer {token or self.token()}"}
        async with self.http.request(method, self.hub_url + path, json=body, headers=headers) as response:
            raw = await response.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            return response.status, parsed, raw

    async def submit(self, job: dict[str, Any] = JOB, *, token: str | None = None, **body: Any) -> str:
        status, answer, _ = await self.call("POST", "/api/v1/jobs", token=token, body={"job": job, **body})
        assert status == 201, answer
        return str(answer["id"])

    async def view(self, job_id: str, token: str | None = None) -> dict[str, Any]:
        status, answer, _ = await self.call("GET", f"/api/v1/jobs/{job_id}", token=token)
        assert status == 200, answer
        return dict(answer)

    async def ended(self, job_id: str, token: str | None = None) -> dict[str, Any]:
        """The job's view at the hub (as the holder of `token` sees it) once it has a final state."""
        views: list[dict[str, Any]] = []

        async def poll() -> None:
            while True:
                view = await self.view(job_id, token)
                if view["state"] in TERMINAL:
                    views.append(view)
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), 20)
        return views[0]

    async def log(self, job_id: str, token: str | None = None) -> bytes:
        status, _, raw = await self.call("GET", f"/api/v1/jobs/{job_id}/log", token=token)
        assert status == 200
        return raw

    def start_source(self, *, issuers: list[OidcIssuer] | None = None, max_queue_age: int = 3600,
                     host: JobHost | None = None, state_dir: Path | None = None,
                     checkout_url: str | None = None, tokens: AppCheckoutTokens | None = None) -> Running:
        """The API source for `host` (by default the site's stand-in agent), its state in `state_dir`,
        trusting `issuers` (by default the emulator)."""
        host = host or self.host
        config = ApiConfig(hub_url=self.hub_url, hub_token_file=self.root / "unused", cluster=CLUSTER,
                           checkout_url=checkout_url or f"{self.root}/repos/{{repository}}.git",
                           max_queue_age=max_queue_age)
        client = HubClient(self.hub_url, AGENT_TOKEN, wait_seconds=1, retry_initial=0.02)
        state = ApiState.open(state_dir or self.host.root / "state")
        self.clients.append(client)
        self.states.append(state)
        source = ApiSource(config, host, client=client, state=state,
                           verifier=TokenVerifier(issuers if issuers is not None
                                                  else [trusted(self.issuer, self.kind)]),
                           slots=4, cancel_interval=0.02, tokens=tokens)
        running = Running(source, asyncio.create_task(source.serve()))
        self.running.append(running)
        return running

    def local_log(self, job_id: str) -> bytes:
        [record] = [r for r in self.host.store.list_jobs() if r.external_id == job_id]
        return self.host.log_path(record.id).read_bytes()


@contextlib.asynccontextmanager
async def api_site(tmp_path: Path, http: aiohttp.ClientSession, *, policy: str = POLICY, kind: str = "github",
                   hub_clock: Callable[[], float] = time.time) -> AsyncIterator[Site]:
    async with OidcIssuerEmulator() as issuer:
        repo = GitRepo(tmp_path / "repos" / REPOSITORY.split("/")[0])
        # The bare repository is where checkout_url points for the repository's path.
        repo.bare.rename(tmp_path / "repos" / f"{REPOSITORY}.git")
        repo.bare = tmp_path / "repos" / f"{REPOSITORY}.git"
        commit = repo.commit({"data.txt": "from the repository\n"})
        site = Site(tmp_path, issuer, http, repo, commit, FakeHost(tmp_path / "site", policy), kind=kind,
                    hub_clock=hub_clock)
        await site.start_hub()
        try:
            yield site
        finally:
            site.host.draining.set()
            for running in site.running:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(running.task, 20)
            for client in site.clients:
                await client.close()
            for state in site.states:
                state.close()
            if site.hub is not None:
                await site.hub.close()
            site.host.store.close()


@pytest.fixture
async def site(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Site]:
    async with api_site(tmp_path, http) as made:
        yield made


# -- running ----------------------------------------------------------------------------------


async def test_a_granted_repositorys_job_runs_from_its_checkout_and_its_log_reaches_the_hub_byte_exact(
        site: Site) -> None:
    site.host.outputs["unit"] = [b"compiling\n", "caf\u00e9 \u2713\n".encode(), b"\x1b[32mall passed\x1b[0m",
                                 b"\n"]
    site.start_source()
    job_id = await site.submit(cluster=CLUSTER)

    view = await site.ended(job_id)

    assert (view["state"], view["exit_status"], view["account"], view["grant"], view["reasons"]) == (
        "succeeded", 0, "ci", "octo", [])
    assert view["started"] is not None and view["ended"] is not None
    [record] = site.host.store.list_jobs()
    assert record.source == "api" and record.external_id == job_id
    assert record.identity["repository"] == REPOSITORY and record.identity["commit"] == site.commit
    workspace = site.host.root / "work" / record.id / "workspace"
    assert (workspace / "data.txt").read_text() == "from the repository\n"
    log = await site.log(job_id)
    assert log == site.local_log(job_id)
    opening = f"hpc-runner: API job {job_id} of the hub, submitted as github:user:octocat"
    assert log.startswith(opening.encode())
    assert f"repository {REPOSITORY} at commit {site.commit}".encode() in log
    assert log.endswith(b"".join(site.host.outputs["unit"]))


async def test_a_job_without_a_repository_runs_in_an_empty_workspace(tmp_path: Path,
                                                                      http: aiohttp.ClientSession) -> None:
    policy = host_policy(toml_table("[[grants]]", name="people", principals=["idp:user:alice"], account="ci",
                                    images=[TEST_IMAGE_NAME]))
    # The hub and the agent trust the emulator as a site's identity provider: its tokens name a
    # user, and no repository.
    async with api_site(tmp_path, http, policy=policy, kind="generic") as site:
        site.start_source()
        job_id = await site.submit()

        view = await site.ended(job_id)

        assert view["state"] == "succeeded", view
        [record] = site.host.store.list_jobs()
        workspace = site.host.root / "work" / record.id / "workspace"
        assert workspace.is_dir() and list(workspace.iterdir()) == []
        log = await site.log(job_id)
        assert b"submitted as idp:user:alice" in log
        assert b"no repository (an empty workspace)" in log and b"checking out" not in log


@contextlib.asynccontextmanager
async def private_repository(site: Site, *, installed: bool = True) -> AsyncIterator[GitServer]:
    """The site's repository private on a GitHub (the REST emulator, with the App installed on it or
    not) that serves git only to the App's installation tokens, and the API source started with
    `checkout_url` on it."""
    async with GitHubEmulator() as github:
        github.add_repository(REPOSITORY, installation=1 if installed else None, private=True)
        git("update-server-info", cwd=site.repo.bare)
        server = GitServer(site.root / "repos", accepts=github.tokens.__contains__)
        await server.start()
        try:
            auth = AppAuth(github.app_id, github.app_private_key_pem)
            tokens = AppCheckoutTokens(auth, GitHubClient(site.http, api_url=github.url, auth=auth),
                                       api_url=github.url)
            # Git is served on the GitHub's own host (127.0.0.1), so the App's token goes to it.
            site.start_source(checkout_url=f"{server.base}/{{repository}}.git", tokens=tokens)
            yield server
        finally:
            await server.close()


async def test_a_private_repository_is_checked_out_with_the_github_apps_token(site: Site) -> None:
    async with private_repository(site) as server:
        job_id = await site.submit(cluster=CLUSTER)
        view = await site.ended(job_id)

    assert view["state"] == "succeeded", view
    [record] = site.host.store.list_jobs()
    workspace = site.host.root / "work" / record.id / "workspace"
    assert (workspace / "data.txt").read_text() == "from the repository\n"
    assert server.authorizations and all(server.authorizations)
    log = await site.log(job_id)
    assert b"x-access-token" not in log and b"ghs_" not in log


async def test_a_private_repository_the_app_is_not_installed_on_fails_saying_why(site: Site) -> None:
    async with private_repository(site, installed=False):
        job_id = await site.submit(cluster=CLUSTER)
        view = await site.ended(job_id)

    assert view["state"] == "infra_failed", view
    log = await site.log(job_id)
    assert f"hpc-runner: the GitHub App has no token for {REPOSITORY}".encode() in log
    assert b"checking out without credentials" in log and b"could not fetch commit" in log


# -- what the policy decides ------------------------------------------------------------------


async def test_an_ungranted_repository_is_denied_at_the_hub_with_every_reason(site: Site) -> None:
    token = site.token("octo-org/other-repo")
    site.start_source()
    job_id = await site.submit(token=token)

    view = await site.ended(job_id, token)

    assert view["state"] == "denied" and view["exit_status"] is None
    [record] = site.host.store.list_jobs()
    assert view["reasons"] == record.decision["reasons"] and view["reasons"]   # type: ignore[index]
    assert site.host.ran == []
    log = await site.log(job_id, token)
    assert b"hpc-runner: denied by policy:\n" in log
    assert all(f"  - {reason}\n".encode() in log for reason in view["reasons"])


# -- what the agent trusts --------------------------------------------------------------------


async def test_a_token_the_hub_trusts_and_the_agent_does_not_never_runs_and_is_refused_with_the_reason(
        site: Site) -> None:
    async with OidcIssuerEmulator() as other:
        site.start_source(issuers=[trusted(other)])
        job_id = await site.submit()

        view = await site.ended(job_id)

    assert view["state"] == "denied"
    [reason] = view["reasons"]
    assert reason == f"this agent does not accept the job's token: issuer {site.issuer.url} is not trusted"
    assert await site.log(job_id) == f"hpc-runner: refused: {reason}\n".encode()
    assert site.host.store.list_jobs() == [] and site.host.ran == []


def slip_into_hub(site: Site, token: str, job: dict[str, Any]) -> str:
    """A job put straight into the hub's store, as a hub that was broken into could: nothing the
    hub's own checks refused."""
    identity = {"source": "github", "repository": REPOSITORY}
    with JobStore.open(site.root / "hub-state") as store:
        stored = store.submit(NewJob(job=job, identity=identity, principals=(f"github:repo:{REPOSITORY}",),
                                     owner_keys=owner_keys([f"github:repo:{REPOSITORY}"]), cluster=CLUSTER,
                                     repository=REPOSITORY, commit=site.commit, issuer="test-github",
                                     token=token))
    return stored.id


async def test_a_token_bound_to_one_job_is_refused_with_another(site: Site) -> None:
    bound = site.token(aud=bound_audience(AUDIENCE, JOB))
    other = JOB | {"command": ["rm", "-rf", "/data"]}
    job_id = slip_into_hub(site, bound, other)
    site.start_source()

    view = await site.ended(job_id)

    assert view["state"] == "denied"
    [reason] = view["reasons"]
    assert reason.startswith("this agent does not accept the job's token: the token is bound to job digest "
                             "sha256:")
    assert site.host.store.list_jobs() == []


async def test_a_token_bound_to_its_own_job_runs(site: Site) -> None:
    site.start_source()
    job_id = await site.submit(token=site.token(aud=bound_audience(AUDIENCE, JOB)))
    assert (await site.ended(job_id))["state"] == "succeeded"


async def test_expiry_is_judged_against_when_the_hub_received_the_job_within_the_maximum_queue_age(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The hub's clock is 20 minutes behind: to the agent, every job waited that long.
    ago = 1200.0
    async with api_site(tmp_path, http, hub_clock=lambda: time.time() - ago) as site:
        # A token that was good when the hub received the job, and has expired since: it runs.
        running = site.start_source(max_queue_age=3600)
        fresh_then = await site.submit(token=site.token(now=time.time() - ago - 10))
        # A token that had expired when the hub received it (no hub of ours would take it).
        expired_then = slip_into_hub(site, site.token(now=time.time() - 1000), JOB)
        fresh_view, expired_view = await site.ended(fresh_then), await site.ended(expired_then)
        site.host.draining.set()
        await running.task
        # Another agent, that judges no token the hub received more than 15 minutes ago.
        site.host.draining.clear()
        site.start_source(max_queue_age=900)
        too_old = await site.submit(token=site.token(now=time.time() - ago - 10))
        too_old_view = await site.ended(too_old)

    assert fresh_view["state"] == "succeeded"
    assert expired_view["state"] == "denied"
    assert expired_view["reasons"][0].startswith("this agent does not accept the job's token: expired at ")
    assert too_old_view["state"] == "denied"
    assert too_old_view["reasons"][0].startswith("the job waited 20m")
    assert "longer than this agent's hub_max_queue_age (15m)" in too_old_view["reasons"][0]
    assert len(site.host.ran) == 1


# -- cancel and restarts ----------------------------------------------------------------------


async def test_a_cancel_through_the_hubs_delete_reaches_the_running_job(site: Site) -> None:
    site.host.hold["unit"] = asyncio.Event()
    site.start_source()
    job_id = await site.submit()
    await wait_until(lambda: site.host.ran, "the job to run")
    await wait_until_async(lambda: site.view(job_id), lambda view: view["state"] == "running")

    status, answer, _ = await site.call("DELETE", f"/api/v1/jobs/{job_id}")
    assert status == 202, answer

    view = await site.ended(job_id)
    assert view["state"] == "cancelled"
    log = await site.log(job_id)
    assert b"hpc-runner: cancelled through the hub's API\n" in log
    assert log == site.local_log(job_id)


async def test_a_hub_restarted_mid_job_gets_the_whole_log_byte_exact(site: Site) -> None:
    release = asyncio.Event()
    site.host.hold["unit"] = release
    site.host.outputs["unit"] = [f"line {i}\n".encode() * 50 for i in range(20)]
    site.start_source()
    job_id = await site.submit()
    await wait_until(lambda: site.host.ran, "the job to run")
    await wait_until_async(lambda: site.log(job_id), lambda log: b"line 19\n" in log)

    with capture_logs() as logs:
        await site.stop_hub()
        site.host.note(site.host.ran[0], "written while the hub was down\n")
        release.set()
        await wait_until(lambda: any(e["event"] == "the hub did not answer; trying again" for e in logs),
                         "the agent to find the hub down")
        await site.start_hub()
        view = await site.ended(job_id)

    assert view["state"] == "succeeded"
    log = await site.log(job_id)
    assert log == site.local_log(job_id)
    assert log.count(b"line 0\n" * 50) == 1 and b"written while the hub was down\n" in log


async def test_a_restarted_agent_carries_on_the_log_from_the_hubs_length_and_ends_once(site: Site) -> None:
    site.host.hold["unit"] = asyncio.Event()
    site.host.outputs["unit"] = [f"before {i}\n".encode() * 20 for i in range(20)]
    first = site.start_source()
    job_id = await site.submit()
    await wait_until(lambda: site.host.ran, "the job to run")
    await wait_until_async(lambda: site.log(job_id), lambda log: b"before 19\n" in log)
    # The agent dies: its tasks stop wherever they are.
    first.task.cancel()
    await asyncio.gather(first.task, return_exceptions=True)
    record_id = site.host.ran[0]
    site.host.store.close()
    with site.host.log_path(record_id).open("ab") as handle:
        handle.write(b"written while the agent was down\n")

    second_host = FakeHost(site.root / "site", POLICY)
    second_host.outputs["unit"] = site.host.outputs["unit"]
    site.host = second_host
    site.start_source(host=second_host)
    view = await site.ended(job_id)

    assert view["state"] == "succeeded"
    log = await site.log(job_id)
    assert log == second_host.log_path(record_id).read_bytes()
    assert log.count(b"before 0\n" * 20) == 1 and log.endswith(b"written while the agent was down\n")
    assert second_host.ran == []            # followed again, not run a second time


async def test_the_real_agent_publishes_each_state_in_order_and_a_cancel_at_the_hub_reaches_its_executor(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_module, "prepare_job", fake_prepare)
    root = site.root / "agent"
    root.mkdir()
    (root / "policy.toml").write_text(policy_document(
        toml_table("[accounts.ci]", slurm_account="ci", partitions=["local"], max_time="1h"),
        image_table("/images/test.sif", SHA256),
        toml_table("[[grants]]", name="octo", principals=[f"github:repo:{REPOSITORY}"], account="ci",
                   images=[TEST_IMAGE_NAME])))
    config = AgentConfig(state_dir=root / "state", work_root=root / "work", policy=root / "policy.toml",
                         executor="local", max_jobs=2)
    executor = FakeExecutor()
    with Store.open(config.state_dir) as store:
        agent = Agent(config, load_site_policy(config), store, grace_seconds=1, executor=executor)
        agent.start()
        try:
            with capture_logs() as logs:
                site.start_source(host=agent, state_dir=config.state_dir)
                job_id = await site.submit()
                await wait_until(lambda: executor.started, "the job to start")
                running = await wait_until_async(lambda: site.view(job_id), lambda v: v["state"] == "running")
                status, _, _ = await site.call("DELETE", f"/api/v1/jobs/{job_id}")
                assert status == 202
                view = await site.ended(job_id)
            [record] = store.list_jobs()
            local_log = (config.work_root / record.id / "output.log").read_bytes()
        finally:
            agent.drain()
            agent.drain()
            await agent.stop_workers()

    assert (running["account"], running["grant"]) == ("ci", "octo")
    assert view["state"] == "cancelled" and view["reasons"] == ["cancelled"]
    published = [entry["state"] for entry in logs if entry["event"] == "api job state"]
    assert published == ["queued", "queued", "running", "cancelled"]
    log = await site.log(job_id)
    assert log == local_log and b"hpc-runner: cancelled through the hub's API\n" in log


async def wait_until_async(read: Callable[[], Any], check: Callable[[Any], bool],
                           timeout: float = 20.0) -> Any:
    """Await `read()` until `check` holds for what it gives, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if check(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; last seen: {value!r}"[:500])
        await asyncio.sleep(0.02)
