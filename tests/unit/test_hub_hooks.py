"""The hub's outbound hooks, end to end on loopback: the real hub (jobs submitted with tokens of an
OIDC issuer emulator, published by an agent over its token) and a real receiver that checks each
delivery's signature with its own copy of the secret, as a GitHub webhook receiver would."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fakes.oidc_issuer import OidcIssuerEmulator

from runner.config import parse_config_text
from runner.errors import InputError
from runner.gateway.callers import authenticator
from runner.gateway.hooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, HookTarget, RetrySchedule
from runner.gateway.jobstore import DB_FILENAME, MIGRATIONS, JobStore, StoredJob
from runner.gateway.server import GatewayServer, JobsApiSettings
from runner.hook_tables import STATES, Hook
from runner.oidc.issuers import OidcIssuer
from runner.oidc.verify import TokenVerifier
from runner.sqlitefile import StoreError, open_database
from unit.test_hub_jobstore import new_job
from unit.test_hub_server import AUDIENCE, PUBLIC_URL, TOKENS, Hub

SECRET = b"hook-secret-0123456789abcdef"
# Retries within a test's time, in the shape of the real schedule.
FAST = RetrySchedule(first=0.02, longest=0.1, give_up_after=3600.0)
WAIT_SECONDS = 10.0


@dataclass
class Receiver:
    """A hook receiver: answers 500 while `failing` (or to the first `fail_first` requests), and
    records the bodies it took whose signature its `secret` verifies."""

    secret: bytes
    url: str = ""
    fail_first: int = 0
    failing: bool = False
    taken: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[str] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    refused: list[tuple[str, bytes]] = field(default_factory=list)   # (signature, raw body)
    failed: int = 0
    hold: asyncio.Event | None = None     # the first request waits for it before answering
    held: bool = False
    # An event, not a condition: a condition's wait cancelled by a timeout while a request notifies
    # it can hang re-acquiring its lock (Python 3.11's asyncio), which stalled this test for good.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hold is not None and not self.held:
            self.held = True
            await self.hold.wait()
        try:
            return self._answer(request, body)
        finally:
            self.changed.set()

    def _answer(self, request: web.Request, body: bytes) -> web.Response:
        if self.failing or self.fail_first > 0:
            self.fail_first -= 1
            self.failed += 1
            return web.Response(status=500, text="not now")
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get(SIGNATURE_HEADER, "")):
            self.refused.append((request.headers.get(SIGNATURE_HEADER, ""), body))
            return web.Response(status=401, text="bad signature")
        self.taken.append(json.loads(body))
        self.raw.append(body)
        self.deliveries.append(request.headers[DELIVERY_HEADER])
        self.headers.append(dict(request.headers))
        return web.Response(status=204)

    async def until(self, done: Callable[[], bool]) -> None:
        deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
        while not done():
            self.changed.clear()
            if done():
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                pytest.fail("the hook receiver did not get what the test waited for")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def states(self, job_id: str | None = None) -> list[str]:
        return [body["job"]["state"] for body in self.taken if job_id is None or body["job"]["id"] == job_id]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    taker = Receiver(SECRET)
    app = web.Application()
    app.router.add_post("/hook", taker.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    taker.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield taker
    if taker.hold is not None:
        taker.hold.set()
    await runner.cleanup()


StartHub = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def start_hub(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[StartHub]:
    started: list[GatewayServer] = []
    async with OidcIssuerEmulator() as issuer:
        async def start(*hooks: Hook, secret: bytes = SECRET) -> Hub:
            trusted = OidcIssuer(name="github-actions", issuer=issuer.url, audience=AUDIENCE, kind="github")
            verify = authenticator(TokenVerifier([trusted]))
            settings = JobsApiSettings(public_url=PUBLIC_URL, authenticate=verify)
            server = GatewayServer(state_dir=tmp_path / "hub-state", webhook_secret=None, tokens=TOKENS,
                                   jobs_api=settings, hooks=[HookTarget(hook, secret) for hook in hooks],
                                   hook_schedule=FAST)
            await server.start("127.0.0.1", 0)
            started.append(server)
            return Hub(server, f"http://127.0.0.1:{server.port}", issuer, http)

        yield start
        for server in started:
            await server.close()


def hook(receiver: Receiver, *states: str) -> Hook:
    return Hook(receiver.url, Path("/etc/hpc-runner/hook-secret"), frozenset(states or STATES))


async def run_job(hub: Hub, job_id: str, *states: str) -> dict[str, Any]:
    """Lease `job_id` and publish `states`; the job's view afterwards."""
    leased = await hub.lease()
    assert leased is not None and leased["id"] == job_id
    for state in states:
        fields: dict[str, Any] = {"exit_status": 0} if state == "succeeded" else {}
        status, answer = await hub.publish(job_id, state, **fields)
        assert status == 200, answer
    status, view, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}", token=hub.token())
    assert status == 200
    assert isinstance(view, dict)
    return view


