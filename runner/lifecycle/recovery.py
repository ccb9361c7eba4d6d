"""What a restarted agent finds of the jobs the previous one had, before it takes new ones.

Jobs still queued run; jobs that ended but whose final status was never recorded get it now; a
job that ran on this node cannot be found again and ends as infra_failed; Slurm jobs are looked
up by their `hpcr-<id>` name (`reconcile`), to be followed again or finished as Slurm says.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from runner.executors.slurm import Reconciliation, SlurmExecutor, SlurmJob, SlurmUnavailable
from runner.job import JobRecord, JobState, Outcome
from runner.lifecycle.driver import JobDriver
from runner.lifecycle.prepare import job_dir
from runner.logging_setup import get_logger

log = get_logger("runner.lifecycle")


def recover_records(driver: JobDriver) -> list[JobRecord]:
    """Settle what the store says a previous agent left; returns the jobs still queued."""
    store = driver.store
    for record in store.list_jobs():
        # ended, but the previous agent stopped before it reported the final status
        if record.state.is_terminal and record.state != JobState.denied and not record.final_reported:
            driver.report_final(record.id)
    for record in store.list_jobs(states=[JobState.running, JobState.pending]):
        if record.executor in (None, "local"):
            driver.finish(record.id, Outcome("infra_failed", None,
                                             "the agent stopped while the job ran locally"))
    return store.list_jobs(states=[JobState.queued])


@dataclass(frozen=True)
class Found:
    """The Slurm jobs of a previous agent, as Slurm knows them now."""

    records: dict[str, JobRecord]
    reconciliation: Reconciliation


async def find_slurm_jobs(driver: JobDriver, slurm: SlurmExecutor) -> Found:
    """Ask Slurm (until it answers) for the jobs a previous agent had submitted; record the Slurm
    ids that were never recorded, and audit the `hpcr-*` jobs no record accounts for."""
    records = {r.id: r for r in driver.store.list_jobs(states=[JobState.pending, JobState.running])
               if r.executor == "slurm"}
    known = [SlurmJob(r.id, job_dir(driver.site.config, r.id), driver.log_path(r), r.slurm_id)
             for r in records.values()]
    delay = 1.0
    while True:
        try:
            found = await slurm.reconcile(known)
            break
        except SlurmUnavailable as exc:
            log.warning("cannot reach Slurm to reattach jobs; retrying", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
    for job_id, job in found.running.items():
        if job.slurm_id is not None:
            driver.store.set_slurm_id(job_id, job.slurm_id, "slurm")
    for row in found.unknown_hpcr:
        log.warning("a Slurm job named like ours is not in the agent's records; an admin should look",
                    slurm_id=row.slurm_id, name=row.name, state=row.state)
        driver.store.append_audit(actor="agent", action="unknown_slurm_job",
                                  detail={"slurm_id": row.slurm_id, "name": row.name, "state": row.state})
    return Found(records, found)
