"""GitHub's webhook sender, as the gateway sees it: official example payloads, signed and sent with
GitHub's headers (the event, the delivery and hook ids, ``X-Hub-Signature-256``).

Examples come from ``@octokit/webhooks-examples`` (installed at test time by ``npm_packages``):
its ``api.github.com/index.json`` is a list of ``{name, actions, examples: [body, ...]}``. The
examples are bodies only; the signature is computed here, as GitHub does, over the exact bytes sent.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from .npm_packages import package_dir

SECRET = "It's a Secret to Everybody"


@dataclass(frozen=True)
class Example:
    event: str
    index: int
    payload: dict[str, Any]

    @property
    def body(self) -> bytes:
        # GitHub's bodies are compact JSON; any bytes would do, as long as they are signed.
        return json.dumps(self.payload, separators=(",", ":")).encode()


@functools.cache
def _examples_by_event() -> dict[str, tuple[Example, ...]]:
    index = package_dir("@octokit/webhooks-examples") / "api.github.com" / "index.json"
    found: dict[str, tuple[Example, ...]] = {}
    for entry in json.loads(index.read_text()):
        name = entry["name"]
        found[name] = tuple(Example(name, i, body) for i, body in enumerate(entry["examples"]))
    return found


def examples(*events: str) -> list[Example]:
    """Every official example of `events`, in the package's order."""
    table = _examples_by_event()
    missing = [event for event in events if not table.get(event)]
    if missing:
        raise LookupError(f"@octokit/webhooks-examples has no examples of {missing}")
    return [example for event in events for example in table[event]]


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def new_delivery_id() -> str:
    return str(uuid.uuid4())


def github_headers(event: str, body: bytes, *, delivery_id: str,
                   secret: str | None = SECRET) -> dict[str, str]:
    """The headers GitHub sends with a delivery (no signature when `secret` is None)."""
    headers = {
        "User-Agent": "GitHub-Hookshot/4a9c5b1",
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id,
        "X-GitHub-Hook-ID": "292430182",
        "X-GitHub-Hook-Installation-Target-Type": "integration",
        "X-GitHub-Hook-Installation-Target-ID": "79929171",
    }
    if secret is not None:
        headers["X-Hub-Signature-256"] = sign(body, secret)
    return headers


@dataclass(frozen=True)
class Answer:
    status: int
    json: Any
    seconds: float


async def send(session: aiohttp.ClientSession, url: str, event: str, body: bytes, *,
               delivery_id: str | None = None, secret: str | None = SECRET,
               headers: Mapping[str, str] | None = None) -> Answer:
    """POST one delivery to `url` as GitHub would; the answer and how long it took."""
    sent = dict(github_headers(event, body, delivery_id=delivery_id or new_delivery_id(), secret=secret))
    sent.update(headers or {})
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    async with session.post(url, data=body, headers=sent, timeout=timeout) as response:
        raw = await response.read()
        seconds = time.monotonic() - started
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return Answer(response.status, parsed, seconds)
