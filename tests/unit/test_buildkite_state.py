"""The Buildkite source's own state file: what a restarted agent carries on from, and the rows an
earlier version left in the agent's store, taken over once."""

from __future__ import annotations

import json
import sqlite3
import stat
import time
from pathlib import Path

from runner.sources.buildkite.chunks import Chunk
from runner.sources.buildkite.report import StreamCheckpoint
from runner.sources.buildkite.state import FILENAME, AcceptedJob, BuildkiteState, JobMemory
from runner.store import Store


def accepted(bk_id: str) -> AcceptedJob:
    return AcceptedJob(bk_id=bk_id, job={"id": bk_id, "env": {}}, token=f"token-{bk_id}", request_headers={},
                       job_status_interval=5)


def test_a_job_its_staged_chunks_and_checkpoint_survive_a_restart_and_closing_forgets_them(
        tmp_path: Path) -> None:
    with BuildkiteState.open(tmp_path) as state:
        memory = JobMemory(state)
        job = accepted("bk-1")
        job.phase = "admitted"
        job.runner_id = "job-1"
        memory.save(job)
        outbox = memory.outbox(job)
        outbox.stage([Chunk(1, 0, 5, b"gz-1"), Chunk(2, 5, 7, b"gz-2")], StreamCheckpoint(file_offset=12,
                                                                                          sequence=2))
        outbox.delivered(Chunk(1, 0, 5, b"gz-1"), failed=False)
        outbox.delivered(Chunk(2, 5, 7, b"gz-2"), failed=True)  # given up on: counted at once
    assert stat.S_IMODE((tmp_path / FILENAME).stat().st_mode) == 0o600

    with BuildkiteState.open(tmp_path) as state:
        [again] = state.open_jobs()
        assert (again.bk_id, again.phase, again.runner_id, again.token) == ("bk-1", "admitted", "job-1",
                                                                              "token-bk-1")
        assert (again.checkpoint.file_offset, again.checkpoint.sequence) == (12, 2)
        assert again.checkpoint.chunks_failed == 1
        assert state.staged("bk-1") == []
        state.stage_log("bk-1", [Chunk(3, 12, 4, b"gz-3")], StreamCheckpoint(file_offset=16).to_json())
        assert state.staged("bk-1") == [Chunk(3, 12, 4, b"gz-3")]
        state.close_job("bk-1")
        assert state.open_jobs() == [] and state.staged("bk-1") == []


def test_open_jobs_an_earlier_version_kept_in_the_agents_store_are_taken_over_once(tmp_path: Path) -> None:
    Store.open(tmp_path).close()  # the agent's store, with the tables earlier versions wrote
    now = time.time()
    with sqlite3.connect(tmp_path / "state.sqlite3") as legacy:
        for bk_id, done in (("bk-open", 0), ("bk-done", 1)):
            legacy.execute("INSERT INTO source_jobs (source, external_id, data, checkpoint, chunks_failed,"
                           " done, created_at, updated_at) VALUES ('buildkite', ?, ?, ?, 2, ?, ?, ?)",
                           (bk_id, json.dumps(accepted(bk_id).to_json()),
                            json.dumps(StreamCheckpoint(file_offset=40).to_json()), done, now, now))
            legacy.execute("INSERT INTO log_outbox (source, external_id, sequence, \"offset\", size, data)"
                           " VALUES ('buildkite', ?, 7, 30, 10, ?)", (bk_id, b"gz-7"))

    with BuildkiteState.open(tmp_path) as state:
        [job] = state.open_jobs()
        assert (job.bk_id, job.token, job.checkpoint.file_offset, job.checkpoint.chunks_failed) == \
            ("bk-open", "token-bk-open", 40, 2)
        assert state.staged("bk-open") == [Chunk(7, 30, 10, b"gz-7")]
        assert state.staged("bk-done") == []
        state.close_job("bk-open")
    with BuildkiteState.open(tmp_path) as state:  # not taken over a second time
        assert state.open_jobs() == []
