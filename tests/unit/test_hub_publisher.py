"""Every job of an agent with `hub_url` published to the hub: the real agent (with the fake executor
of `test_agent`, so each state change happens when the test says) and a real hub on loopback.

What the hub must end up with: a local-queue job's states and its whole log, byte-exact, also when
the agent restarts in the middle of the job or the hub is down for a while; why a job pends in
Slurm and the nodes it was given (with the Slurm executor over scripted Slurm commands, read by
its real parsing); and a GitHub check run's "details" link on the hub's page of the job.
"""

from __future__ import annotations

import dataclasses
import getpass
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from conftest import wait_until
from structlog.testing import capture_logs

import runner.lifecycle.driver as driver_module
from runner.agent import Agent
from runner.config import AgentConfig, GithubConfig
from runner.executors.slurm import SlurmCli, SlurmExecutor
from runner.executors.slurm.cli import CommandResult
from runner.gateway.access import Access, access_of, caller_keys
from runner.gateway.callers import authenticator
from runner.gateway.jobs_protocol import job_url
from runner.gateway.jobstore import JobStore, StoredJob
from runner.gateway.server import GatewayServer, JobsApiSettings
from runner.gateway.tokens import parse_agent_tokens
from runner.identity import Identity
from runner.job import JobRecord, JobState, new_job_id
from runner.lifecycle.prepare import job_dir
from runner.localqueue.board import AgentBoard
from runner.oidc.verify import TokenVerifier
from runner.site_policy import load_site_policy
from runner.sources.api.client import HubClient
from runner.sources.api.publish import (
    HubPublisher,
    hub_page_template,
    hub_pages,
    hub_public_url,
    source_link,
)
from runner.sources.api.published import PublishedState
from runner.sources.buildkite.source import job_page
from runner.spec import JobSpec
from runner.store import Store
from runner.web.board import Viewer

from .github_site import REPO, github_site
from .test_agent import ALICE, POLICY, FakeExecutor, fake_prepare, job

AGENT_TOKEN = "agent-a-0123456789abcdef0123456789abcdef"
CLUSTER = "hpc1"
PUBLIC_URL = "https://hub.example.org"


@dataclass
class Hub:
    """A real hub on loopback; stopped and started again on the same port and state."""

    state_dir: Path
    server: GatewayServer | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        settings = JobsApiSettings(public_url=PUBLIC_URL, authenticate=authenticator(TokenVerifier([])))
        self.server = GatewayServer(state_dir=self.state_dir, webhook_secret=None, jobs_api=settings,
                                    tokens=parse_agent_tokens(f"login-a:{AGENT_TOKEN}\n", "tokens"))
        await self.server.start("127.0.0.1", self.port)
        self.port = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def job(self, job_id: str) -> tuple[StoredJob | None, bytes]:
        """What the hub holds of the job, and its log (read from the hub's own store)."""
        with JobStore.open(self.state_dir) as store:
            held = store.get(job_id)
            return held, (store.read_log(job_id, 0, 1 << 30) if held is not None else b"")


@dataclass
class Node:
    """The agent on its store in `root`, its jobs published to `hub_url`; started again on the same
    state after a stop, as a restarted agent is."""

    root: Path
    hub_url: str
    executor: FakeExecutor = field(default_factory=FakeExecutor)
    slurm: SlurmExecutor | None = None      # None: jobs run on the fake local executor
    agent: Agent | None = None
    parts: list[Store | PublishedState | HubClient] = field(default_factory=list)
    publisher: HubPublisher | None = None

    @property
    def config(self) -> AgentConfig:
        return AgentConfig(state_dir=self.root / "state", work_root=self.root / "work",
                           policy=self.root / "policy.toml", executor="local", max_jobs=2)

    def start(self) -> Agent:
        self.root.mkdir(exist_ok=True)
        (self.root / "policy.toml").write_text(POLICY)
        store = Store.open(self.config.state_dir)
        self.executor = FakeExecutor()
        agent = Agent(self.config, load_site_policy(self.config), store, grace_seconds=1,
                      executor=self.executor, slurm=self.slurm)
        client = HubClient(self.hub_url, AGENT_TOKEN, retry_initial=0.02)
        state = PublishedState.open(self.config.state_dir)
        self.parts = [client, state, store]
        self.publisher = HubPublisher(client, state, cluster=CLUSTER, job=agent.job,
                                      log_path=agent.driver.log_path, policy=lambda: agent.policy,
                                      cancel=agent.cancel_from_hub, cancel_interval=0.02)
        self.publisher.attach(agent.admissions, agent.driver)
        agent.start()
        self.agent = agent
        return agent

    async def stop(self) -> None:
        """Stop at once, as a killed agent would: a running job stays running in the store."""
        assert self.agent is not None and self.publisher is not None
        await self.publisher.close()
        await self.agent.stop_workers()
        for part in self.parts:
            if isinstance(part, HubClient):
                await part.close()
            else:
                part.close()
        self.agent = None

    async def submit(self, *, identity: Identity = ALICE, spec: JobSpec | None = None) -> JobRecord:
        assert self.agent is not None
        workspace = self.root / "workspace"
        workspace.mkdir(exist_ok=True)
        record, _ = await self.agent.submit(identity, spec or job(), workspace, submitter_uid=None)
        return record

    def log_path(self, job_id: str) -> Path:
        return job_dir(self.config, job_id) / "output.log"

    def write(self, job_id: str, data: bytes) -> None:
        """What the job writes to its log."""
        with self.log_path(job_id).open("ab") as handle:
            handle.write(data)

    def state(self, job_id: str) -> JobState | None:
        assert self.agent is not None
        record = self.agent.job(job_id)
        return None if record is None else record.state


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    made = Hub(tmp_path / "hub-state")
    await made.start()
    yield made
    await made.stop()