async def test_every_state_of_a_job_arrives_once_in_order_signed(start_hub: StartHub,
                                                                  receiver: Receiver) -> None:
    hub = await start_hub(hook(receiver))
    job_id = (await hub.submit(cluster="hpc1"))["id"]
    view = await run_job(hub, job_id, "pending", "running", "succeeded")
    await receiver.until(lambda: len(receiver.taken) == 4)
    assert receiver.states() == ["queued", "pending", "running", "succeeded"]
    assert all(body["event"] == "job.state" and body["job"]["id"] == job_id for body in receiver.taken)
    # The last one is the job exactly as the API shows it.
    assert receiver.taken[-1]["job"] == view
    assert set(receiver.taken[0]["job"]) == set(view)
    assert len(set(receiver.deliveries)) == 4
    assert all(headers[EVENT_HEADER] == "job.state" and headers["Content-Type"] == "application/json"
               for headers in receiver.headers)
    assert (receiver.refused, receiver.failed) == ([], 0)


async def test_a_hook_gets_only_the_states_it_names(start_hub: StartHub, receiver: Receiver) -> None:
    hub = await start_hub(hook(receiver, "succeeded", "cancelled"))
    submitted = (await hub.submit(cluster="hpc1"))["id"]
    cancelled = (await hub.submit(cluster="hpc1"))["id"]
    status, _, _ = await hub.call("DELETE", f"/api/v1/jobs/{cancelled}", token=hub.token())
    assert status == 202
    await run_job(hub, submitted, "pending", "running", "succeeded")
    await receiver.until(lambda: len(receiver.taken) == 2)
    assert sorted((body["job"]["id"], body["job"]["state"]) for body in receiver.taken) == sorted(
        [(submitted, "succeeded"), (cancelled, "cancelled")])


