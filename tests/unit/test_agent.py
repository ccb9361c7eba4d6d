"""The agent's own rules, with a real state store and a fake executor (no sandbox, no processes).

`prepare_job` (image verification, sandbox plan) is replaced by a stand-in that only makes the
job's directory; the executor is a fake whose jobs run until the test releases them or they
are cancelled, so every state change happens exactly when the test says.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_IMAGE_NAME, image_table, policy_document, toml_table

import runner.lifecycle.driver as driver_module
from runner.agent import Agent, NotAllowed, UnknownJob
from runner.config import AgentConfig
from runner.errors import InfrastructureError, InputError
from runner.executors.local import LocalLaunch
from runner.identity import Identity
from runner.job import JobState, Outcome
from runner.job.prepared import PreparedJob
from runner.lifecycle.prepare import Site, job_dir
from runner.policy import Decision
from runner.site_policy import load_site_policy
from runner.spec import JobSpec, parse_job_mapping, parse_job_text, spec_from_json
from runner.store import JobRecord, Store
from sandbox.images import VerifiedImage
from sandbox.plan import SandboxPlan

DEADLINE_S = 5.0
SHA256 = "0" * 64

POLICY = policy_document(
    toml_table("[accounts.esm]", slurm_account="esm", partitions=["local"], max_time="1h",
               max_concurrent_jobs=3),
    toml_table("[accounts.ocean]", slurm_account="ocean", partitions=["local"], max_time="1h",
               admins=["local:user:carol", "local:group:ocean-leads", "github:team:ocean-lab/leads"]),
    image_table("/images/test.sif", SHA256),
    # Each group's members may spend its own account.
    *(toml_table("[[grants]]", name=f"{group}-members", principals=[f"local:group:{group}"], account=group,
                 images=[TEST_IMAGE_NAME]) for group in ("esm", "ocean")))

ALICE = Identity(source="local", user="alice", groups=("esm",))
BOB = Identity(source="local", user="bob", groups=("ocean",))
CAROL = Identity(source="local", user="carol")                         # admin of ocean, by name
DAVE = Identity(source="local", user="dave", groups=("ocean-leads",))  # admin of ocean, by group
OCEAN_LEAD_ON_GITHUB = Identity(source="github", repository="ocean-lab/model", actor="erin",
                                teams=("ocean-lab/leads",))


def job(name: str = "job", *, time: str = "10m") -> JobSpec:
    return parse_job_text(f'[job]\nname = "{name}"\nimage = "test"\ncommand = ["true"]\n'
                          f'[job.resources]\ntime = "{time}"\n')


# -- fakes ---------------------------------------------------------------------------------------


def fake_prepare(site: Site, *, job_id: str, spec: JobSpec, decision: Decision,
                 workspace: Path) -> PreparedJob:
    directory = job_dir(site.config, job_id)
    directory.mkdir(parents=True, exist_ok=True)
    plan = SandboxPlan(argv=("true",), env_file="", script=None, rank_wrapper=())
    return PreparedJob(job_id=job_id, spec=spec, decision=decision,
                       image=VerifiedImage("test", "/images/test.sif", SHA256, None), plan=plan,
                       argv=plan.argv, workspace=workspace, job_dir=directory,
                       log_path=directory / "output.log")


class FakeExecutor:
    """Each job runs until `release(job_id)` or its cancel event; `fail(job_id)` makes it raise."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.launches: dict[str, LocalLaunch] = {}
        self._releases: dict[str, asyncio.Event] = {}
        self._failures: dict[str, Exception] = {}

    def _release_event(self, job_id: str) -> asyncio.Event:
        return self._releases.setdefault(job_id, asyncio.Event())

    def release(self, job_id: str) -> None:
        self._release_event(job_id).set()

    def fail(self, job_id: str, error: Exception) -> None:
        self._failures[job_id] = error

    async def run(self, launch: LocalLaunch, cancel: asyncio.Event | None = None) -> Outcome:
        job_id = launch.log_path.parent.name
        if job_id in self._failures:
            raise self._failures[job_id]
        self.launches[job_id] = launch
        self.started.append(job_id)
        waits = {asyncio.ensure_future(self._release_event(job_id).wait())}
        if cancel is not None:
            waits.add(asyncio.ensure_future(cancel.wait()))
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if cancel is not None and cancel.is_set():
            return Outcome("cancelled", 143, "cancelled")
        return Outcome("succeeded", 0, "exit status 0")


