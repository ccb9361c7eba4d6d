"""A job as the agent recorded it: the read-only view every part of the agent is given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.job.ids import slurm_job_name
from runner.job.states import JobState


@dataclass(frozen=True)
class JobRecord:
    """One row of `jobs`, with its JSON columns decoded."""

    id: str
    source: str
    external_id: str | None
    identity: dict[str, Any]
    spec: dict[str, Any]
    decision: dict[str, Any] | None
    executor: str | None
    slurm_id: str | None
    state: JobState
    exit_status: int | None
    outcome_detail: str | None
    log_path: str | None
    log_offset: int
    created_at: float
    updated_at: float
    finished_at: float | None
    final_reported: bool
    # Where the job came from, as its source links to it (None: nowhere to link to).
    source_url: str | None = None
    # Why it waits, in Slurm's words (Priority, Resources...), while Slurm keeps it pending.
    state_reason: str | None = None
    # The nodes it runs or ran on, as Slurm names them ("cn[01-04]"); this host for a local job.
    node_list: str | None = None

    @property
    def slurm_job_name(self) -> str:
        """The Slurm job name by which a restarted agent finds this job again in `squeue`."""
        return slurm_job_name(self.id)
