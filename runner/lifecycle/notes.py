"""Where the lifecycle's own lines about a job go (a denial, a refusal, a retry, results not
copied back): into the job's log for the agent, so they reach the job's CI service and the
local queue's `logs` with its output; to stderr for `hpc-runner run`, whose stdout is the job's
output alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol


class Notes(Protocol):
    def __call__(self, log_path: Path, text: str) -> None: ...


def append_to_log(log_path: Path, text: str) -> None:
    """Append to the job's log, making its directory (only the agent's account may enter it)."""
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(text)


def to_stderr(log_path: Path, text: str) -> None:
    """`hpc-runner run`'s notes."""
    sys.stderr.write(text)
    sys.stderr.flush()
