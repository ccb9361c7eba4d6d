"""What to do with one incoming webhook, decided without I/O: refuse it, ignore it, or queue it.

The order of the checks matters: nothing of the body is looked at (not even its JSON) before the
signature proves it came from GitHub, and a refused webhook is never queued. The signature has
no timestamp, so replays are stopped by deduplicating on `X-GitHub-Delivery` (in the queue).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from runner.gateway.protocol import DELIVERY_HEADER, DELIVERY_ID_PATTERN, EVENT_HEADER, EVENT_PATTERN
from runner.gateway.signature import signature_matches

SIGNATURE_HEADER = "X-Hub-Signature-256"
LEGACY_SIGNATURE_HEADER = "X-Hub-Signature"
# GitHub fires no webhook for a larger payload ("Payloads are capped at 25 MB"). Read as MiB, the
# larger of the two meanings, so that no payload GitHub sends is ever refused.
MAX_BODY_BYTES = 25 * 1024 * 1024
# The events the agents act on; anything else is answered 2xx and dropped.
WANTED_EVENTS = frozenset({"pull_request", "issue_comment", "push", "check_run"})


@dataclass(frozen=True)
class Refused:
    """Answer `status` and queue nothing."""

    status: int
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A genuine webhook of an event no agent acts on: answer 2xx, queue nothing."""

    event: str
    delivery_id: str
    reason: str


@dataclass(frozen=True)
class Accepted:
    """A genuine webhook to queue (once: its delivery id may have been seen before)."""

    event: str
    delivery_id: str
    body: bytes
    action: str | None          # the payload's "action", for the log


Verdict = Refused | Ignored | Accepted


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def refuse_before_reading(headers: Mapping[str, str], content_length: int | None) -> Refused | None:
    """A refusal that needs no body: too large, or not signed at all."""
    if content_length is not None and content_length > MAX_BODY_BYTES:
        return too_large(content_length)
    lowered = _lowered(headers)
    if SIGNATURE_HEADER.lower() not in lowered:
        if LEGACY_SIGNATURE_HEADER.lower() in lowered:
            return Refused(401, f"only a SHA-1 {LEGACY_SIGNATURE_HEADER} header; "
                                f"{SIGNATURE_HEADER} (HMAC-SHA256) is required")
        return Refused(401, f"no {SIGNATURE_HEADER} header: the webhook must have a secret")
    return None


def too_large(size: int | None = None) -> Refused:
    got = f" ({size} bytes)" if size is not None else ""
    return Refused(413, f"the body is larger than {MAX_BODY_BYTES} bytes{got}")


def check_webhook(headers: Mapping[str, str], body: bytes, secret: bytes) -> Verdict:
    """Decide about one webhook from its headers and raw body, keyed with the webhook secret."""
    early = refuse_before_reading(headers, len(body))
    if early is not None:
        return early
    lowered = _lowered(headers)
    if not signature_matches(secret, body, lowered[SIGNATURE_HEADER.lower()]):
        return Refused(401, f"{SIGNATURE_HEADER} does not match the body under the webhook secret")
    # Only now is the sender known to hold the secret: what it says is worth reading.
    media_type = lowered.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return Refused(415, f"content type {media_type or 'none'!r} is not application/json: "
                            "set the webhook's content type to application/json")
    event = lowered.get(EVENT_HEADER.lower())
    if event is None or not EVENT_PATTERN.fullmatch(event):
        return Refused(400, f"{EVENT_HEADER} is missing or not an event name")
    delivery_id = lowered.get(DELIVERY_HEADER.lower())
    if delivery_id is None or not DELIVERY_ID_PATTERN.fullmatch(delivery_id):
        return Refused(400, f"{DELIVERY_HEADER} is missing or not a delivery id")
    if event not in WANTED_EVENTS:
        return Ignored(event, delivery_id, f"no agent acts on {event!r} events "
                                           f"(only {', '.join(sorted(WANTED_EVENTS))})")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return Refused(400, "the body is not JSON")
    if not isinstance(payload, dict):
        return Refused(400, "the body is not a JSON object")
    action = payload.get("action")
    return Accepted(event, delivery_id, body, action if isinstance(action, str) else None)
