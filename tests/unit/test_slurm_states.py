"""What every Slurm job state means for a CI job, with and without the exit-status file."""

from __future__ import annotations

import pytest

from runner.executors.slurm.states import (
    FINAL_STATES,
    PENDING_STATES,
    RUNNING_STATES,
    JobReport,
    Status,
    interpret,
    interpret_missing,
    normalize_state,
    parse_exit_code,
    parse_exit_status,
    pending_line,
    pending_line_due,
    report_from_record,
)
from runner.job import Outcome

# Every state squeue(1) documents, long names.
SQUEUE_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD",
    "REQUEUED", "RESIZING", "REVOKED", "SIGNALING", "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SUSPENDED",
    "TIMEOUT",
}


def finished(state: str, *, exit_status: int | None = None, exit_code: str | None = None,
             reason: str | None = None, requeue: bool | None = False,
             time_limit: str | None = None) -> Outcome:
    status = interpret(JobReport(state, reason=reason, exit_code=exit_code, requeue=requeue,
                                 time_limit=time_limit), exit_status=exit_status, was_running=True)
    assert status.phase == "finished" and status.outcome is not None, status
    return status.outcome


def test_every_documented_state_has_a_meaning() -> None:
    assert SQUEUE_STATES == PENDING_STATES | RUNNING_STATES | FINAL_STATES
    assert not PENDING_STATES & RUNNING_STATES
    assert not (PENDING_STATES | RUNNING_STATES) & FINAL_STATES


@pytest.mark.parametrize("state", sorted(PENDING_STATES))
def test_waiting_states_are_pending(state: str) -> None:
    status = interpret(JobReport(state, reason="Resources"), exit_status=None, was_running=False)
    assert status.phase == "pending" and status.outcome is None


@pytest.mark.parametrize("state", sorted(RUNNING_STATES))
def test_allocated_states_are_running_even_with_a_stale_exit_status(state: str) -> None:
    status = interpret(JobReport(state), exit_status=3, was_running=True)
    assert status.phase == "running" and status.outcome is None


@pytest.mark.parametrize("state", ["SUSPENDED", "STOPPED"])
def test_a_suspended_job_gets_a_line_saying_so(state: str) -> None:
    note = interpret(JobReport(state), exit_status=None, was_running=True).note
    assert note is not None and note.startswith("hpc-runner: Slurm ")


def test_completed_succeeds_or_fails_by_the_exit_status_file() -> None:
    assert finished("COMPLETED", exit_status=0) == Outcome("succeeded", 0, "exit status 0")
    assert finished("COMPLETED", exit_status=3) == Outcome("failed", 3, "exit status 3")
    # No file (a full disk): COMPLETED alone means the script, which exits with the job's status, exited 0.
    assert finished("COMPLETED", exit_code="0:0").state == "succeeded"


def test_failed_takes_its_exit_status_from_the_file_else_from_slurm() -> None:
    assert finished("FAILED", exit_status=3, exit_code="1:0") == Outcome("failed", 3, "exit status 3")
    from_slurm = finished("FAILED", exit_code="3:0", reason="NonZeroExitCode")
    assert from_slurm == Outcome("failed", 3, "exit status 3")
    killed = finished("FAILED", exit_code="0:9")
    assert killed == Outcome("failed", 137, "exit status 137 (128 + SIGKILL)")
    late = finished("FAILED", exit_status=1, exit_code="1:0", reason="JobLaunchFailure")
    assert late == Outcome("failed", 1, "exit status 1 (Slurm: JobLaunchFailure)")
    unknown = finished("FAILED")
    assert unknown.state == "failed" and unknown.exit_status is None and "FAILED" in unknown.detail


def test_a_batch_script_slurm_could_not_start_is_an_infrastructure_failure() -> None:
    # What slurmd reports when it cannot open the job's output file: ExitCode 0:53, not a signal.
    outcome = finished("FAILED", exit_code="0:53", reason="JobLaunchFailure")
    assert outcome.state == "infra_failed" and outcome.exit_status is None
    assert "JobLaunchFailure" in outcome.detail


def test_out_of_memory_fails_saying_so() -> None:
    oom = finished("OUT_OF_MEMORY", exit_code="0:9")
    assert oom == Outcome("failed", 137, "out of memory (OUT_OF_MEMORY)")
    assert finished("OUT_OF_MEMORY", exit_status=1).exit_status == 1


def test_cancelled_is_cancelled() -> None:
    assert finished("CANCELLED", exit_code="0:15").state == "cancelled"
    assert finished("CANCELLED", exit_status=143).exit_status == 143


@pytest.mark.parametrize("state", ["TIMEOUT", "DEADLINE"])
def test_time_limits_end_timed_out(state: str) -> None:
    outcome = finished(state, exit_code="0:15", time_limit="00:01:00")
    assert outcome.state == "timed_out" and state in outcome.detail
    if state == "TIMEOUT":
        assert "walltime of 00:01:00 exceeded" in outcome.detail


@pytest.mark.parametrize("state", ["NODE_FAIL", "BOOT_FAIL", "REVOKED"])
def test_infrastructure_failures_are_retryable(state: str) -> None:
    outcome = finished(state, exit_code="0:0")
    assert outcome.state == "infra_failed" and state in outcome.detail and "retry" in outcome.detail