class Harness:
    """An agent on a real store in tmp_path, with the fake executor; `policy.toml` is its policy."""

    def __init__(self, root: Path, *, max_jobs: int = 2) -> None:
        root.mkdir()
        self.policy_path = root / "policy.toml"
        self.policy_path.write_text(POLICY)
        self.config = AgentConfig(state_dir=root / "state", work_root=root / "work",
                                  policy=self.policy_path, executor="local", max_jobs=max_jobs)
        self.workspace = root / "workspace"
        self.workspace.mkdir()
        self.store = Store.open(self.config.state_dir)
        self.executor = FakeExecutor()
        self.agent = Agent(self.config, load_site_policy(self.config), self.store,
                           policy_loader=lambda: load_site_policy(self.config), grace_seconds=1,
                           executor=self.executor)

    async def submit(self, identity: Identity, spec: JobSpec | None = None, **kw: Any) -> JobRecord:
        kw.setdefault("submitter_uid", None)
        record, _decision = await self.agent.submit(identity, spec or job(), self.workspace, **kw)
        return record

    def state(self, job_id: str) -> JobState:
        record = self.store.get_job(job_id)
        assert record is not None
        return record.state

    async def wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def wait_state(self, job_id: str, state: JobState) -> None:
        await self.wait(lambda: self.state(job_id) == state, f"job {job_id} to be {state}")

    async def wait_started(self, job_id: str) -> None:
        await self.wait(lambda: job_id in self.executor.started and self.state(job_id) == JobState.running,
                        f"job {job_id} to start")

    def log_of(self, job_id: str) -> str:
        path = job_dir(self.config, job_id) / "output.log"
        return path.read_text() if path.exists() else ""

    async def close(self) -> None:
        self.agent.drain()
        self.agent.drain()
        await self.agent.stop_workers()
        self.store.close()


@pytest.fixture
async def harnesses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                    ) -> AsyncIterator[Callable[..., Harness]]:
    """Makes agents (started unless start=False) on the fake pipeline; closes them all afterwards."""
    monkeypatch.setattr(driver_module, "prepare_job", fake_prepare)
    made: list[Harness] = []

    def make(*, max_jobs: int = 2, start: bool = True) -> Harness:
        h = Harness(tmp_path / f"agent-{len(made)}", max_jobs=max_jobs)
        made.append(h)
        if start:
            h.agent.start()
        return h

    yield make
    for h in made:
        await h.close()


@pytest.fixture
async def harness(harnesses: Callable[..., Harness]) -> Harness:
    return harnesses()


# -- who may see and cancel a job ----------------------------------------------------------------


@pytest.fixture
async def control(harnesses: Callable[..., Harness]) -> Harness:
    """An agent that is not started: may_control only reads records."""
    return harnesses(start=False)


async def test_the_submitter_may_control_their_job_and_another_member_may_not(control: Harness) -> None:
    record = await control.submit(ALICE)
    other_esm_member = Identity(source="local", user="zoe", groups=("esm",))
    assert control.agent.may_control(ALICE, record)
    assert not control.agent.may_control(other_esm_member, record)
    assert not control.agent.may_control(BOB, record)


async def test_admins_of_the_jobs_account_may_control_it_by_user_group_or_ci_team(control: Harness) -> None:
    record = await control.submit(BOB)
    assert control.agent.may_control(CAROL, record)
    assert control.agent.may_control(DAVE, record)
    assert control.agent.may_control(OCEAN_LEAD_ON_GITHUB, record)


async def test_admins_of_another_account_may_not_control_a_job(control: Harness) -> None:
    record = await control.submit(ALICE)  # account esm, which has no admins
    for admin in (CAROL, DAVE, OCEAN_LEAD_ON_GITHUB):
        assert not control.agent.may_control(admin, record)


async def test_a_denied_job_has_no_account_so_only_its_submitter_may_control_it(control: Harness) -> None:
    record = await control.submit(BOB, job(time="2h"))  # over ocean's max_time
    assert record.state == JobState.denied
    assert control.agent.may_control(BOB, record)
    assert not control.agent.may_control(CAROL, record)


