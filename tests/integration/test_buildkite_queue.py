"""Buildkite jobs that wait in Slurm's queue, through the real agent and cluster and the agent API
emulator: the Buildkite job stays `accepted` (not started, so no step timeout runs) while its
runner job pends, starts when Slurm runs it with the pending lines as its first log, and one that
expires while it pends finishes with exit status 75 and the reason."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from functools import partial
from pathlib import Path

from conftest import RunnerSite, wait_for
from fakes.buildkite_signer import StepSigner, signed_job

from integration import test_buildkite_agent as bk_agent
from integration.test_buildkite_agent import (
    JOB_TIMEOUT_S,
    EmulatorThread,
    Serve,
    runner_job,
    stored_jobs,
    unstamped,
)
from runner.store import DB_FILENAME

# test_buildkite_agent's fixtures: the emulator on its thread, the signer, a repository, an agent.
emulator, signer, repo, serve = bk_agent.emulator, bk_agent.signer, bk_agent.repo, bk_agent.serve

HOG = {"hpc-runner#v1": {"image": "test", "resources": {"time": "2m", "cpus_per_task": 2}}}
PENDING = re.compile(rb"^hpc-runner: pending: (Resources|Priority)", re.MULTILINE)


def plugin(**resources: object) -> dict[str, object]:
    return {"hpc-runner#v1": {"image": "test", "resources": {"time": "1m", "cpus_per_task": 1, **resources}}}


def pends_with_its_reason(site: RunnerSite, bk_id: str) -> bool:
    """Whether the Buildkite job's runner job pends in Slurm and its log says why."""
    uri = f"file:{site.state_dir / DB_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute("SELECT id, state FROM jobs WHERE source = 'buildkite' AND external_id = ?",
                         (bk_id,)).fetchone()
    if row is None or row[1] != "pending":
        return False
    log = site.work_root / str(row[0]) / "output.log"
    return log.exists() and PENDING.search(log.read_bytes()) is not None


def test_a_pending_job_starts_at_buildkite_when_slurm_runs_it_or_finishes_75_when_it_expires(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve) -> None:
    site, _ = serve(workers=3)
    hog = emulator.queue(signed_job(signer, "echo hogging\nsleep 100", repo=str(repo), plugins=[HOG]))
    wait_for(lambda: b"hogging" in unstamped(emulator.log(hog)), JOB_TIMEOUT_S, interval=0.2,
             what="the hog to run")
    expires = emulator.queue(signed_job(signer, "echo must never run", repo=str(repo),
                                        plugins=[plugin(queue_time="20s")]))
    waits = emulator.queue(signed_job(signer, "echo ran after the hog", repo=str(repo), plugins=[plugin()]))
    for bk_id in (expires, waits):
        wait_for(partial(pends_with_its_reason, site, bk_id), 60, interval=0.2,
                 what="the job to pend in Slurm with its reason")
        assert emulator.state(bk_id) == "accepted"  # not started at Buildkite: no timeout runs

    body = emulator.wait_finished(expires, timeout=20 + 60)
    assert (body["exit_status"], body.get("signal_reason")) == ("75", None)
    log = unstamped(emulator.log(expires))
    assert PENDING.search(log) and re.search(
        rb"hpc-runner: expired: waited \d+s in Slurm's queue, past its queue_time of 20s", log), log
    assert [state for i, state, _ in stored_jobs(site) if i == runner_job(site, expires)] == ["expired"]
    assert emulator.state(waits) == "accepted"

    emulator.call(lambda: emulator.bk.cancel_job(hog))
    body = emulator.wait_finished(waits)
    assert body["exit_status"] == "0"
    started = emulator.call(lambda: emulator.bk.started_at(waits))
    chunks = emulator.call(lambda: emulator.bk.chunks(waits))
    assert started is not None and chunks and all(chunk.received_at >= started for chunk in chunks)
    log = unstamped(emulator.log(waits))
    found = PENDING.search(log)
    assert found and found.start() < log.index(b"ran after the hog\n"), log
