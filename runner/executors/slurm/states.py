"""What a Slurm job state means for a CI job: pending, running, or finished with which outcome.

Pure: the tracker feeds in what squeue and scontrol printed and what the batch script wrote into
the job's exit-status file. The exit status comes from that file whenever it exists (Slurm's own
ExitCode is only the fallback), so a job's exit code is exact without Slurm accounting.

Nothing here turns a failed or missing query into a state: "Slurm did not answer" is the
caller's business (it keeps the previous state), and "Slurm no longer knows the job" is only
concluded from two queries that both succeeded (`interpret_missing`).
"""

from __future__ import annotations

import datetime
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from runner.job import Outcome

__all__ = [
    "FINAL_STATES",
    "PENDING_ESTIMATE_STEP_SECONDS",
    "PENDING_STATES",
    "RUNNING_STATES",
    "JobReport",
    "Phase",
    "Status",
    "interpret",
    "interpret_missing",
    "normalize_state",
    "parse_exit_code",
    "parse_exit_status",
    "pending_line",
    "pending_line_due",
    "report_from_record",
]

Phase = Literal["pending", "running", "finished", "unknown"]

# squeue's long state names (squeue(1) JOB STATE CODES).
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                            "RESV_DEL_HOLD"})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED",
                            "STOPPED"})
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "DEADLINE", "OUT_OF_MEMORY",
                          "NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"})
# A new "estimated start" line only when the estimate moved by this much: the backfill scheduler
# recomputes it on every pass, and a log full of near-identical estimates helps nobody.
PENDING_ESTIMATE_STEP_SECONDS = 300
RETRYABLE = "not the job's fault; a retry may succeed"
_QUIET_REASONS = frozenset({"", "None", "NonZeroExitCode"})


@dataclass(frozen=True)
class JobReport:
    """What Slurm said about one job: squeue's state and reason, and, for a job that ended,
    scontrol's ExitCode ("N:S"), Requeue flag and TimeLimit."""

    state: str
    reason: str | None = None
    exit_code: str | None = None
    requeue: bool | None = None
    time_limit: str | None = None


@dataclass(frozen=True)
class Status:
    """Where the job is; `note` is a line for the job's log when the state has just changed."""

    phase: Phase
    outcome: Outcome | None = None
    note: str | None = None


def report_from_record(record: Mapping[str, str], *, state: str | None = None,
                       reason: str | None = None) -> JobReport:
    """A JobReport from `scontrol show job`'s record; `state` and `reason` (squeue's) win over
    the record's when given, so that one poll is interpreted as one consistent picture."""
    requeue = record.get("Requeue")
    return JobReport(state or normalize_state(record.get("JobState", "")),
                     reason=record.get("Reason", reason),
                     exit_code=record.get("ExitCode"),
                     requeue=None if requeue is None else requeue.strip() == "1",
                     time_limit=record.get("TimeLimit"))


def normalize_state(text: str) -> str:
    """squeue's or scontrol's state as one of the names above: "CANCELLED by 0" -> CANCELLED,
    and a narrow column's "CANCELLED+" -> CANCELLED."""
    word = text.strip().split(" ", 1)[0]
    return word.rstrip("+").upper()


def parse_exit_status(text: str) -> int | None:
    """The exit-status file's content: a decimal number and a newline; anything else is None."""
    value = text.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 3:
        return None
    number = int(value)
    return number if number <= 255 else None


def parse_exit_code(text: str | None) -> int | None:
    """scontrol's ExitCode "N:S" as a shell would report it: N, or 128+S when killed by signal S."""
    if not text or ":" not in text:
        return None
    code, _, sig = text.partition(":")
    if not (code.isdigit() and sig.isdigit()):
        return None
    return 128 + int(sig) if int(sig) else int(code)


def interpret(report: JobReport, *, exit_status: int | None, was_running: bool) -> Status:
    """The job's phase (and outcome, when it ended) from Slurm's report and the exit-status file."""
    state = report.state
    if state in PENDING_STATES:
        return Status("pending", note=_pending_note(report, was_running))
    if state in RUNNING_STATES:
        note = {"SUSPENDED": "hpc-runner: Slurm suspended the job; it resumes where it stopped",
                "STOPPED": "hpc-runner: Slurm stopped the job; it resumes where it stopped"}.get(state)
        return Status("running", note=note)
    if state in FINAL_STATES:
        return _finished(report, exit_status)
    return Status("unknown", note=f"hpc-runner: Slurm reports the job in state {state}, "
                                  "which hpc-runner does not know; still watching it")


def interpret_missing(slurm_id: str, exit_status: int | None) -> Status:
    """A job that neither squeue nor scontrol knows any more (it ended longer than MinJobAge ago,
    or the controller lost its state): only the exit-status file can still tell how it ended."""
    if exit_status is not None:
        outcome = _exit_outcome(exit_status, f"; Slurm no longer knows job {slurm_id}")
        return Status("finished", outcome)
    return Status("finished", Outcome(
        "infra_failed", None,
        f"Slurm no longer knows job {slurm_id} and the job left no exit status; {RETRYABLE}"))


