"""How fast the webhook gateway answers GitHub, with a backlog and agents at work.

GitHub gives a webhook 10 s and the target is an answer within a second. The gateway runs in
this process (`runner.gateway.server.GatewayServer`, its SQLite queue on the local disk) with
a backlog of deliveries already queued, while an agent (the real
`runner.sources.github.gateway_client`) takes and acknowledges deliveries at the same time.
Webhooks are the official examples of `@octokit/webhooks-examples`, signed as GitHub signs
them (`tests/fakes/github_webhooks.py`). Measured: the time from sending a webhook to its
answer, for the examples of the four stored events, for a 25 MiB body (GitHub's limit), and,
as the baseline, for a webhook the gateway drops unstored (`ping`: the HTTP path alone).

    /opt/hpc-runner/venv/bin/python bench/gateway_answer.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Measure the checkout's code, not the copies installed in the venv.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import aiohttp  # noqa: E402
from fakes.github_webhooks import SECRET, examples, send  # noqa: E402

from bench._common import (  # noqa: E402
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    summary,
    write_results,
)
from runner.gateway.queue import DeliveryQueue  # noqa: E402
from runner.gateway.server import GatewayServer  # noqa: E402
from runner.gateway.tokens import parse_agent_tokens  # noqa: E402
from runner.gateway.webhook import MAX_BODY_BYTES  # noqa: E402
from runner.sources.github.gateway_client import GatewayClient  # noqa: E402

NAME = "gateway_answer"
TOKEN = "bench-agent-0123456789abcdef0123456789abcdef"
STORED = ("pull_request", "issue_comment", "push", "check_run")
TARGET_S = 1.0
PING = b'{"zen": "Keep it logically awesome."}'


def _padded(size: int) -> bytes:
    """A JSON object of exactly `size` bytes."""
    frame = len(json.dumps({"padding": ""}).encode())
    return json.dumps({"padding": "x" * (size - frame)}).encode()


async def measure_all(quick: bool, state_dir: Path) -> dict[str, Any]:
    backlog = 500 if quick else 5000
    rounds = 1 if quick else 5
    body = examples("pull_request")[0].body
    with DeliveryQueue.open(state_dir) as queue:
        for n in range(backlog):
            queue.enqueue(event="pull_request", delivery_id=f"backlog-{n}", body=body)
    server = GatewayServer(state_dir=state_dir, webhook_secret=SECRET,
                           tokens=parse_agent_tokens(f"bench:{TOKEN}\n", "tokens"))
    await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}"
    stored: list[float] = []
    dropped: list[float] = []
    large: list[float] = []
    try:
        async with aiohttp.ClientSession() as http, GatewayClient(url, TOKEN) as agent:
            async def work() -> None:
                while (delivery := await agent.next_delivery(wait_seconds=1)) is not None:
                    await agent.acknowledge(delivery)
            worker = asyncio.create_task(work())
            for _ in range(rounds):
                for example in examples(*STORED):
                    answer = await send(http, url + "/webhook", example.event, example.body)
                    if answer.status != 202:
                        raise RuntimeError(f"{example.event} example answered {answer.status}")
                    stored.append(answer.seconds)
                    ping = await send(http, url + "/webhook", "ping", PING)
                    dropped.append(ping.seconds)
                answer = await send(http, url + "/webhook", "push", _padded(MAX_BODY_BYTES))
                if answer.status != 202:
                    raise RuntimeError(f"a 25 MiB webhook answered {answer.status}")
                large.append(answer.seconds)
            worker.cancel()
    finally:
        await server.close()
    return {"backlog": backlog, "stored_s": summary(stored), "dropped_s": summary(dropped),
            "large_body_s": summary(large), "large_body_bytes": MAX_BODY_BYTES}


def measure(quick: bool, output: Path | None) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hpc-runner-gateway-bench-") as tmp:
        results = asyncio.run(measure_all(quick, Path(tmp) / "state"))

    def row(label: str, stats: dict[str, float | int]) -> list[str]:
        ms = [f"{1000 * stats[key]:.1f}" for key in ("median", "p90", "max")]
        return [label, f"{' / '.join(ms)} ms ({stats['n']} webhooks)", f"max < {TARGET_S:g} s"]

    rows = [row(f"stored webhook, {results['backlog']} queued, agent working", results["stored_s"]),
            row("dropped webhook (ping): the HTTP path alone, baseline", results["dropped_s"]),
            row("25 MiB webhook", results["large_body_s"])]
    print(markdown_table(["variant", "answer median / p90 / max", "target"], rows))
    document = {"benchmark": NAME, "date": now_utc(), "quick": quick, "settings": {"target_s": TARGET_S},
                "machine": machine_info(), "commands": {}, "results": results,
                "duration_seconds": round(time.monotonic() - started, 1)}
    path = write_results(output or REPO / "bench" / "results" / f"{NAME}.json", document)
    print(f"results written to {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    common_arguments(parser, NAME)
    args = parser.parse_args()
    return main_guard(lambda: measure(args.quick, args.output))


if __name__ == "__main__":
    sys.exit(main())
