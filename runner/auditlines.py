"""The audit trail's line format, one definition for the agent's `hpc-runner audit` and the hub's
`GET /api/v1/audit` (and `hpc-runner remote audit`, which prints the hub's as the agent's).

Each entry is an object of `KEYS`, in this order, every key on every line (null when unknown):
the entry's own seq, time, action, actor and detail, and the facts of the job it is about as
they are now (its source, principal, grant, account, Slurm id, state and exit status). Times are
RFC 3339 UTC with milliseconds, so a SIEM reading both sources parses them alike.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from runner.errors import InputError

# The keys of a JSON line, in this order, every one on every line (null when unknown).
KEYS = ("seq", "time", "action", "actor", "job_id", "source", "principal", "grant", "account",
        "slurm_id", "state", "exit_status", "detail")


def rfc3339(seconds: float) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(text: str, *, name: str = "--since") -> float:
    """Seconds since the epoch from a date (midnight UTC) or an RFC 3339 time with its offset;
    InputError naming `name` otherwise."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()
        moment = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or "T" not in value.upper() or moment.tzinfo is None:
        raise InputError(f"{name} {text!r} is neither a date (2026-12-01) nor an RFC 3339 time with its "
                         "offset (2026-12-01T08:00:00Z, 2026-12-01T09:00:00+01:00)")
    return moment.timestamp()


def entry(*, seq: int, at: float, action: str, actor: str, job_id: str | None, source: str | None,
          principal: str | None, grant: str | None, account: str | None, slurm_id: str | None,
          state: str | None, exit_status: int | None, detail: Mapping[str, Any]) -> dict[str, Any]:
    """An entry as a line's object (`KEYS`)."""
    return {"seq": seq, "time": rfc3339(at), "action": action, "actor": actor, "job_id": job_id,
            "source": source, "principal": principal, "grant": grant, "account": account,
            "slurm_id": slurm_id, "state": state, "exit_status": exit_status, "detail": dict(detail)}


def json_line(item: Mapping[str, Any]) -> str:
    """One JSON line (with its newline) of exactly `KEYS`, in their order; KeyError for a missing one."""
    return json.dumps({key: item[key] for key in KEYS}, separators=(",", ":")) + "\n"


def text_line(item: Mapping[str, Any]) -> str:
    """One readable line (with its newline): time, seq, action, job and actor, the job's facts in
    brackets, the detail as compact JSON."""
    about = f" job {item['job_id']}" if item["job_id"] else ""
    facts = [f"{key} {item[key]}" for key in ("source", "principal", "grant", "account") if item[key]]
    if item["slurm_id"]:
        facts.append(f"slurm {item['slurm_id']}")
    if item["state"]:
        ended = "" if item["exit_status"] is None else f" (exit {item['exit_status']})"
        facts.append(f"now {item['state']}{ended}")
    job = f" [{', '.join(facts)}]" if facts else ""
    detail = json.dumps(item["detail"], sort_keys=True, separators=(",", ":")) if item["detail"] else ""
    return f"{item['time']} #{item['seq']} {item['action']}{about} by {item['actor']}{job}" + \
        (f" {detail}" if detail else "") + "\n"


def read_line(text: str) -> dict[str, Any]:
    """A JSON line back into its object; ValueError unless it is an object of exactly `KEYS`."""
    item = json.loads(text)
    if not isinstance(item, dict) or set(item) != set(KEYS):
        raise ValueError(f"not an audit line of the keys {', '.join(KEYS)}: {text[:200]!r}")
    return item