def test_preemption_ends_the_job_unless_slurm_will_requeue_it() -> None:
    # Submitted with --no-requeue (Requeue=0), a preempted job never comes back.
    assert finished("PREEMPTED", requeue=False).state == "infra_failed"
    assert finished("PREEMPTED", requeue=None).state == "infra_failed"
    requeued = interpret(JobReport("PREEMPTED", requeue=True), exit_status=None, was_running=True)
    assert requeued.phase == "pending" and requeued.note is not None and "requeued" in requeued.note


def test_special_exit_is_a_failure() -> None:
    assert finished("SPECIAL_EXIT", exit_code="5:0") == Outcome("failed", 5, "exit status 5")


@pytest.mark.parametrize("state", ["REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"])
def test_requeues_keep_the_job_in_progress_with_a_line(state: str) -> None:
    status = interpret(JobReport(state, reason="BeginTime"), exit_status=0, was_running=True)
    assert status.phase == "pending" and status.outcome is None
    assert status.note is not None and "requeued" in status.note and "from the top" in status.note


def test_pending_again_after_running_says_the_job_will_start_again() -> None:
    before = interpret(JobReport("PENDING", reason="Priority"), exit_status=None, was_running=False)
    assert before == Status("pending")
    after = interpret(JobReport("PENDING", reason="BeginTime"), exit_status=None, was_running=True)
    assert after.phase == "pending" and after.note is not None
    assert "back in the queue (reason: BeginTime)" in after.note


def test_a_state_nobody_knows_keeps_the_job_watched() -> None:
    status = interpret(JobReport("LAUNCHED_ON_MARS"), exit_status=0, was_running=True)
    assert status.phase == "unknown" and status.outcome is None
    assert status.note is not None and "LAUNCHED_ON_MARS" in status.note


def test_a_job_slurm_forgot_is_judged_by_its_exit_status_file() -> None:
    forgotten = "Slurm no longer knows job 42"
    assert interpret_missing("42", 0).outcome == Outcome("succeeded", 0, f"exit status 0; {forgotten}")
    assert interpret_missing("42", 2).outcome == Outcome("failed", 2, f"exit status 2; {forgotten}")
    lost = interpret_missing("42", None).outcome
    assert lost is not None and lost.state == "infra_failed" and "no longer knows job 42" in lost.detail


@pytest.mark.parametrize(("text", "state"), [("CANCELLED by 0", "CANCELLED"), ("CANCELLED+", "CANCELLED"),
                                             (" running ", "RUNNING"), ("NODE_FAIL", "NODE_FAIL")])
def test_state_names_are_normalized(text: str, state: str) -> None:
    assert normalize_state(text) == state


@pytest.mark.parametrize(("text", "value"), [
    ("0\n", 0), ("3\n", 3), ("255", 255), ("256\n", None), ("", None), ("-1", None), ("3 4", None),
    ("٣", None), ("12345", None)])
def test_exit_status_file_contents(text: str, value: int | None) -> None:
    assert parse_exit_status(text) == value


@pytest.mark.parametrize(("text", "value"), [
    ("0:0", 0), ("3:0", 3), ("0:15", 143), ("1:9", 137), (None, None), ("", None), ("x:0", None),
    ("3", None)])
def test_scontrol_exit_codes(text: str | None, value: int | None) -> None:
    assert parse_exit_code(text) == value


def test_a_scontrol_record_becomes_a_report() -> None:
    record = {"JobState": "TIMEOUT", "Reason": "TimeLimit", "ExitCode": "0:15", "Requeue": "0",
              "TimeLimit": "00:01:00"}
    assert report_from_record(record) == JobReport("TIMEOUT", "TimeLimit", "0:15", False, "00:01:00")
    assert report_from_record(record, state="COMPLETING").state == "COMPLETING"
    assert report_from_record({"JobState": "PREEMPTED", "Requeue": "1"}).requeue is True
    assert report_from_record({"JobState": "FAILED"}, reason="NonZeroExitCode").reason == "NonZeroExitCode"


def test_pending_lines() -> None:
    assert pending_line("Resources", "2026-11-26T10:00:00") == (
        "hpc-runner: pending: Resources; estimated start 2026-11-26T10:00:00")
    assert pending_line("Priority", None) == "hpc-runner: pending: Priority"
    assert pending_line("None", None) == "hpc-runner: pending"


def test_a_new_pending_line_only_when_the_news_is_worth_it() -> None:
    first = ("Resources", "2026-11-26T10:00:00")
    assert pending_line_due(None, first)
    assert not pending_line_due(first, first)
    assert pending_line_due(first, ("Priority", "2026-11-26T10:00:00"))
    assert not pending_line_due(first, ("Resources", "2026-11-26T10:04:59"))
    assert pending_line_due(first, ("Resources", "2026-11-26T10:05:00"))
    assert pending_line_due(first, ("Resources", "2026-11-26T09:55:00"))
    assert pending_line_due(first, ("Resources", None))
    assert pending_line_due(("Resources", None), first)
    assert pending_line_due(first, ("Resources", "Tomorr 10:00"))