@pytest.fixture
async def node(tmp_path: Path, hub: Hub, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Node]:
    monkeypatch.setattr(driver_module, "prepare_job", fake_prepare)
    made = Node(tmp_path / "agent", hub.url)
    yield made
    if made.agent is not None:
        made.agent.drain()
        made.agent.drain()
        await made.stop()


async def ended_at_hub(hub: Hub, job_id: str) -> tuple[StoredJob, bytes]:
    """The job at the hub once it has its final state."""
    def ended() -> tuple[StoredJob, bytes] | None:
        held, log = hub.job(job_id)
        return (held, log) if held is not None and held.ended_for_good else None
    return await wait_until(ended, f"job {job_id}'s final state at the hub")  # type: ignore[no-any-return]


async def test_a_local_queue_jobs_states_and_log_reach_the_hub_byte_exact(hub: Hub, node: Node) -> None:
    node.start()
    record = await node.submit()
    await wait_until(lambda: record.id in node.executor.started and node.state(record.id) == JobState.running,
                     "the job to start")
    await wait_until(lambda: (hub.job(record.id)[0] or record).state == "running", "running at the hub")
    node.write(record.id, b"compiling\n")
    node.write(record.id, "caf\u00e9 \u2713\n".encode() + b"\x1b[32mall passed\x1b[0m\x00\xff\n")
    node.executor.release(record.id)

    held, log = await ended_at_hub(hub, record.id)

    assert (held.state, held.exit_status, held.account, held.grant, held.cluster) == (
        "succeeded", 0, "esm", "esm-members", CLUSTER)
    assert held.origin == "agent" and held.lease_agent == "login-a"
    assert held.identity == ALICE.to_json() and held.job["name"] == "job"
    assert held.started is not None and held.ended is not None
    assert log == node.log_path(record.id).read_bytes()
    assert b"\x00\xff\n--- what ran\n" in log
    # The publisher closes the job once the hub took its end: a moment after the hub shows it.
    publisher = node.publisher
    assert publisher is not None
    await wait_until(lambda: publisher.state.open_jobs() == [], "the publisher to close the job")


async def test_the_hub_shows_a_local_jobs_name_source_actor_members_and_why_it_waits(hub: Hub,
                                                                                     node: Node) -> None:
    node.start()
    running = [await node.submit() for _ in range(2)]
    waiting = await node.submit()           # the agent runs two at a time: this one waits its turn
    await wait_until(lambda: all(record.id in node.executor.started for record in running),
                     "two jobs to start")

    def queued_at_hub() -> StoredJob | None:
        held = hub.job(waiting.id)[0]
        return held if held is not None and held.account is not None else None
    held = await wait_until(queued_at_hub, "the waiting job's state at the hub")
    assert (held.state, held.state_reason) == ("queued", "waiting for a free slot on the agent")
    assert (held.name, held.source, held.actor, held.source_label, held.source_url) == (
        "job", "local", "local:user:alice", "local", None)
    # The members of its account (its grants' principals) may see it at the hub, not cancel it.
    assert held.members == ("local:group:esm",)
    assert access_of(held.access, caller_keys(["local:group:esm"])) is Access.SEE

    for record in running:
        node.executor.release(record.id)
    await wait_until(lambda: waiting.id in node.executor.started, "the waiting job to start")
    await wait_until(lambda: (hub.job(waiting.id)[0] or held).state == "running", "running at the hub")
    assert (hub.job(waiting.id)[0] or held).state_reason is None
    node.executor.release(waiting.id)
    await ended_at_hub(hub, waiting.id)


