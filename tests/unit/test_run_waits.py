"""`hpc-runner run` over its account's max_concurrent_jobs waits, as a job in the agent's queue
does, until one of the account's jobs ends, saying why on stderr; Ctrl-C meanwhile cancels it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import wait_until

import runner.commands.run as run_module
from runner.config import AgentConfig
from runner.job import JobState
from runner.lifecycle.admission import Admission, Admissions
from runner.lifecycle.driver import JobDriver
from runner.lifecycle.notes import to_stderr
from runner.lifecycle.prepare import Site
from runner.site_policy import load_site_policy
from runner.store import Store
from unit.test_agent import ALICE, POLICY, job

WAITS = ("hpc-runner: waiting: account esm runs 3 of 3 jobs (max_concurrent_jobs); it starts when one of "
         "them ends\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Site, Store]:
    monkeypatch.setattr(run_module, "PLACE_LOOK_S", 0.02)
    (tmp_path / "policy.toml").write_text(POLICY)
    config = AgentConfig(state_dir=tmp_path / "state", work_root=tmp_path / "work",
                         policy=tmp_path / "policy.toml", executor="local", max_jobs=2)
    return Site(config, load_site_policy(config)), Store.open(config.state_dir)


def _running_in_slurm(store: Store, workspace: Path) -> list[str]:
    """Three jobs of esm (its max_concurrent_jobs) that an agent runs in Slurm."""
    allowed = {"allowed": True, "account": "esm", "grant": "esm-members", "reasons": [],
               "workspace": str(workspace)}
    ids = []
    for _ in range(3):
        record = store.add_job(source="local", identity=ALICE.to_json(), spec=job().to_json())
        store.record_decision(record.id, actor="local:user:alice", decision=allowed)
        store.set_state(record.id, JobState.running)
        ids.append(record.id)
    return ids


async def test_run_over_the_cap_waits_saying_why_and_goes_on_when_a_job_of_the_account_ends(
        site: tuple[Site, Store], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    runner_site, store = site
    running = _running_in_slurm(store, tmp_path)
    admitted = await Admissions(runner_site, store, to_stderr).admit(
        Admission("local", None, ALICE, job(), workspace=tmp_path))
    assert admitted.decision.allowed and admitted.decision.waits == "account esm runs 3 of 3 jobs"
    driver = JobDriver(runner_site, store, grace_seconds=1, notes=to_stderr)
    looks: list[str | None] = []
    look = run_module._why_wait
    monkeypatch.setattr(run_module, "_why_wait", lambda *args: looks.append(look(*args)) or looks[-1])
    waiting = asyncio.ensure_future(run_module._wait_for_a_place(
        runner_site, store, driver, admitted.job_id, asyncio.Event(), actor="local:user:alice"))

    await wait_until(lambda: len(looks) >= 20, "twenty looks at the store")
    assert not waiting.done() and set(looks) == {"account esm runs 3 of 3 jobs"}
    assert capsys.readouterr().err == WAITS  # said once, not at every look
    store.set_state(running[0], JobState.succeeded)

    assert await asyncio.wait_for(waiting, 5) is True
    assert store.get_job(admitted.job_id).state == JobState.queued  # type: ignore[union-attr]


async def test_ctrl_c_while_run_waits_for_a_place_cancels_the_job(
        site: tuple[Site, Store], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner_site, store = site
    _running_in_slurm(store, tmp_path)
    admitted = await Admissions(runner_site, store, to_stderr).admit(
        Admission("local", None, ALICE, job(), workspace=tmp_path))
    driver = JobDriver(runner_site, store, grace_seconds=1, notes=to_stderr)
    cancel = asyncio.Event()
    waiting = asyncio.ensure_future(run_module._wait_for_a_place(
        runner_site, store, driver, admitted.job_id, cancel, actor="local:user:alice"))

    cancel.set()

    assert await asyncio.wait_for(waiting, 5) is False
    record = store.get_job(admitted.job_id)
    assert record is not None and record.state == JobState.cancelled
    assert capsys.readouterr().err.endswith("hpc-runner: cancelled before it started\n")