def pending_line(reason: str | None, estimated_start: str | None) -> str:
    """The log line for a pending job: "hpc-runner: pending: Resources; estimated start ..."."""
    text = "hpc-runner: pending"
    if reason and reason != "None":
        text += f": {reason}"
    if estimated_start:
        text += f"; estimated start {estimated_start}"
    return text


def pending_line_due(previous: tuple[str | None, str | None] | None,
                     current: tuple[str | None, str | None]) -> bool:
    """Whether (reason, estimated start) changed enough since the last line to write another."""
    if previous is None:
        return True
    (old_reason, old_start), (reason, start) = previous, current
    if reason != old_reason:
        return True
    if start == old_start:
        return False
    if old_start is None or start is None:
        return True
    try:
        moved = abs((_parse_time(start) - _parse_time(old_start)).total_seconds())
    except ValueError:
        return True
    return moved >= PENDING_ESTIMATE_STEP_SECONDS


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def _pending_note(report: JobReport, was_running: bool) -> str | None:
    reason = f" (reason: {report.reason})" if report.reason and report.reason != "None" else ""
    if report.state == "REQUEUE_HOLD":
        return f"hpc-runner: Slurm requeued the job and holds it{reason}; it will start again from the top"
    if report.state in ("REQUEUED", "REQUEUE_FED"):
        return f"hpc-runner: Slurm requeued the job{reason}; it will start again from the top"
    if report.state == "RESV_DEL_HOLD":
        return "hpc-runner: Slurm holds the job: its reservation was deleted"
    if was_running:
        return f"hpc-runner: Slurm put the job back in the queue{reason}; it will start again from the top"
    return None


def _finished(report: JobReport, exit_status: int | None) -> Status:
    state = report.state
    status = exit_status if exit_status is not None else parse_exit_code(report.exit_code)
    slurm_says = _slurm_reason(report)
    if state == "COMPLETED":
        # The script exits with the job's status, so COMPLETED alone already means 0.
        return Status("finished", _exit_outcome(status if status is not None else 0, slurm_says))
    if state == "FAILED" and exit_status is None and report.reason == "JobLaunchFailure":
        # The batch script never ran (its output file could not be opened, the node lacks the
        # working directory...): an infrastructure problem, and the "exit code" is Slurm's own.
        return Status("finished", Outcome(
            "infra_failed", None, "Slurm could not start the batch script (JobLaunchFailure); "
                                  "the node's slurmd log says why"))
    if state in ("FAILED", "SPECIAL_EXIT"):
        if status is None or status == 0:
            return Status("finished", Outcome("failed", status, f"Slurm reports {state}{slurm_says}"))
        return Status("finished", _exit_outcome(status, slurm_says))
    if state == "OUT_OF_MEMORY":
        return Status("finished", Outcome("failed", status, "out of memory (OUT_OF_MEMORY)"))
    if state == "CANCELLED":
        return Status("finished", Outcome("cancelled", status, f"cancelled in Slurm{slurm_says}"))
    if state == "TIMEOUT":
        limit = f" of {report.time_limit}" if report.time_limit else ""
        return Status("finished", Outcome("timed_out", status, f"walltime{limit} exceeded (TIMEOUT)"))
    if state == "DEADLINE":
        return Status("finished", Outcome("timed_out", status, "the job's deadline passed (DEADLINE)"))
    if state == "PREEMPTED":
        if report.requeue:
            return Status("pending", note="hpc-runner: Slurm preempted the job; it will be requeued "
                                          "and start again from the top")
        return Status("finished", Outcome(
            "infra_failed", status, f"preempted by another job and not requeued (PREEMPTED); {RETRYABLE}"))
    what = {"NODE_FAIL": "a node of the job failed (NODE_FAIL)",
            "BOOT_FAIL": "a node of the job failed to boot (BOOT_FAIL)",
            "REVOKED": "the job was revoked by the federation (REVOKED)"}[state]
    # A revoked job left for another cluster of the federation: running it here again is wrong.
    return Status("finished", Outcome("infra_failed", status, f"{what}; {RETRYABLE}",
                                      retryable=state != "REVOKED"))


def _slurm_reason(report: JobReport) -> str:
    if report.reason is None or report.reason in _QUIET_REASONS:
        return ""
    return f" (Slurm: {report.reason})"


def _exit_outcome(status: int, suffix: str = "") -> Outcome:
    if status == 0:
        return Outcome("succeeded", 0, f"exit status 0{suffix}")
    name = _signal_name(status - 128) if status > 128 else None
    if name:
        # What a shell and srun report for a process killed by a signal (or one that chose it).
        return Outcome("failed", status, f"exit status {status} (128 + {name}){suffix}")
    return Outcome("failed", status, f"exit status {status}{suffix}")


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None
