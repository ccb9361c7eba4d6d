"""`expired` (a job that waited in Slurm's queue past its queue_time and never ran) is its own
outcome everywhere a state is mapped: terminal, never a failure of the job's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import exitcodes
from runner.gateway.jobs_protocol import STATES, TERMINAL, parse_state_update
from runner.job import Ended, JobState
from runner.remote.calls import ending_lines
from runner.sources.buildkite.source import WALLTIME_EXIT_STATUS, finish_report
from runner.sources.github.checks import completion_of, status_state

DETAIL = ("waited 20s in Slurm's queue, past its queue_time of 20s (Slurm's reason: Resources); taken out of "
          "the queue before it started")
EXPIRED = Ended(JobState.expired, None, DETAIL)


def test_expired_is_a_terminal_state_that_the_hub_protocol_takes() -> None:
    assert JobState.expired.is_terminal
    assert "expired" in STATES and "expired" in TERMINAL
    assert parse_state_update({"state": "expired", "reasons": [DETAIL]}).state == "expired"


def test_hpc_runner_run_exits_75_for_an_expired_job_apart_from_walltime_and_failures() -> None:
    assert exitcodes.for_outcome("expired", None) == exitcodes.EXPIRED == 75
    assert len({exitcodes.EXPIRED, exitcodes.TIMED_OUT, exitcodes.CANCELLED, exitcodes.INFRASTRUCTURE,
                exitcodes.DENIED}) == 5


def test_remote_run_says_the_job_expired_and_why() -> None:
    view = {"id": "j1", "state": "expired", "reasons": [DETAIL]}
    assert ending_lines(view) == [f"job j1 expired: {DETAIL}"]


def test_github_shows_an_expired_job_as_timed_out_saying_it_did_not_run() -> None:
    completion = completion_of(EXPIRED)
    assert completion.conclusion == "timed_out"
    assert completion.title == "Expired in the queue: the cluster was busy, the job did not run"
    assert completion.lines == (DETAIL,)
    walltime = completion_of(Ended(JobState.timed_out, None, None))
    assert walltime.title != completion.title


def test_buildkite_finishes_an_expired_job_with_exit_status_75_and_no_signal() -> None:
    report = finish_report(EXPIRED, None, 0)
    assert (report.exit_status, report.signal, report.signal_reason) == (75, None, None)
    assert finish_report(Ended(JobState.timed_out, None, None), None, 0).exit_status == WALLTIME_EXIT_STATUS
    assert status_state("completed", completion_of(EXPIRED).conclusion) == "failure"


def test_the_dashboards_have_a_style_of_their_own_for_expired() -> None:
    css = (Path(__file__).parents[2] / "runner/web/static/dashboard.css").read_text()
    expired = next(line for line in css.splitlines() if ".state-expired" in line)
    failed = next(line for line in css.splitlines() if ".state-failed" in line)
    assert ".state-expired" not in failed and "var(--bad)" not in expired


@pytest.mark.parametrize("state", [s for s in JobState if s.is_terminal])
def test_every_terminal_state_has_a_buildkite_exit_status_and_a_github_conclusion(state: JobState) -> None:
    ended = Ended(state, 1 if state == JobState.failed else None, "why")
    assert finish_report(ended, None, 0).exit_status is not None
    assert completion_of(ended).conclusion
