"""What the API source remembers of its jobs: in its own private file, across a reopen."""

from __future__ import annotations

import stat
from pathlib import Path

from runner.sources.api.state import FILENAME, ApiJob, ApiState


def test_a_job_is_remembered_with_its_phase_and_log_offset_until_closed(tmp_path: Path) -> None:
    job = ApiJob(hub_id="job1", job={"name": "unit", "image": "test"},
                 identity={"source": "idp", "user": "a"}, issuer="site-idp", repository=None, commit=None)
    with ApiState.open(tmp_path / "state") as state:
        state.save(job)
        job.phase, job.job_id = "admitted", "local1"
        state.save(job)
        state.keep_offset("job1", 1234)
    assert stat.S_IMODE((tmp_path / "state" / FILENAME).stat().st_mode) == 0o600
    with ApiState.open(tmp_path / "state") as state:
        [again] = state.open_jobs()
        assert (again.phase, again.job_id, again.log_offset) == ("admitted", "local1", 1234)
        assert again.job == job.job
        assert not state.done("job1")
        state.close_job("job1")
        assert state.open_jobs() == [] and state.done("job1")
        assert state.job("job1") is not None and state.job("nope") is None
