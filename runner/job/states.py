"""The states of a job, whatever its source and executor."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    queued = "queued"
    denied = "denied"
    pending = "pending"          # submitted to Slurm, waiting for resources
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"
    infra_failed = "infra_failed"
    # Waited in Slurm's queue past its queue_time and was taken out of it: the cluster was busy,
    # the job itself never ran, so nothing about it failed.
    expired = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({
    JobState.denied, JobState.succeeded, JobState.failed, JobState.cancelled,
    JobState.timed_out, JobState.infra_failed, JobState.expired,
})
# Jobs holding (or about to hold) cluster resources: what a project account's concurrency cap counts.
ACTIVE_STATES = (JobState.pending, JobState.running)