async def test_the_agents_own_user_and_root_may_control_every_job(
    control: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    nobody = pwd.getpwnam("nobody")
    record = await control.submit(ALICE)
    with monkeypatch.context() as patch:
        patch.setattr(os, "geteuid", lambda: nobody.pw_uid)
        as_nobody = Agent(control.config, control.agent.policy, control.store)
    assert as_nobody.may_control(Identity(source="local", user="nobody"), record)
    assert as_nobody.may_control(Identity(source="local", user="root"), record)
    # The same name from a CI service is not the local account.
    assert not as_nobody.may_control(Identity(source="github", repository="o/r", actor="nobody"), record)


async def test_job_for_names_the_owner_when_refusing_and_an_unknown_id(control: Harness) -> None:
    record = await control.submit(ALICE)
    with pytest.raises(NotAllowed, match=f"job {record.id} belongs to alice"):
        control.agent.job_for(BOB, record.id)
    with pytest.raises(UnknownJob, match="no job nosuchjob"):
        control.agent.job_for(ALICE, "nosuchjob")
    assert [r.id for r in control.agent.visible_jobs(BOB)] == []
    assert [r.id for r in control.agent.visible_jobs(ALICE)] == [record.id]


# -- running, cancelling, draining ------------------------------------------------------------------


async def test_a_job_runs_to_its_outcome(harness: Harness) -> None:
    record = await harness.submit(ALICE)
    await harness.wait_started(record.id)
    harness.executor.release(record.id)
    await harness.wait_state(record.id, JobState.succeeded)
    stored = harness.store.get_job(record.id)
    assert stored is not None and stored.exit_status == 0


async def test_cancelling_a_queued_job_ends_it_before_it_starts(harness: Harness) -> None:
    running = [await harness.submit(ALICE, job(f"r{i}")) for i in range(2)]  # max_jobs = 2
    for record in running:
        await harness.wait_started(record.id)
    queued = await harness.submit(ALICE)

    harness.agent.cancel(ALICE, queued.id)

    assert harness.state(queued.id) == JobState.cancelled
    assert "hpc-runner: cancelled by local:user:alice before it started" in harness.log_of(queued.id)
    harness.executor.release(running[0].id)
    await harness.wait_state(running[0].id, JobState.succeeded)
    assert queued.id not in harness.executor.started


async def test_cancelling_a_running_job_stops_it(harness: Harness) -> None:
    record = await harness.submit(BOB)
    await harness.wait_started(record.id)
    harness.agent.cancel(CAROL, record.id)
    await harness.wait_state(record.id, JobState.cancelled)


async def test_first_drain_takes_no_new_jobs_cancels_queued_ones_and_lets_running_ones_finish(
    harness: Harness,
) -> None:
    running = [await harness.submit(ALICE, job(f"r{i}")) for i in range(2)]
    for record in running:
        await harness.wait_started(record.id)
    queued = await harness.submit(BOB)

    harness.agent.drain()

    assert harness.state(queued.id) == JobState.cancelled
    with pytest.raises(NotAllowed, match="shutting down"):
        await harness.submit(ALICE)
    assert [harness.state(r.id) for r in running] == [JobState.running, JobState.running]
    harness.executor.release(running[0].id)
    await harness.wait_state(running[0].id, JobState.succeeded)
    assert not harness.agent.finished.is_set()
    harness.executor.release(running[1].id)
    await harness.wait(harness.agent.finished.is_set, "the drained agent to finish")
    assert harness.state(running[1].id) == JobState.succeeded
    assert queued.id not in harness.executor.started


async def test_second_drain_cancels_the_running_jobs(harness: Harness) -> None:
    record = await harness.submit(ALICE)
    await harness.wait_started(record.id)

    harness.agent.drain()
    assert harness.state(record.id) == JobState.running
    harness.agent.drain()

    await harness.wait(harness.agent.finished.is_set, "the agent to finish")
    assert harness.state(record.id) == JobState.cancelled


async def test_draining_an_idle_agent_finishes_at_once(harness: Harness) -> None:
    harness.agent.drain()
    assert harness.agent.finished.is_set()


async def test_a_job_whose_launch_fails_ends_infra_failed_and_the_worker_goes_on(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(max_jobs=1)  # one worker: it must survive the failure to run the next job
    doomed = await h.submit(ALICE, job("doomed"))
    h.executor.fail(doomed.id, InfrastructureError("cannot start apptainer: No such file or directory"))
    await h.wait_state(doomed.id, JobState.infra_failed)
    assert "cannot start apptainer" in h.log_of(doomed.id)

    after = await h.submit(ALICE, job("after"))
    await h.wait_started(after.id)
    h.executor.release(after.id)
    await h.wait_state(after.id, JobState.succeeded)


async def test_a_job_works_on_a_copy_of_its_workspace_and_its_results_come_back(harness: Harness) -> None:
    (harness.workspace / "input.txt").write_text("input\n")
    record = await harness.submit(ALICE)
    await harness.wait_started(record.id)

    launch = harness.executor.launches[record.id]
    copy = job_dir(harness.config, record.id) / "workspace"
    assert Path(launch.cwd) == copy
    assert (copy / "input.txt").read_text() == "input\n"
    (copy / "result.txt").write_text("result\n")  # what the job writes
    assert not (harness.workspace / "result.txt").exists()
    harness.executor.release(record.id)
    await harness.wait_state(record.id, JobState.succeeded)

    assert (harness.workspace / "result.txt").read_text() == "result\n"
    # The log is the job's own output, then what ran: nothing about the copying.
    assert harness.log_of(record.id).startswith("--- what ran\n")
    assert "hpc-runner:" not in harness.log_of(record.id)


async def test_a_jobs_end_carries_its_collected_outputs_and_those_left_out_for_its_source(
        harness: Harness) -> None:
    spec = parse_job_text('[job]\nname = "outs"\nimage = "test"\ncommand = ["true"]\n'
                          'outputs = ["results/*"]\n')
    record = await harness.submit(ALICE, spec)
    await harness.wait_started(record.id)
    copy = job_dir(harness.config, record.id) / "workspace"
    (copy / "results").mkdir()
    (copy / "results" / "a.txt").write_text("kept\n")  # what the job writes
    (copy / "results" / "link").symlink_to(harness.policy_path)
    harness.executor.release(record.id)
    await harness.wait_state(record.id, JobState.succeeded)

    ended = harness.agent.driver.ended(record.id)
    assert [(o.path, o.size) for o in ended.outputs] == [("results/a.txt", 5)]
    assert [path for path, _why in ended.outputs_left_out] == ["results/link"]
    assert "symbolic link" in ended.outputs_left_out[0][1]


async def test_a_workspace_that_is_not_the_submitters_is_refused_and_nothing_is_recorded(
    harness: Harness,
) -> None:
    owner = harness.workspace.stat().st_uid
    with pytest.raises(InputError, match=rf"is owned by uid {owner}, not by you \(uid {owner + 1}\)"):
        await harness.submit(ALICE, submitter_uid=owner + 1)
    assert harness.store.list_jobs() == []
    assert not any(harness.config.work_root.iterdir())


async def test_a_job_queued_with_its_submitted_directory_as_workspace_is_not_started(
    harnesses: Callable[..., Harness],
) -> None:
    """Queued by an agent that bound the submitted path itself, before workspaces were copied."""
    h = harnesses(start=False)
    record = h.store.add_job(source="local", identity=ALICE.to_json(), spec=job().to_json())
    h.store.record_decision(record.id, actor="local:user:alice", decision={
        "allowed": True, "account": "esm", "grant": "esm-members", "reasons": [],
        "workspace": str(h.workspace), "workspace_owner": h.workspace.stat().st_uid})
    h.agent.start()

    await h.wait_state(record.id, JobState.denied)
    assert record.id not in h.executor.started
    assert "submit it again" in h.log_of(record.id)


async def test_queued_jobs_count_towards_the_accounts_max_concurrent_jobs(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(max_jobs=1)  # one job runs at a time; the others of esm wait in the queue

    admitted = [await h.submit(ALICE, job(f"j{i}")) for i in range(3)]
    over, decision = await h.agent.submit(ALICE, job("over"), h.workspace, submitter_uid=None)

    assert [r.state for r in admitted] == [JobState.queued] * 3
    # Queued jobs claim their places: the fourth waits for one of them to end.
    assert (over.state, decision.allowed) == (JobState.queued, True)
    assert decision.waits == "account esm runs 3 of 3 jobs"


# -- the policy --------------------------------------------------------------------------------------


async def test_reload_keeps_the_old_policy_when_the_new_file_is_invalid(harness: Harness) -> None:
    old = harness.agent.policy
    harness.policy_path.write_text(POLICY.replace("[[grants]]", "[[grant]]", 1))

    assert harness.agent.reload_policy() is False

    assert harness.agent.policy is old
    audit = [e for e in harness.store.audit_entries() if e.action == "policy_reload"]
    assert audit[-1].detail["ok"] is False
    assert "grant" in audit[-1].detail["error"]
    record = await harness.submit(ALICE)
    assert record.state == JobState.queued


async def test_reload_takes_a_valid_new_policy(harness: Harness) -> None:
    harness.policy_path.write_text(POLICY.replace('principals = ["local:group:esm"]',
                                                  'principals = ["local:group:nobody-here"]'))

    assert harness.agent.reload_policy() is True

    assert (await harness.submit(ALICE)).state == JobState.denied


async def test_a_queued_job_is_decided_again_by_a_reloaded_policy_when_it_starts(harness: Harness) -> None:
    running = [await harness.submit(BOB, job(f"r{i}")) for i in range(2)]
    for record in running:
        await harness.wait_started(record.id)
    queued = await harness.submit(ALICE)
    harness.policy_path.write_text(POLICY.replace('principals = ["local:group:esm"]',
                                                  'principals = ["local:group:nobody-here"]'))
    assert harness.agent.reload_policy()

    harness.executor.release(running[0].id)

    await harness.wait_state(queued.id, JobState.denied)
    assert "denied by the reloaded policy" in harness.log_of(queued.id)


def test_a_policy_missing_required_fields_is_not_taken_on_reload(control: Harness) -> None:
    control.policy_path.write_text("version = 1\n[accounts.x]\n")
    assert control.agent.reload_policy() is False
    assert set(control.agent.policy.accounts) == {"esm", "ocean"}


# -- the stored spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '[job]\nname = "minimal"\nimage = "test"\ncommand = ["true"]\n',
    '[job]\nname = "script"\nimage = "test"\nscript = """\necho "$HOME"\nexit 3\n"""\n'
    'env = { A = "1", B = "$(not run) \'q\' \\"dq\\"" }\n'
    'binds = ["/data:/data:ro", "/scratch/x:/scratch", "/opt/tools"]\nnetwork = true\n',
    '[job]\nname = "resources"\nimage = "test"\ncommand = ["a b", "ü", ""]\n'
    '[job.resources]\naccount = "esm"\npartition = "gpu"\nnodes = 2\ntasks = 4\ntasks_per_node = 2\n'
    'cpus_per_task = 3\ngpus = 1\nmemory = "16G"\ntime = "1h30m"\n',
    '[job]\nname = "odd-sizes"\nimage = "test"\ncommand = ["x"]\n'
    '[job.resources]\nmemory = "1536M"\ntime = "01:02:03"\ntasks = 3\n',
    '[job]\nname = "mpi"\nimage = "test"\ncommand = ["/usr/local/bin/mpi-hello"]\n'
    '[job.resources]\ntasks = 4\n[job.mpi]\nenabled = true\n',
    '[job]\nname = "mpi-off"\nimage = "test"\ncommand = ["x"]\n[job.mpi]\nenabled = false\n',
], ids=["minimal", "script-env-binds-network", "every-resource", "odd-sizes", "mpi", "mpi-off"])
def test_the_stored_spec_round_trips_into_the_same_job_spec(tmp_path: Path, text: str) -> None:
    spec = parse_job_text(text)
    with Store.open(tmp_path / "state") as store:
        stored = store.add_job(source="local", identity=ALICE.to_json(), spec=spec.to_json())
        record = store.get_job(stored.id)
    assert record is not None
    assert spec_from_json(record.spec, "stored") == spec
    assert parse_job_mapping(spec.to_table(), "table") == spec


# -- recovery after a restart ------------------------------------------------------------------------


async def test_recover_fails_local_jobs_that_were_running_and_runs_queued_ones(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(start=False)  # a store as a stopped agent left it
    spec = job().to_json()
    allowed = {"allowed": True, "account": "esm", "grant": "esm-members", "reasons": [],
               "workspace": str(h.workspace)}

    def left_behind(state: JobState, *, executor: str | None = None) -> str:
        record = h.store.add_job(source="local", identity=ALICE.to_json(), spec=spec)
        h.store.record_decision(record.id, actor="local:user:alice", decision=allowed)
        if executor is not None:
            h.store.set_slurm_id(record.id, "4242", executor)
        if state != JobState.queued:
            h.store.set_state(record.id, state)
        return record.id

    was_running = left_behind(JobState.running)
    was_pending = left_behind(JobState.pending)
    on_slurm = left_behind(JobState.running, executor="slurm")
    was_queued = left_behind(JobState.queued)

    h.agent.start()

    for job_id in (was_running, was_pending):
        record = h.store.get_job(job_id)
        assert record is not None
        assert (record.state, record.outcome_detail) == (
            JobState.infra_failed, "the agent stopped while the job ran locally")
    assert h.state(on_slurm) == JobState.running  # Slurm still runs it: left for reattaching
    await h.wait_started(was_queued)
    h.executor.release(was_queued)
    await h.wait_state(was_queued, JobState.succeeded)
