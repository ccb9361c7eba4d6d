"""The gateway over HTTP, in process: GitHub's official example webhooks in, agents' leases out.

Webhooks are sent as GitHub sends them (``fakes.github_webhooks``: the official example payloads
of ``@octokit/webhooks-examples``, signed over the exact bytes); agents are the real client,
``runner.sources.github.gateway_client``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.github_webhooks import SECRET, Example, examples, new_delivery_id, send, sign
from structlog.testing import capture_logs

from runner.gateway.queue import DeliveryQueue
from runner.gateway.server import GatewayServer
from runner.gateway.tokens import parse_agent_tokens
from runner.gateway.webhook import MAX_BODY_BYTES
from runner.sources.github.gateway_client import (
    GatewayAuthError,
    GatewayClient,
    GatewayError,
    LeaseLost,
)

TOKEN_A = "agent-a-0123456789abcdef0123456789abcdef"
TOKEN_B = "agent-b-fedcba9876543210fedcba9876543210"
TOKENS = parse_agent_tokens(f"login-a:{TOKEN_A}\nlogin-b:{TOKEN_B}\n", "tokens")
WANTED = ("pull_request", "issue_comment", "push", "check_run")
UNWANTED = ("ping", "check_suite", "workflow_job", "installation")


@dataclass
class Gateway:
    server: GatewayServer
    url: str

    @property
    def webhook_url(self) -> str:
        return self.url + "/webhook"

    def client(self, token: str = TOKEN_A, **options: int | float) -> GatewayClient:
        return GatewayClient(self.url, token, **options)  # type: ignore[arg-type]

    async def status(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(self.url + "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN_A}"}) as r:
            assert r.status == 200
            status: dict[str, Any] = await r.json()
            return status

    async def counts(self, http: aiohttp.ClientSession) -> dict[str, int]:
        status = await self.status(http)
        return {key: status[key] for key in ("waiting", "leased", "acknowledged")}

    async def until_polling(self, http: aiohttp.ClientSession, agent: str) -> None:
        """Wait until `agent` is in a long poll on the gateway."""
        async def polling() -> None:
            while agent not in (await self.status(http))["agents_polling"]:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(polling(), 5)


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    started: list[GatewayServer] = []

    async def start(state_dir: Path = tmp_path / "gateway-state", port: int = 0) -> Gateway:
        server = GatewayServer(state_dir=state_dir, webhook_secret=SECRET, tokens=TOKENS)
        await server.start("127.0.0.1", port)
        started.append(server)
        return Gateway(server, f"http://127.0.0.1:{server.port}")

    yield start
    for server in started:
        await server.close()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def agent_a(gateway: Gateway) -> AsyncIterator[GatewayClient]:
    async with gateway.client(TOKEN_A) as client:
        yield client


@pytest.fixture
async def agent_b(gateway: Gateway) -> AsyncIterator[GatewayClient]:
    async with gateway.client(TOKEN_B) as client:
        yield client


def padded_body(size: int) -> bytes:
    """A JSON object of exactly `size` bytes."""
    head, tail = b'{"action":"opened","padding":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


# --- GitHub's side ---

async def test_official_examples_of_the_events_agents_use_are_queued_and_handed_out_intact(
        gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient) -> None:
    sent: list[tuple[Example, str]] = []
    for example in examples(*WANTED):
        delivery_id = new_delivery_id()
        answer = await send(http, gateway.webhook_url, example.event, example.body, delivery_id=delivery_id)
        assert (answer.status, answer.json) == (202, {"result": "queued", "delivery": delivery_id}), example
        sent.append((example, delivery_id))
    assert len(sent) == 54

    for example, delivery_id in sent:   # oldest first
        delivery = await agent_a.next_delivery(wait_seconds=0)
        assert delivery is not None
        assert (delivery.event, delivery.delivery_id, delivery.attempt) == (example.event, delivery_id, 1)
        assert delivery.payload == example.payload
        await agent_a.acknowledge(delivery)
    assert await agent_a.next_delivery(wait_seconds=0) is None
    assert await gateway.counts(http) == {"waiting": 0, "leased": 0, "acknowledged": 54}


async def test_official_examples_of_other_events_are_answered_2xx_logged_and_dropped(
        gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient) -> None:
    others = examples(*UNWANTED)
    with capture_logs() as logs:
        for example in others:
            answer = await send(http, gateway.webhook_url, example.event, example.body)
            assert answer.status == 200 and answer.json["result"] == "ignored", example
    ignored = [entry for entry in logs if entry["event"] == "webhook ignored, not queued"]
    assert {entry["github_event"] for entry in ignored} == set(UNWANTED)
    assert len(ignored) == len(others)
    assert await agent_a.next_delivery(wait_seconds=0) is None


@pytest.mark.parametrize("case", ["wrong secret", "tampered body", "no signature", "sha1 only",
                                  "signature of another delivery"])
async def test_a_bad_signature_gets_401_and_queues_nothing(
        case: str, gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient) -> None:
    example = examples("pull_request")[0]
    body, secret, headers = example.body, SECRET, {}
    if case == "wrong secret":
        secret = "It's a secret to everybody"
    elif case == "tampered body":
        headers = {"X-Hub-Signature-256": sign(body)}
        body = body.replace(b'"opened"', b'"closed"')
    elif case == "no signature":
        secret = None  # type: ignore[assignment]
    elif case == "sha1 only":
        secret = None  # type: ignore[assignment]
        headers = {"X-Hub-Signature": "sha1=" + "0" * 40}
    else:
        headers = {"X-Hub-Signature-256": sign(examples("push")[0].body)}
    with capture_logs() as logs:
        answer = await send(http, gateway.webhook_url, "pull_request", body, secret=secret, headers=headers)
    assert answer.status == 401 and "X-Hub-Signature-256" in answer.json["error"]
    assert [entry["status"] for entry in logs if entry["event"] == "webhook refused, not queued"] == [401]
    assert await agent_a.next_delivery(wait_seconds=0) is None
    assert await gateway.counts(http) == {"waiting": 0, "leased": 0, "acknowledged": 0}


async def test_a_redelivered_webhook_is_acknowledged_and_queued_once(
        gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient) -> None:
    example = examples("issue_comment")[3]
    delivery_id = new_delivery_id()
    statuses = [(await send(http, gateway.webhook_url, "issue_comment", example.body,
                            delivery_id=delivery_id)).status for _ in range(3)]
    assert statuses == [202, 200, 200]
    delivery = await agent_a.next_delivery(wait_seconds=0)
    assert delivery is not None and delivery.delivery_id == delivery_id
    await agent_a.acknowledge(delivery)
    # GitHub's "Redeliver" after the job ran: still the same delivery, still nothing new to do.
    again = await send(http, gateway.webhook_url, "issue_comment", example.body, delivery_id=delivery_id)
    assert (again.status, again.json["result"]) == (200, "duplicate")
    assert await agent_a.next_delivery(wait_seconds=0) is None


async def test_a_25_mib_body_is_accepted_whole_and_a_larger_one_refused_413(
        gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient) -> None:
    largest = padded_body(MAX_BODY_BYTES)
    answer = await send(http, gateway.webhook_url, "push", largest)
    assert answer.status == 202
    delivery = await agent_a.next_delivery(wait_seconds=0)
    assert delivery is not None and len(delivery.payload["padding"]) == MAX_BODY_BYTES - 32
    await agent_a.acknowledge(delivery)

    too_large = padded_body(MAX_BODY_BYTES + 1)
    answer = await send(http, gateway.webhook_url, "push", too_large)
    assert answer.status == 413

    async def chunks() -> AsyncIterator[bytes]:   # no Content-Length: the limit holds while reading
        for start in range(0, len(too_large), 1 << 20):
            yield too_large[start:start + (1 << 20)]
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push",
               "X-GitHub-Delivery": new_delivery_id(), "X-Hub-Signature-256": sign(too_large)}
    async with http.post(gateway.webhook_url, data=chunks(), headers=headers) as response:
        assert response.status == 413
    assert await agent_a.next_delivery(wait_seconds=0) is None


async def test_webhooks_are_stored_while_many_deliveries_wait_and_an_agent_takes_them(
        start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    state_dir = tmp_path / "busy"
    body = examples("pull_request")[22].body
    with DeliveryQueue.open(state_dir) as queue:
        for n in range(5000):
            queue.enqueue(event="pull_request", delivery_id=f"backlog-{n}", body=body)
    gateway = await start_gateway(state_dir)
    async with gateway.client(TOKEN_A) as agent:
        # Agents waiting, taking and acknowledging at the same time as GitHub sends.
        async def work() -> None:
            while (delivery := await agent.next_delivery(wait_seconds=1)) is not None:
                await agent.acknowledge(delivery)
        worker = asyncio.create_task(work())
        # How fast they are answered is measured by bench/gateway_answer.py.
        sent = examples(*WANTED)[:40]
        for example in sent:
            answer = await send(http, gateway.webhook_url, example.event, example.body)
            assert answer.status == 202
        worker.cancel()
    with DeliveryQueue.open(state_dir) as queue:
        counts = queue.counts()
    assert counts.waiting + counts.leased + counts.acknowledged == 5000 + len(sent)
    assert counts.acknowledged > 0


# --- the agents' side ---

async def test_a_waiting_agent_gets_a_webhook_as_soon_as_it_is_stored(
        gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient) -> None:
    poll = asyncio.create_task(agent_a.next_delivery(wait_seconds=30))
    await gateway.until_polling(http, "login-a")
    example = examples("check_run")[6]
    answer = await send(http, gateway.webhook_url, "check_run", example.body)
    # Woken by the delivery, well before its 30 s long poll would end.
    delivery = await asyncio.wait_for(poll, 5)
    assert delivery is not None and delivery.payload["requested_action"]["identifier"] == "lgtm|26764"
    assert answer.status == 202


async def test_a_lease_kept_extended_is_not_handed_out_and_is_once_extensions_stop(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    example = examples("pull_request")[12]
    await send(http, gateway.webhook_url, "pull_request", example.body, delivery_id="long-job")
    async with gateway.client(TOKEN_A, lease_seconds=2) as first, gateway.client(TOKEN_B) as second:
        delivery = await first.next_delivery(wait_seconds=0)
        assert delivery is not None
        async with first.keep_leased(delivery) as kept:
            # Two lease periods pass while the first agent's job runs.
            assert await second.next_delivery(wait_seconds=4) is None
            assert kept.extensions >= 3 and not kept.lost.is_set()
        stopped_at = time.monotonic()
        taken = await second.next_delivery(wait_seconds=10)
        assert taken is not None
        assert (taken.delivery_id, taken.attempt) == ("long-job", 2)
        assert time.monotonic() - stopped_at <= 4.0   # back in the queue after one lease period
        with pytest.raises(LeaseLost):
            await first.extend(delivery)
        with pytest.raises(LeaseLost):
            await first.acknowledge(delivery)
        await second.acknowledge(taken)
        await second.acknowledge(taken)   # repeating an acknowledgement is harmless


async def test_an_agent_whose_lease_went_to_another_agent_is_told(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    await send(http, gateway.webhook_url, "push", examples("push")[0].body)
    async with gateway.client(TOKEN_A, lease_seconds=1) as first, gateway.client(TOKEN_B) as second:
        delivery = await first.next_delivery(wait_seconds=0)
        assert delivery is not None
        assert await second.next_delivery(wait_seconds=5) is not None   # after the lease ran out
        with capture_logs() as logs:
            async with first.keep_leased(delivery) as kept:
                await asyncio.wait_for(kept.lost.wait(), 5)
        assert any(entry["event"].startswith("lease lost") for entry in logs)


async def test_a_released_delivery_goes_to_a_waiting_agent_at_once(
        gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient,
        agent_b: GatewayClient) -> None:
    await send(http, gateway.webhook_url, "push", examples("push")[1].body, delivery_id="handed-back")
    delivery = await agent_a.next_delivery(wait_seconds=0)
    assert delivery is not None
    waiting = asyncio.create_task(agent_b.next_delivery(wait_seconds=30))
    await gateway.until_polling(http, "login-b")
    await agent_a.release(delivery)
    # Handed over by the release, well before agent b's 30 s long poll would end.
    taken = await asyncio.wait_for(waiting, 5)
    assert taken is not None and taken.delivery_id == "handed-back"


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token-of-any-agent-0123456789",
                                           f"Basic {TOKEN_A}", f"Token {TOKEN_A}"])
async def test_agent_requests_without_a_valid_token_get_401(
        authorization: str | None, gateway: Gateway, http: aiohttp.ClientSession) -> None:
    await send(http, gateway.webhook_url, "push", examples("push")[0].body)
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", "/api/v1/leases?wait=0"), ("GET", "/api/v1/status"),
                         ("POST", "/api/v1/leases/AAAAAAAAAAAAAAAAAAAAAAAA/ack")):
        async with http.request(method, gateway.url + path, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await gateway.counts(http))["waiting"] == 1


async def test_the_client_stops_on_a_refused_token_instead_of_retrying(gateway: Gateway) -> None:
    async with GatewayClient(gateway.url, "wrong-token-0123456789abcdef0123456789") as client:
        with pytest.raises(GatewayAuthError, match="gateway_token_file"):
            await asyncio.wait_for(anext(client.deliveries()), 5)


@pytest.mark.parametrize("query, message", [("wait=abc", "wait must be a whole number"),
                                            ("wait=56", "wait must be between 0 and 55"),
                                            ("seconds=0", "seconds must be between 1 and 3600")])
async def test_bad_poll_parameters_are_refused_400(
        query: str, message: str, gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{gateway.url}/api/v1/leases?{query}",
                         headers={"Authorization": f"Bearer {TOKEN_A}"}) as response:
        assert response.status == 400
        assert message in (await response.json())["error"]


async def test_the_client_waits_for_a_gateway_that_is_not_up_yet(
        start_gateway: StartGateway, http: aiohttp.ClientSession, unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with GatewayClient(url, TOKEN_A, wait_seconds=5, retry_initial=0.05, retry_max=0.2) as client:
        with capture_logs() as logs:
            first = asyncio.create_task(anext(client.deliveries()))
            await asyncio.wait_for(_logged(logs, "gateway not reachable; retrying"), 5)
        gateway = await start_gateway(port=unused_tcp_port)
        await send(http, gateway.webhook_url, "pull_request", examples("pull_request")[0].body,
                   delivery_id="after-outage")
        delivery = await asyncio.wait_for(first, 10)
        assert delivery.delivery_id == "after-outage"


async def _logged(logs: list[MutableMapping[str, Any]], event: str) -> None:
    while not any(entry["event"] == event for entry in logs):
        await asyncio.sleep(0.01)


async def test_stopping_the_gateway_ends_long_polls_at_once(
        gateway: Gateway, http: aiohttp.ClientSession, agent_a: GatewayClient) -> None:
    poll = asyncio.create_task(agent_a.next_delivery(wait_seconds=30))
    await gateway.until_polling(http, "login-a")
    await gateway.server.close()
    with pytest.raises(GatewayError):   # at once, not when its 30 s are up
        await asyncio.wait_for(poll, 5)


async def test_health_needs_no_token_and_says_nothing_else(gateway: Gateway,
                                                           http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + "/healthz") as response:
        assert response.status == 200 and await response.json() == {"status": "ok"}


async def test_status_tells_which_agents_are_polling(gateway: Gateway, http: aiohttp.ClientSession,
                                                     agent_b: GatewayClient) -> None:
    assert await gateway.status(http) == {"waiting": 0, "leased": 0, "acknowledged": 0, "agents_polling": []}
    poll = asyncio.create_task(agent_b.next_delivery(wait_seconds=30))
    await gateway.until_polling(http, "login-b")
    await send(http, gateway.webhook_url, "push", examples("push")[2].body)
    assert await asyncio.wait_for(poll, 5) is not None
    assert await gateway.status(http) == {"waiting": 0, "leased": 1, "acknowledged": 0, "agents_polling": []}


async def test_the_lease_answer_carries_the_raw_body_and_lease_headers(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    example = examples("issue_comment")[0]
    await send(http, gateway.webhook_url, "issue_comment", example.body, delivery_id="raw-1")
    async with http.post(gateway.url + "/api/v1/leases?wait=0&seconds=90",
                         headers={"Authorization": f"Bearer {TOKEN_B}"}) as response:
        assert response.status == 200
        assert await response.read() == example.body
        assert response.headers["X-GitHub-Event"] == "issue_comment"
        assert response.headers["X-GitHub-Delivery"] == "raw-1"
        assert response.headers["Hpc-Runner-Lease-Seconds"] == "90"
        assert response.headers["Hpc-Runner-Attempt"] == "1"
        assert response.headers["Hpc-Runner-Lease-Expires"].endswith("Z")
        assert json.loads(await response.read()) == example.payload
