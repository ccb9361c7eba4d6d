"""A checkout that failed: what the job's log says of it, and the job ended without running.

Each source checks its job's commit out on this node before the job runs (`runner.sources.git`).
When git cannot produce the commit, or the commit is not what the job claims, the job's log gets
git's own output and one line saying why, and the agent ends the job, which never ran. How that
end reaches the CI service is each source's own report.
"""

from __future__ import annotations

from runner.sources import Ended, JobHost
from runner.sources.git import CheckoutFailed


def checkout_failure_lines(failure: CheckoutFailed, *, refused: bool = False) -> str:
    """git's output, then the line saying why; `refused` when the job is not what it claims."""
    output = failure.output if failure.output.endswith("\n") or not failure.output else failure.output + "\n"
    return f"{output}hpc-runner: {'refused: ' if refused else ''}{failure}\n"


def end_failed_checkout(host: JobHost, job_id: str, failure: CheckoutFailed, *,
                        refused: bool = False) -> Ended:
    """Put the failure in the job's log and end the job, which never ran; how it ended."""
    host.note(job_id, checkout_failure_lines(failure, refused=refused))
    return host.fail(job_id, str(failure))
