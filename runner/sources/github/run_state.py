"""What the GitHub source keeps of one job: the record a restarted agent follows and reports it from,
and the handle a cancel request reaches a running job through."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from runner.sources.github.state import RunRow


@dataclass
class RunState:
    """What `runs.data` holds for one job: enough to follow and report it after a restart."""

    external_id: str
    trigger_key: str
    repository: str
    sha: str
    job: str
    spec: dict[str, Any]
    identity: dict[str, Any]
    ref: str
    clone_url: str
    number: int | None = None
    job_id: str | None = None
    summary: str = ""
    title: str = ""
    details_url: str | None = None
    kind: str | None = None             # "check" or "status" once the report exists
    check_run_id: int | None = None
    phase: str = "new"                  # new, admitted, running (host.run called), reported

    @classmethod
    def from_row(cls, row: RunRow) -> RunState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in row.data.items() if k in known})


@dataclass
class LiveRun:
    """A job this agent is running now, for cancellation."""

    state: RunState
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled_by: str | None = None