async def test_a_cancelled_queued_job_and_a_second_hook_each_get_their_events(
        start_hub: StartHub, receiver: Receiver) -> None:
    app = web.Application()
    other = Receiver(SECRET)
    app.router.add_post("/other", other.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    other.url = f"http://127.0.0.1:{runner.addresses[0][1]}/other"
    try:
        hub = await start_hub(hook(receiver, "cancelled"), hook(other))
        job_id = (await hub.submit(cluster="hpc1"))["id"]
        status, _, _ = await hub.call("DELETE", f"/api/v1/jobs/{job_id}", token=hub.token())
        assert status == 202
        await other.until(lambda: len(other.taken) == 2)
        await receiver.until(lambda: len(receiver.taken) == 1)
        assert other.states() == ["queued", "cancelled"]
        assert receiver.states() == ["cancelled"]
    finally:
        await runner.cleanup()


async def test_a_failing_receiver_gets_the_events_later_still_in_order(start_hub: StartHub,
                                                                       receiver: Receiver) -> None:
    receiver.fail_first = 3
    hub = await start_hub(hook(receiver))
    job_id = (await hub.submit(cluster="hpc1"))["id"]
    await run_job(hub, job_id, "pending", "running", "succeeded")
    await receiver.until(lambda: len(receiver.taken) == 4)
    assert receiver.failed == 3
    assert receiver.states() == ["queued", "pending", "running", "succeeded"]
    assert len(set(receiver.deliveries)) == 4


async def test_a_restarted_hub_delivers_what_was_pending_each_state_once_in_order(
        start_hub: StartHub, receiver: Receiver) -> None:
    hub = await start_hub(hook(receiver))
    job_id = (await hub.submit(cluster="hpc1"))["id"]
    await receiver.until(lambda: len(receiver.taken) == 1)
    receiver.failing = True
    await run_job(hub, job_id, "pending", "running", "succeeded")
    await receiver.until(lambda: receiver.failed >= 2)
    await hub.server.close()
    receiver.failing = False
    await start_hub(hook(receiver))
    await receiver.until(lambda: len(receiver.taken) == 4)
    assert receiver.states() == ["queued", "pending", "running", "succeeded"]
    assert len(set(receiver.deliveries)) == 4


async def test_a_slow_receiver_stalls_neither_the_api_nor_other_jobs(start_hub: StartHub,
                                                                     receiver: Receiver) -> None:
    receiver.hold = asyncio.Event()
    hub = await start_hub(hook(receiver))
    first = (await hub.submit(cluster="hpc1"))["id"]
    second = (await hub.submit(cluster="hpc1"))["id"]
    # The first delivery hangs in the receiver; the second job's goes out beside it, and the API
    # still answers.
    await receiver.until(lambda: len(receiver.taken) == 1)
    assert receiver.taken[0]["job"]["id"] == second
    status, _, _ = await hub.call("GET", f"/api/v1/jobs/{first}", token=hub.token())
    assert status == 200
    receiver.hold.set()
    await receiver.until(lambda: len(receiver.taken) == 2)
    assert receiver.taken[1]["job"]["id"] == first


async def test_the_signature_is_over_the_raw_body_and_a_wrong_secret_fails(start_hub: StartHub,
                                                                             receiver: Receiver) -> None:
    receiver.secret = b"not-the-hub-secret-0123456789"
    hub = await start_hub(hook(receiver))
    await hub.submit(cluster="hpc1")
    await receiver.until(lambda: len(receiver.refused) >= 1)
    assert receiver.taken == []
    sent, raw = receiver.refused[0]
    assert sent == "sha256=" + hmac.new(SECRET, raw, hashlib.sha256).hexdigest()
    # Over the bytes as sent, not over the JSON they parse to: the same object spelt otherwise
    # does not verify.
    respelt = json.dumps(json.loads(raw), indent=1).encode()
    assert sent != "sha256=" + hmac.new(SECRET, respelt, hashlib.sha256).hexdigest()


def test_a_state_change_and_its_deliveries_are_one_transaction(tmp_path: Path) -> None:
    def broken(job: StoredJob) -> list[tuple[str, bytes]]:
        raise StoreError("no deliveries")

    with JobStore.open(tmp_path, announce=broken) as store, pytest.raises(StoreError):
        store.submit(new_job())
    with JobStore.open(tmp_path, announce=lambda job: [("https://a.example/h", job.state.encode())]) as store:
        assert store.visible(new_job().owner_keys, limit=10) == []   # no job without its deliveries
        job = store.submit(new_job())
        (event,), _ = store.hook_schedule(10, ())
        assert (event.job_id, event.hook, event.body) == (job.id, "https://a.example/h", b"queued")


def test_a_retry_falling_due_while_the_outbox_is_read_is_still_scheduled(tmp_path: Path) -> None:
    """The deliverer sleeps until the next attempt the outbox names: a retry that falls due between
    reading what is due and reading when the next one is must be in one of the two answers, or it
    waits for an unrelated wakeup (a minute) while its receiver is ready."""
    now = [1000.0]

    def clock() -> float:
        now[0] += 0.05  # every look at the clock is a little later, as on a loaded machine
        return now[0]

    announce = lambda job: [("https://a.example/h", job.state.encode())]  # noqa: E731
    with JobStore.open(tmp_path, announce=announce, clock=clock) as store:
        store.submit(new_job())
        (event,), _ = store.hook_schedule(10, ())
        # Due after the next look at the clock and before the one after it.
        retry = now[0] + 0.07
        store.hook_retry_at(event.seq, retry)
        due, next_at = store.hook_schedule(10, ())
        assert (due, next_at) == ([], retry)
        due, next_at = store.hook_schedule(10, ())
        assert [e.seq for e in due] == [event.seq]


def test_a_job_store_of_the_first_schema_gains_the_outbox(tmp_path: Path) -> None:
    open_database(tmp_path / DB_FILENAME, MIGRATIONS[:1], what="hub job store", holds="API jobs").close()
    with JobStore.open(tmp_path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.hook_schedule(10, ()) == ([], None)


def config_text(hooks: str) -> str:
    return f"""
[hub]
listen = "127.0.0.1:8080"
state_dir = "/var/lib/hpc-runner-hub"
agent_tokens_file = "/etc/hpc-runner/agent-tokens"
public_url = "https://hub.example.org"

[[oidc]]
name = "github"
issuer = "https://token.actions.githubusercontent.com"
audience = "hpc-runner"
kind = "github"
{hooks}"""


def test_hooks_are_read_from_the_config_with_their_secret_files() -> None:
    config = parse_config_text(config_text("""
[[hooks]]
url = "https://ci.example.org/hook"
secret_file = "/etc/hpc-runner/hook-secret"
states = ["succeeded", "failed"]

[[hooks]]
url = "http://127.0.0.1:9000/hook"
secret_file = "/etc/hpc-runner/hook-secret-2"
"""))
    assert config.hooks == (
        Hook("https://ci.example.org/hook", Path("/etc/hpc-runner/hook-secret"),
             frozenset({"succeeded", "failed"})),
        Hook("http://127.0.0.1:9000/hook", Path("/etc/hpc-runner/hook-secret-2"), frozenset(STATES)))
    assert (Path("/etc/hpc-runner/hook-secret"), "hooks[0].secret_file") in config.named_secret_files()


@pytest.mark.parametrize("hooks, words", [
    ('[[hooks]]\nurl = "https://a.example/h"\nsecret_file = "/s"\nretries = 3\n', "hooks[0].retries"),
    ('[[hooks]]\nurl = "http://ci.example.org/h"\nsecret_file = "/s"\n', "must use https://"),
    ('[[hooks]]\nurl = "https://a.example/h"\nsecret_file = "/s"\nstates = ["done"]\n',
     "unknown state 'done'"),
    ('[[hooks]]\nurl = "https://a.example/h"\n', "secret_file"),
    ('[[hooks]]\nurl = "https://a.example/h"\nsecret_file = "s"\n', "absolute path"),
    ('[[hooks]]\nurl = "https://a.example/h"\nsecret_file = "/s"\n' * 2, "already another"),
])
def test_a_bad_hooks_table_is_an_error_naming_its_field(hooks: str, words: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_config_text(config_text("\n" + hooks), "hub.toml")
    assert words in str(caught.value)
    assert "hub.toml" in str(caught.value)


def test_hooks_need_a_hub_serving_the_jobs_api() -> None:
    with pytest.raises(InputError, match="need a \\[hub\\] section with public_url"):
        parse_config_text('[[hooks]]\nurl = "https://a.example/h"\nsecret_file = "/s"\n')