class ScriptedSlurm:
    """Slurm's commands as the Slurm executor runs them, answered as Slurm 22.05 prints them from
    `jobs` (id -> state, reason, nodes), which the test changes as Slurm would."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, str, str]] = {}
        self.names: dict[str, str] = {}

    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       stdin: bytes | None = None) -> CommandResult:
        command, args = argv[0], list(argv[1:])
        if command == "sbatch":
            slurm_id = str(4700 + len(self.jobs))
            self.jobs[slurm_id] = ("PENDING", "None", "")
            self.names[slurm_id] = next(a.split("=", 1)[1] for a in args if a.startswith("--job-name="))
            return CommandResult(0, f"{slurm_id}\n", "")
        if command == "squeue" and any(a.startswith("--user=") for a in args):
            return CommandResult(0, "", "")                 # nothing of a previous agent's
        if command == "squeue":
            wanted = next(a for a in args if a.startswith("--jobs=")).split("=", 1)[1].split(",")
            lines = [f"{i}|{state}|{reason}|N/A|10:00|0|1|{self.names[i]}|{nodes}|ci job\n"
                     for i, (state, reason, nodes) in self.jobs.items() if i in wanted]
            return CommandResult(0, "".join(lines), "")
        if command == "scancel":
            return CommandResult(0, "", "")
        return CommandResult(1, "", "slurm_load_jobs error: Invalid job id specified\n")


async def test_a_pending_jobs_slurm_reason_reaches_the_hub_and_then_its_nodes(
        tmp_path: Path, hub: Hub, node: Node) -> None:
    slurm = ScriptedSlurm()
    node.slurm = SlurmExecutor(SlurmCli(slurm), poll_interval=0.02)
    node.start()
    record = await node.submit()

    def at_hub(state: str, reason: str | None, nodes: str | None) -> StoredJob | None:
        held = hub.job(record.id)[0]
        return held if held is not None and (held.state, held.state_reason, held.node_list) == (
            state, reason, nodes) else None

    # Before Slurm's scheduler has looked at it ("None"), the agent says what it knows itself.
    await wait_until(lambda: at_hub("pending", "queued in Slurm", None), "pending at the hub")
    (slurm_id,) = slurm.jobs
    slurm.jobs[slurm_id] = ("PENDING", "QOSMaxJobsPerUserLimit", "")
    held = await wait_until(lambda: at_hub("pending", "QOSMaxJobsPerUserLimit", None),
                            "Slurm's reason at the hub, with no change of state")
    assert held.slurm_job_id == slurm_id
    assert node.agent is not None and node.agent.job(record.id) is not None
    assert (node.agent.job(record.id) or record).state_reason == "QOSMaxJobsPerUserLimit"
    slurm.jobs[slurm_id] = ("PENDING", "Resources", "")
    await wait_until(lambda: at_hub("pending", "Resources", None), "Slurm's new reason at the hub")

    slurm.jobs[slurm_id] = ("RUNNING", "None", "cn[01-02]")
    await wait_until(lambda: at_hub("running", None, "cn[01-02]"), "the job's nodes at the hub")
    # The agent's own dashboard shows the same, from its record of the job.
    own = Viewer("agent", (f"local:user:{getpass.getuser()}",))
    detail = await AgentBoard(node.agent).detail(own, record.id)
    assert (detail.card.state, detail.card.state_reason, detail.resources.node_list) == (
        "running", None, "cn[01-02]")
    slurm.jobs[slurm_id] = ("COMPLETED", "None", "cn[01-02]")
    held, _ = await ended_at_hub(hub, record.id)
    assert (held.state, held.node_list) == ("succeeded", "cn[01-02]")
    log = node.log_path(record.id).read_bytes()
    assert re.search(rb"hpc-runner: pending: QOSMaxJobsPerUserLimit", log), log


def test_a_ci_job_links_back_to_where_it_came_from() -> None:
    pull = Identity(source="github", repository=REPO, actor="octocat", ref="refs/pull/12/head",
                    commit="a" * 40)
    assert source_link("github", pull) == (f"{REPO}#12", f"https://github.com/{REPO}/pull/12")
    push = replace(pull, ref="refs/heads/main")
    assert source_link("github", push) == (f"{REPO}@{'a' * 12}",
                                           f"https://github.com/{REPO}/commit/{'a' * 40}")
    assert source_link("github", pull, github_web_url=None) == (f"{REPO}#12", None)
    pipeline = Identity(source="buildkite", organization="clima", pipeline="ocean", branch="main")
    assert source_link("buildkite", pipeline) == ("clima/ocean", None)
    assert source_link("local", Identity(source="local", user="alice")) == ("local", None)
    # The page a job's source named at admission comes first.
    page = "https://buildkite.com/clima/ocean/builds/4711#0184990a-477b-4fa8-9968-496074483cee"
    assert source_link("buildkite", pipeline, source_url=page) == ("clima/ocean", page)
    checks = f"https://github.example.org/{REPO}/pull/12"
    assert source_link("github", pull, source_url=checks) == (f"{REPO}#12", checks)


def test_a_buildkite_jobs_page_is_its_builds_page_at_the_job() -> None:
    job_id = "0184990a-477b-4fa8-9968-496074483cee"
    build = "https://buildkite.com/clima/ocean/builds/4711"
    assert job_page({"BUILDKITE_BUILD_URL": build}, job_id) == f"{build}#{job_id}"
    for odd in ({}, {"BUILDKITE_BUILD_URL": "javascript:alert(1)"}, {"BUILDKITE_BUILD_URL": "https://x/ y"}):
        assert job_page(odd, job_id) is None


async def test_the_jobs_secrets_never_reach_the_hub_and_the_log_keeps_its_offsets(
        hub: Hub, node: Node) -> None:
    node.start()
    secret = "ghp_0123456789abcdefSECRET"
    spec = dataclasses.replace(job(), env=(("DEPLOY_TOKEN", secret), ("GREETING", "hello")))
    record = await node.submit(spec=spec)
    await wait_until(lambda: record.id in node.executor.started, "the job to start")
    # The secret cut across two writes, the second a while later: what may begin it waits.
    node.write(record.id, b"token is " + secret[:10].encode())
    await wait_until(lambda: len(hub.job(record.id)[1]) >= len(b"token is "), "the line's start at the hub")
    node.write(record.id, secret[10:].encode() + b"; again " + secret.encode() + b"\n")
    node.executor.release(record.id)

    held, log = await ended_at_hub(hub, record.id)

    written = node.log_path(record.id).read_bytes()
    assert secret.encode() in written and secret.encode() not in log and secret[:10].encode() not in log
    assert len(log) == len(written)
    assert log == written.replace(secret.encode(), b"*" * len(secret))
    assert held.job["env"] == {"DEPLOY_TOKEN": "[REDACTED]", "GREETING": "hello"}


async def test_a_denied_job_reaches_the_hub_with_every_reason(hub: Hub, node: Node) -> None:
    node.start()
    record = await node.submit(identity=Identity(source="local", user="mallory"))

    held, log = await ended_at_hub(hub, record.id)

    assert held.state == "denied" and held.reasons
    assert log == node.log_path(record.id).read_bytes() and b"denied by policy" in log


async def test_a_restart_of_the_agent_mid_job_carries_on_from_the_hubs_length(hub: Hub, node: Node) -> None:
    node.start()
    record = await node.submit()
    await wait_until(lambda: record.id in node.executor.started, "the job to start")
    node.write(record.id, b"part one\n" * 1000)
    size = node.log_path(record.id).stat().st_size
    await wait_until(lambda: len(hub.job(record.id)[1]) == size, "the first part at the hub")

    await node.stop()
    node.write(record.id, b"part two, written while no agent watched\n")
    node.start()                  # the job ran locally: the new agent ends it as infra_failed

    held, log = await ended_at_hub(hub, record.id)

    assert held.state == "infra_failed"
    assert log == node.log_path(record.id).read_bytes()
    assert log.count(b"part two") == 1 and log.count(b"part one") == 1000


async def test_a_hub_down_for_a_while_gets_everything_later(hub: Hub, node: Node) -> None:
    node.start()
    await hub.stop()
    with capture_logs() as logs:
        record = await node.submit()
        await wait_until(lambda: record.id in node.executor.started, "the job to start")
        node.write(record.id, b"while the hub was down\n")
        node.executor.release(record.id)
        await wait_until(lambda: node.state(record.id) == JobState.succeeded, "the job's end")
        await wait_until(lambda: any(entry["event"] == "the hub did not answer; trying again"
                                     for entry in logs), "a failed attempt")

    await hub.start()

    held, log = await ended_at_hub(hub, record.id)
    assert (held.state, held.exit_status) == ("succeeded", 0)
    assert log == node.log_path(record.id).read_bytes() and b"while the hub was down" in log


async def test_jobs_of_the_api_source_are_left_to_it(hub: Hub, node: Node) -> None:
    agent = node.start()
    assert node.publisher is not None
    record = await node.submit()
    agent.store.add_job(source="api", external_id="elsewhere", identity=ALICE.to_json(),
                        spec=job().to_json(), job_id=(api_job := new_job_id()))
    node.publisher.on_admitted(api_job)
    assert [published.hub_id for published in node.publisher.state.open_jobs()] == [record.id]


async def test_a_job_cancelled_at_the_hub_is_cancelled_here(hub: Hub, node: Node) -> None:
    agent = node.start()
    record = await node.submit()
    await wait_until(lambda: record.id in node.executor.started, "the job to start")
    await wait_until(lambda: (hub.job(record.id)[0] or record).state == "running", "running at the hub")

    with JobStore.open(hub.state_dir) as store:       # as DELETE /api/v1/jobs/ID asks it
        store.request_cancel(record.id)

    held, _ = await ended_at_hub(hub, record.id)
    assert held.state == "cancelled" and node.state(record.id) == JobState.cancelled
    assert [entry.actor for entry in agent.store.audit_entries(job_id=record.id)
            if entry.action == "cancel"] == ["the hub"]


async def test_a_job_that_ends_before_its_cancel_is_asked_is_not_cancelled(hub: Hub, node: Node) -> None:
    node.start()
    record = await node.submit()
    await wait_until(lambda: record.id in node.executor.started, "the job to start")
    node.executor.release(record.id)
    held, _ = await ended_at_hub(hub, record.id)
    with JobStore.open(hub.state_dir) as store:
        assert store.request_cancel(record.id).state == "succeeded"
    assert held.state == "succeeded" and node.state(record.id) == JobState.succeeded


# -- GitHub: the "details" link -------------------------------------------------------------------


def test_the_hubs_page_of_a_job_is_the_hubs_own_job_url() -> None:
    job_id = new_job_id()
    assert hub_page_template(PUBLIC_URL + "/").replace("{id}", job_id) == job_url(PUBLIC_URL, job_id)


async def test_a_check_runs_details_link_is_the_hubs_page_of_the_job(tmp_path: Path) -> None:
    # The GitHub source's settings as the agent gives them with hub_url (as the tests' site makes them).
    with_hub = hub_pages(GithubConfig(app_id=1, private_key_file=tmp_path / "key.pem", repositories=(REPO,)),
                         PUBLIC_URL)
    async with github_site(tmp_path, log_url=with_hub.log_url) as site:
        await site.poll()
        site.open_pull(author="alice", labelled_by="alice")
        await site.poll()
        [run] = site.check_runs("hpc-runner/unit")
        assert run["details_url"] == job_url(PUBLIC_URL, site.host.ran[0])
        assert run["conclusion"] == "success"


def test_with_a_hub_only_the_details_link_changes(tmp_path: Path) -> None:
    config = GithubConfig(app_id=1, private_key_file=tmp_path / "key.pem", repositories=(REPO,),
                          log_url="https://ci.example.org/jobs/{id}")
    assert hub_pages(config, PUBLIC_URL + "/") == replace(config, log_url=f"{PUBLIC_URL}/jobs/{{id}}")


async def test_the_details_link_names_the_address_the_hubs_users_reach_it_at(hub: Hub) -> None:
    # The agent reaches the hub on loopback; its users at its [hub] public_url.
    async with HubClient(hub.url, AGENT_TOKEN) as client:
        assert await hub_public_url(client) == PUBLIC_URL


async def test_a_hub_that_does_not_say_its_address_leaves_the_agents_own(hub: Hub) -> None:
    await hub.stop()
    async with HubClient(hub.url, AGENT_TOKEN, retry_initial=0.02) as client:
        with capture_logs() as logs:
            assert await hub_public_url(client, wait=0.3) == hub.url
    assert any(entry["event"].startswith("the hub did not say its public address") for entry in logs)
    async with HubClient(hub.url, "agent-b-not-a-token-the-hub-knows-0123456789") as client:
        await hub.start()
        assert await hub_public_url(client, wait=5) == hub.url
