"""How a job ended, as every executor reports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runner.job.outputs import OutputFile
from runner.job.states import JobState

# "infra_failed": the job did not fail, the cluster did (a node failure); another try may work.
# Only the Slurm executor can tell; a local job never ends so. "expired": it waited in Slurm's
# queue past its queue_time and was cancelled there before it ran (Slurm only, too).
OutcomeState = Literal["succeeded", "failed", "timed_out", "cancelled", "infra_failed", "expired"]


@dataclass(frozen=True)
class Outcome:
    """How a job ended; `exit_status` follows the shell: 128+N when killed by signal N."""

    state: OutcomeState
    exit_status: int | None
    detail: str
    # The job did not fail by its own doing (a node failed under it): running it again may work.
    retryable: bool = False


@dataclass(frozen=True)
class Ended:
    """How a job ended, as the agent recorded it: what a source reports to its CI service."""

    state: JobState
    exit_status: int | None
    detail: str | None
    # The declared outputs collected into the job's directory (`outputs`), for its source to
    # hand on; empty when it declared none or never ran.
    outputs: tuple[OutputFile, ...] = ()
    # Files the declared outputs matched that were not collected, each with why (links, the
    # account's max_output_bytes), for its source to say so.
    outputs_left_out: tuple[tuple[str, str], ...] = ()
