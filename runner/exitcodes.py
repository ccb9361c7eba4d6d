"""Exit statuses of the CLI, as the README's "Commands" table states them."""

OK = 0
INVALID_INPUT = 1          # policy check / explain on invalid files
CHECK_FAILED = 1           # verify-outputs: a file is missing or differs from the record, as a failed job
USAGE = 2                  # argparse's own status for bad arguments
INFRASTRUCTURE = 125       # the job could not be started: not the job's fault
DENIED = 126               # the policy said no
TIMED_OUT = 124            # as timeout(1): the job ran past its walltime
CANCELLED = 130            # as a shell reports Ctrl-C
EXPIRED = 75               # EX_TEMPFAIL: it waited in Slurm's queue past its queue_time; try later


def for_outcome(state: str, exit_status: int | None) -> int:
    """The exit status of `hpc-runner run` for a finished job."""
    if state == "succeeded":
        return OK
    if state == "timed_out":
        return TIMED_OUT
    if state == "cancelled":
        return CANCELLED
    if state == "expired":
        return EXPIRED
    if state == "failed" and exit_status is not None:
        return exit_status if 0 < exit_status < 256 else 1
    return INFRASTRUCTURE
