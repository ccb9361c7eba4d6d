"""What the hub's outbound hooks are sent: which hooks a job's new state fires, the body, its
signature and the retry schedule. Pure; the deliveries are `hook_delivery`'s, their outbox is kept
in the job store, and the `[[hooks]]` tables are read by `runner.hook_tables`.

Each state change of a job is POSTed as `{"event": "job.state", "job": <GET /api/v1/jobs/ID>}`,
signed as GitHub signs its webhooks: `X-Hpc-Runner-Signature-256: sha256=<hex HMAC-SHA256 of the
raw body>` with the hook's secret, so a receiver's GitHub webhook check works unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runner.hook_tables import Hook

EVENT = "job.state"
EVENT_HEADER = "X-Hpc-Runner-Event"
DELIVERY_HEADER = "X-Hpc-Runner-Delivery"
SIGNATURE_HEADER = "X-Hpc-Runner-Signature-256"


@dataclass(frozen=True)
class HookTarget:
    """A hook with its secret read, ready to sign deliveries."""

    hook: Hook
    secret: bytes

    @property
    def url(self) -> str:
        return self.hook.url


@dataclass(frozen=True)
class RetrySchedule:
    """Exponential backoff, `first` seconds doubling up to `longest`; a delivery still failing
    `give_up_after` seconds after its state change is given up (and logged)."""

    first: float = 10.0
    longest: float = 3600.0
    give_up_after: float = 24 * 3600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1 for the first)."""
        return min(self.first * 2.0 ** min(max(failures - 1, 0), 60), self.longest)

    def gives_up(self, first_queued: float, now: float) -> bool:
        return now - first_queued >= self.give_up_after


DEFAULT_SCHEDULE = RetrySchedule()


def event_body(job_view: dict[str, Any]) -> bytes:
    """The body of a job's state change: the job exactly as `GET /api/v1/jobs/ID` shows it."""
    return json.dumps({"event": EVENT, "job": job_view}, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def signature(secret: bytes, body: bytes) -> str:
    """The value of `X-Hpc-Runner-Signature-256` for `body`, GitHub's format."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def headers(secret: bytes, body: bytes, delivery_id: str) -> dict[str, str]:
    """Every header of a delivery."""
    return {"Content-Type": "application/json", EVENT_HEADER: EVENT, DELIVERY_HEADER: delivery_id,
            SIGNATURE_HEADER: signature(secret, body)}


def outbox_entries(hooks: Sequence[Hook], state: str, job_view: dict[str, Any]) -> list[tuple[str, bytes]]:
    """For a job that just entered `state`: (hook URL, body) for every hook that state fires."""
    firing = [hook.url for hook in hooks if hook.fires_on(state)]
    if not firing:
        return []
    body = event_body(job_view)
    return [(url, body) for url in firing]
