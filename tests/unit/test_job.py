"""What a job is: its id, the name of its Slurm job, its states."""

from __future__ import annotations

import re
import time

import pytest

from runner.job import JobState, new_job_id, slurm_job_name


def test_job_ids_are_unique_safe_and_sorted_by_creation_time() -> None:
    ids = [new_job_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(re.fullmatch(r"[0-9a-z]{13}", job_id) for job_id in ids)
    time.sleep(0.002)                 # a later millisecond: the time prefix alone must order it
    assert new_job_id()[:9] > ids[0][:9]


def test_job_ids_that_could_not_name_a_slurm_job_are_refused() -> None:
    assert slurm_job_name("01jd5x7k2m9qr") == "hpcr-01jd5x7k2m9qr"
    for bad in ("", "A", "x y", "-x", "x" * 64, "a/b"):
        with pytest.raises(ValueError):
            slurm_job_name(bad)


def test_every_state_knows_whether_it_is_terminal() -> None:
    terminal = {s for s in JobState if s.is_terminal}
    assert terminal == {JobState.denied, JobState.succeeded, JobState.failed, JobState.cancelled,
                        JobState.timed_out, JobState.infra_failed, JobState.expired}
