"""Why a job waits, as the agent says it on its own dashboard and to the hub: Slurm's own reason
(Priority, Resources, QOSMaxJobsPerUserLimit...) while Slurm keeps the job pending, its account's
cap while it waits in the agent's queue for a place ("account esm runs 5 of 5 jobs"), else what
the agent knows itself (its own queue's slots, or Slurm not having said yet)."""

from __future__ import annotations

from runner.job.record import JobRecord
from runner.job.states import JobState

__all__ = ["WAITING_REASONS", "waiting_reason"]

WAITING_REASONS = {JobState.queued: "waiting for a free slot on the agent",
                   JobState.pending: "queued in Slurm"}

# What Slurm says of a job its scheduler has not looked at yet: nothing to show.
_NO_REASON = ("", "None")


def waiting_reason(record: JobRecord) -> str | None:
    """Why the job waits, or None when it does not (it runs or ended)."""
    if record.state in (JobState.pending, JobState.queued) and record.state_reason not in (None, *_NO_REASON):
        return record.state_reason
    return WAITING_REASONS.get(record.state)
