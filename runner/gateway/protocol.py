"""The gateway's HTTP contract with agents, as plain data and functions (no I/O).

Shared by the gateway (`server`) and the agents' client (`runner.sources.github.gateway_client`),
so both sides agree on paths, headers and limits by construction.

An agent takes a lease with `POST /api/v1/leases?wait=W&seconds=S`: the answer is `200` with the
webhook's raw body and the headers below, or `204` when nothing arrived within `W` seconds. It
then extends (`.../extend?seconds=S`), acknowledges (`.../ack`) or releases (`.../release`) the
lease at `/api/v1/leases/<lease id>/`. Leasing is a POST, not a GET: it changes state, and a proxy
may repeat or cache a GET.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

WEBHOOK_PATH = "/webhook"
HEALTH_PATH = "/healthz"
STATUS_PATH = "/api/v1/status"              # queue counts, for agents and operators
LEASES_PATH = "/api/v1/leases"
LEASE_ACTIONS = ("extend", "ack", "release")

# The webhook's own headers keep GitHub's names and meaning.
EVENT_HEADER = "X-GitHub-Event"
DELIVERY_HEADER = "X-GitHub-Delivery"
LEASE_ID_HEADER = "Hpc-Runner-Lease-Id"
LEASE_SECONDS_HEADER = "Hpc-Runner-Lease-Seconds"     # the granted lease period, from now
LEASE_EXPIRES_HEADER = "Hpc-Runner-Lease-Expires"     # the same as a UTC time, for people reading logs
RECEIVED_AT_HEADER = "Hpc-Runner-Received-At"         # when the gateway received the webhook
ATTEMPT_HEADER = "Hpc-Runner-Attempt"                 # 1 the first time the delivery is handed out

# Many proxies close a connection idle for 60 s; a long poll must end before that.
DEFAULT_WAIT_SECONDS = 25
MAX_WAIT_SECONDS = 55
DEFAULT_LEASE_SECONDS = 120
MIN_LEASE_SECONDS = 1
MAX_LEASE_SECONDS = 3600

# 144 random bits, URL-safe base64 (secrets.token_urlsafe(18)).
LEASE_ID_PATTERN = r"[A-Za-z0-9_-]{24}"
EVENT_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
# GitHub sends a GUID; anything of this shape is accepted, since it only needs to be unique.
DELIVERY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def lease_action_path(lease_id: str, action: str) -> str:
    if action not in LEASE_ACTIONS:
        raise ValueError(f"unknown lease action {action!r}; expected one of {LEASE_ACTIONS}")
    if not re.fullmatch(LEASE_ID_PATTERN, lease_id):
        raise ValueError(f"{lease_id!r} is not a lease id")
    return f"{LEASES_PATH}/{lease_id}/{action}"


def parse_seconds(value: str | None, *, name: str, default: int, minimum: int, maximum: int) -> int:
    """A whole number of seconds from a query parameter; ValueError naming `name` if it is wrong."""
    if value is None or value == "":
        return default
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{name} must be a whole number of seconds, got {value[:40]!r}")
    seconds = int(value)
    if not minimum <= seconds <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum} seconds, got {seconds}")
    return seconds


def parse_wait(value: str | None) -> int:
    """The `wait` of a long poll, in seconds (ValueError naming it)."""
    return parse_seconds(value, name="wait", default=DEFAULT_WAIT_SECONDS, minimum=0,
                         maximum=MAX_WAIT_SECONDS)


def parse_lease_seconds(value: str | None) -> int:
    """The lease length an agent asks for (`seconds`), within the gateway's bounds (ValueError naming it)."""
    return parse_seconds(value, name="seconds", default=DEFAULT_LEASE_SECONDS, minimum=MIN_LEASE_SECONDS,
                         maximum=MAX_LEASE_SECONDS)


def format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class LeaseHeaders:
    """What the headers of a `200` lease answer say about the delivery in its body."""

    event: str
    delivery_id: str
    lease_id: str
    lease_seconds: int
    received_at: float
    attempt: int


def lease_headers(*, event: str, delivery_id: str, lease_id: str, lease_seconds: int,
                  lease_expires_at: float, received_at: float, attempt: int) -> dict[str, str]:
    return {
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        LEASE_ID_HEADER: lease_id,
        LEASE_SECONDS_HEADER: str(lease_seconds),
        LEASE_EXPIRES_HEADER: format_time(lease_expires_at),
        RECEIVED_AT_HEADER: format_time(received_at),
        ATTEMPT_HEADER: str(attempt),
    }


def parse_lease_headers(headers: Mapping[str, str]) -> LeaseHeaders:
    """Read a lease answer's headers (a case-insensitive mapping); ValueError naming what is wrong."""
    def get(name: str) -> str:
        value = headers.get(name)
        if value is None:
            raise ValueError(f"the gateway's answer has no {name} header")
        return value

    event, delivery_id, lease_id = get(EVENT_HEADER), get(DELIVERY_HEADER), get(LEASE_ID_HEADER)
    if not EVENT_PATTERN.fullmatch(event):
        raise ValueError(f"{EVENT_HEADER} {event[:80]!r} is not an event name")
    if not DELIVERY_ID_PATTERN.fullmatch(delivery_id):
        raise ValueError(f"{DELIVERY_HEADER} {delivery_id[:80]!r} is not a delivery id")
    if not re.fullmatch(LEASE_ID_PATTERN, lease_id):
        raise ValueError(f"{LEASE_ID_HEADER} is not a lease id")
    try:
        lease_seconds = parse_seconds(get(LEASE_SECONDS_HEADER), name=LEASE_SECONDS_HEADER, default=0,
                                      minimum=MIN_LEASE_SECONDS, maximum=MAX_LEASE_SECONDS)
        received_at = parse_time(get(RECEIVED_AT_HEADER))
    except ValueError as exc:
        raise ValueError(f"the gateway's answer has a malformed header: {exc}") from None
    attempt_text = get(ATTEMPT_HEADER)
    if not attempt_text.isascii() or not attempt_text.isdigit() or int(attempt_text) < 1:
        raise ValueError(f"{ATTEMPT_HEADER} {attempt_text[:20]!r} is not a positive whole number")
    return LeaseHeaders(event, delivery_id, lease_id, lease_seconds, received_at, int(attempt_text))
