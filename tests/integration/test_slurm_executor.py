"""The Slurm executor against the real slurmctld and slurmd, Apptainer and the host Open MPI.

Jobs are prepared by the product's pipeline (as root, then handed to the service account, as
the agent's own files would be) and submitted as the service account: every Slurm command runs
through `runuser -u hpcrunner --`, injected into the executor's command runner. The tracker polls
every POLL seconds here (5 s in production).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    Cluster,
    give_tree_to_service_user,
    job_toml,
    policy_toml,
    service_env,
    slurm_job_fields,
    toml_string,
    wait_for,
    wait_for_slurm_job,
)

from runner.config import parse_config_text
from runner.executors.slurm import (
    SlurmCli,
    SlurmExecutor,
    SlurmJob,
    SubmissionFailed,
    SubmitOptions,
    SubprocessRunner,
)
from runner.executors.slurm.tracker import Finished, QueryFailed, StateChanged, TrackerEvent
from runner.identity import identity_from_json
from runner.job import Outcome, new_job_id
from runner.job.prepared import PreparedJob
from runner.lifecycle.prepare import Site, prepare_job
from runner.logs.tail import LineAssembler, follow
from runner.policy import decide, parse_policy_text
from runner.spec import parse_job_text

pytestmark = pytest.mark.cluster

POLL = 0.5
RUNUSER = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/usr/sbin/runuser"
SLURMCTLD = "/usr/sbin/slurmctld"  # started exactly as deploy/dev/setup.sh starts it (lib.sh)
SLURMCTLD_PIDFILE = Path("/run/slurm/slurmctld.pid")
# A real test account of the dev cluster's accounting, which the service account may charge.
SLURM_ACCOUNT = "hpcr-test"


def policy_text(cluster: Cluster, *, slurm_account: str = SLURM_ACCOUNT) -> str:
    # "nope" is granted but does not exist in Slurm: sbatch must refuse it.
    return policy_toml(cluster.image_sha256, image_path=cluster.image, slurm_account=slurm_account,
                       partitions=("debug", "batch", "nope"))


def job_text(script: str | None = None, *, command: list[str] | None = None, time: str = "5m",
             tasks: int = 1, partition: str | None = None, mpi: bool = False) -> str:
    return job_toml("slurm-test", script=script, command=command, time=time, tasks=tasks,
                    partition=partition, mpi=mpi)


def service_cli(path_prefix: Path | None = None) -> SlurmCli:
    """Slurm's commands as the service account, with its clean environment."""
    env = service_env()
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return SlurmCli(SubprocessRunner(prefix=[RUNUSER, "-u", SERVICE_USER, "--"], env=env), timeout=20)


@dataclass
class SlurmSite:
    root: Path
    cluster: Cluster
    site: Site
    workspace: Path
    executor: SlurmExecutor
    submitted: list[str] = field(default_factory=list)

    def prepare(self, text: str, *, slurm_account: str | None = None) -> PreparedJob:
        """Decide and prepare a job as the pipeline does; its files then belong to the service account."""
        policy = self.site.policy
        if slurm_account is not None:
            policy = parse_policy_text(policy_text(self.cluster, slurm_account=slurm_account), "policy")
        spec = parse_job_text(text, "job.toml")
        decision = decide(policy, identity_from_json({"source": "local", "user": SERVICE_USER}), spec)
        assert decision.allowed, decision.reasons
        site = self.site
        if slurm_account is not None:
            site = Site(self.site.config, policy)
            site.sandbox = self.site.sandbox
        prepared = prepare_job(site, job_id=new_job_id(), spec=spec, decision=decision,
                               workspace=self.workspace)
        # Slurm writes the log as the service account; root's notes then append to its file.
        prepared.log_path.touch()
        give_tree_to_service_user(site.config.work_root)
        return prepared

    async def submit(self, prepared: PreparedJob, options: SubmitOptions | None = None,
                     executor: SlurmExecutor | None = None) -> SlurmJob:
        job = await (executor or self.executor).submit(prepared, comment=f"test {prepared.job_id}",
                                                       options=options)
        assert job.slurm_id is not None
        self.submitted.append(job.slurm_id)
        return job


@pytest.fixture
async def slurm(cluster: Cluster, service_tmp: Path) -> AsyncIterator[SlurmSite]:
    policy = parse_policy_text(policy_text(cluster), "policy")
    config = parse_config_text(f"""state_dir = {toml_string(service_tmp / "state")}
work_root = {toml_string(service_tmp / "work")}
executor = "slurm"
max_jobs = 10
""")
    site = Site(config, policy)
    # This test runs as root, its jobs as the service account: no root-only Apptainer flags.
    site.sandbox = replace(site.sandbox, userns=False)
    workspace = service_tmp / "workspace"
    workspace.mkdir()
    give_tree_to_service_user(workspace)
    executor = SlurmExecutor(service_cli(), user=SERVICE_USER, poll_interval=POLL)
    env = SlurmSite(service_tmp, cluster, site, workspace, executor)
    try:
        yield env
    finally:
        await executor.close()
        for slurm_id in env.submitted:
            subprocess.run([RUNUSER, "-u", SERVICE_USER, "--", "scancel", slurm_id], capture_output=True,
                           timeout=30, check=False)


def active_in_squeue(slurm_id: str) -> bool:
    """Whether squeue lists the job among pending, running and completing ones (its default)."""
    result = subprocess.run(["squeue", "--noheader", f"--jobs={slurm_id}", "--format=%i"],
                            capture_output=True, text=True, timeout=30, check=False)
    return slurm_id in result.stdout.split()


async def wait_async(predicate: Callable[[], object], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


# -- outcomes ------------------------------------------------------------------------------------

async def test_exit_status_3_propagates_exactly(slurm: SlurmSite) -> None:
    prepared = slurm.prepare(job_text("echo about to fail\nexit 3\n"))
    job = await slurm.submit(prepared)
    outcome = await asyncio.wait_for(slurm.executor.watch(job), 60)
    assert outcome == Outcome("failed", 3, "exit status 3")
    assert job.status_path.read_text() == "3\n"
    log = prepared.log_path.read_text()
    assert log.startswith(f"hpc-runner: submitted to Slurm as job {job.slurm_id} (hpcr-{prepared.job_id})\n")
    assert "about to fail\n" in log
    fields = slurm_job_fields(job.slurm_id or "")
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "3:0")
    assert fields["JobName"] == f"hpcr-{prepared.job_id}"


async def test_an_mpi_job_of_two_ranks_forms_one_world_through_srun_and_pmix(slurm: SlurmSite) -> None:
    prepared = slurm.prepare(job_text(command=["/usr/local/bin/mpi-hello"], tasks=2, mpi=True))
    job = await slurm.submit(prepared)
    outcome = await asyncio.wait_for(slurm.executor.watch(job), 120)
    log = prepared.log_path.read_text()
    assert outcome == Outcome("succeeded", 0, "exit status 0"), log
    assert "world size 2\n" in log and "rank 0 of 2\n" in log and "rank 1 of 2\n" in log, log
    assert "of 1\n" not in log, "ranks started as singletons"
    assert "PMIX ERROR" not in log, log


async def test_a_rank_that_ends_at_once_does_not_fail_the_ranks_still_starting(slurm: SlurmSite) -> None:
    # As under mpirun (test_run.py): a later rank joins the namespaces of the first one's
    # container process, which must not have ended yet. Before the fix 7 and 10 of 10 such
    # jobs failed here ("could not open proc directory").
    jobs = 6
    script = '[ "$SLURM_PROCID" = 0 ] && exit 0\necho "rank $SLURM_PROCID ran on"\n'
    failures = []
    for attempt in range(jobs):
        prepared = slurm.prepare(job_text(command=["/bin/sh", "-c", script], tasks=2, mpi=True))
        outcome = await asyncio.wait_for(slurm.executor.watch(await slurm.submit(prepared)), 120)
        log = prepared.log_path.read_text()
        if outcome.state != "succeeded" or "rank 1 ran on\n" not in log:
            failures.append(f"job {attempt}: {outcome}\n{log}")
    assert not failures, f"{len(failures)} of {jobs} jobs failed:\n" + "\n".join(failures)


async def test_a_walltime_overrun_ends_timed_out(slurm: SlurmSite) -> None:
    # One minute is Slurm's smallest time limit. slurmctld checks limits every 30 s
    # (OverTimeLimit is 0 here) and the job ends on the first SIGTERM, so KillWait adds nothing.
    prepared = slurm.prepare(job_text("echo started\nsleep 600\necho still running\n", time="1m"))
    job = await slurm.submit(prepared)
    started = time.monotonic()
    outcome = await asyncio.wait_for(slurm.executor.watch(job), 150)
    elapsed = time.monotonic() - started
    assert outcome.state == "timed_out" and outcome.detail == "walltime of 1:00 exceeded (TIMEOUT)", outcome
    assert 60 <= elapsed <= 60 + 30 + 15, elapsed
    log = prepared.log_path.read_text()
    assert "started\n" in log and "still running" not in log and "DUE TO TIME LIMIT" in log, log


# -- cancellation --------------------------------------------------------------------------------

async def test_cancelling_a_pending_job_removes_it_at_once(slurm: SlurmSite) -> None:
    prepared = slurm.prepare(job_text("echo must never run\n"))
    job = await slurm.submit(prepared, SubmitOptions(begin="now+1hour"))
    events: list[TrackerEvent] = []
    watching = asyncio.create_task(slurm.executor.watch(job, on_event=events.append))
    pending = "hpc-runner: pending: BeginTime; estimated start "
    await wait_async(lambda: pending in prepared.log_path.read_text(), 20, "the pending line")
    await slurm.executor.cancel(job.slurm_id or "", grace_seconds=30)
    cancelled = time.monotonic()
    outcome = await asyncio.wait_for(watching, 2 * POLL + 5)
    assert outcome.state == "cancelled"
    await wait_async(lambda: not active_in_squeue(job.slurm_id or ""), 2 * POLL, "squeue to drop the job")
    assert time.monotonic() - cancelled <= 2 * POLL + 1
    assert not any(isinstance(e, StateChanged) and e.state == "RUNNING" for e in events)
    log = prepared.log_path.read_text()
    assert "hpc-runner: job cancelled before it started\n" in log and "must never run" not in log


async def test_cancelling_a_running_job_gives_it_the_grace_period_for_sigterm(slurm: SlurmSite) -> None:
    script = ("trap 'echo cleaning up after SIGTERM; exit 143' TERM\n"
              "echo started\nsleep 600 &\nwait\necho not reached\n")
    prepared = slurm.prepare(job_text(script))
    job = await slurm.submit(prepared)
    watching = asyncio.create_task(slurm.executor.watch(job))
    await wait_async(lambda: "started\n" in prepared.log_path.read_text(), 30, "the job to start")
    began = time.monotonic()
    await slurm.executor.cancel(job.slurm_id or "", grace_seconds=20)
    # The job ended on SIGTERM within its grace period: no SIGKILL was needed.
    assert time.monotonic() - began < 10
    await wait_async(lambda: not active_in_squeue(job.slurm_id or ""), 2 * POLL, "squeue to drop the job")
    outcome = await asyncio.wait_for(watching, 10)
    assert outcome.state == "cancelled" and outcome.exit_status == 143, outcome
    log = prepared.log_path.read_text()
    assert "hpc-runner: job cancelled; sent SIGTERM\n" in log and "cleaning up after SIGTERM\n" in log, log
    assert "not reached" not in log and "still running after" not in log


async def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(slurm: SlurmSite) -> None:
    prepared = slurm.prepare(job_text("trap '' TERM\necho started\nsleep 600\n"))
    job = await slurm.submit(prepared)
    watching = asyncio.create_task(slurm.executor.watch(job))
    await wait_async(lambda: "started\n" in prepared.log_path.read_text(), 30, "the job to start")
    began = time.monotonic()
    await slurm.executor.cancel(job.slurm_id or "", grace_seconds=2)
    assert 2 <= time.monotonic() - began < 2 + 2 * POLL + 5
    kill_wait = 10  # slurm.conf of deploy/dev
    outcome = await asyncio.wait_for(watching, kill_wait + 2 * POLL + 10)
    assert outcome.state == "cancelled", outcome
    assert slurm_job_fields(job.slurm_id or "")["JobState"] == "CANCELLED"
    assert not active_in_squeue(job.slurm_id or "")
    assert "still running after 2 s, cancelled in Slurm" in prepared.log_path.read_text()


# -- refusals ------------------------------------------------------------------------------------

async def test_an_invalid_partition_fails_with_slurms_message(slurm: SlurmSite) -> None:
    prepared = slurm.prepare(job_text("echo never\n", partition="nope"))
    with pytest.raises(SubmissionFailed) as refused:
        await slurm.executor.submit(prepared, comment="test")
    assert "invalid partition specified: nope" in refused.value.slurm_message
    assert "Batch job submission failed: Invalid partition name specified" in refused.value.slurm_message
    expected = f"hpc-runner: sbatch refused the job: {refused.value.slurm_message}\n"
    assert prepared.log_path.read_text() == expected


async def test_an_account_the_service_account_may_not_charge_fails_with_slurms_message(
        slurm: SlurmSite) -> None:
    prepared = slurm.prepare(job_text("echo never\n"), slurm_account="no-such-account")
    with pytest.raises(SubmissionFailed) as refused:
        await slurm.executor.submit(prepared, comment="test")
    assert "Invalid account or account/partition combination specified" in refused.value.slurm_message
    assert "hpc-runner: sbatch refused the job: " in prepared.log_path.read_text()


# -- Slurm trouble -------------------------------------------------------------------------------

def slurmctld_pid() -> int | None:
    try:
        pid = int(SLURMCTLD_PIDFILE.read_text().strip())
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmctld" else None
    except (OSError, ValueError):
        return None


def slurmctld_answers() -> bool:
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30,
                          check=False).stdout.count("is UP") > 0


@pytest.fixture
def controller() -> Iterator[None]:
    """Whatever a test does to slurmctld, it runs again afterwards."""
    try:
        yield
    finally:
        if slurmctld_pid() is None:
            subprocess.run([SLURMCTLD], check=True, timeout=60)
        wait_for(slurmctld_answers, 60, what="slurmctld to answer again")


async def test_a_slurmctld_restart_mid_job_loses_nothing(slurm: SlurmSite, controller: None) -> None:
    """slurmctld stopped as deploy/dev/lib.sh stops it (SIGTERM: it saves its state) and started again.

    Not SIGKILL: slurmctld saves job state in the background, so a crash right after a submission
    forgets the job and hands its id out again, and slurmd then drains the node for a duplicate
    job id, which would break every other test on this one-node cluster.
    """
    prepared = slurm.prepare(job_text("echo started\nsleep 12\necho finished\nexit 5\n"))
    job = await slurm.submit(prepared)
    events: list[TrackerEvent] = []
    watching = asyncio.create_task(slurm.executor.watch(job, on_event=events.append))
    await wait_async(lambda: "started\n" in prepared.log_path.read_text(), 30, "the job to start")
    pid = slurmctld_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    await wait_async(lambda: not Path(f"/proc/{pid}").exists(), 30, "slurmctld to exit")
    await wait_async(lambda: any(isinstance(e, QueryFailed) for e in events), 30, "a failed query")
    assert not watching.done()
    subprocess.run([SLURMCTLD], check=True, timeout=60)
    outcome = await asyncio.wait_for(watching, 90)
    assert outcome == Outcome("failed", 5, "exit status 5"), events
    assert "finished\n" in prepared.log_path.read_text()
    failures = [e for e in events if isinstance(e, QueryFailed)]
    assert failures and all("slurm" in e.error.lower() for e in failures)


SQUEUE_WRAPPER = """#!/bin/sh
# squeue that fails while the switch file exists, as a busy or restarting controller would.
if [ -e {switch} ]; then
    echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2
    exit 1
fi
exec /usr/bin/squeue "$@"
"""


async def test_a_failing_squeue_changes_nothing_and_tracking_recovers(slurm: SlurmSite) -> None:
    wrappers = slurm.root / "wrappers"
    wrappers.mkdir()
    switch = slurm.root / "squeue-fails"
    (wrappers / "squeue").write_text(SQUEUE_WRAPPER.format(switch=switch))
    (wrappers / "squeue").chmod(0o755)
    give_tree_to_service_user(wrappers)
    switch.touch()
    executor = SlurmExecutor(service_cli(wrappers), user=SERVICE_USER, poll_interval=POLL)
    try:
        prepared = slurm.prepare(job_text("echo done\nexit 4\n"))
        job = await slurm.submit(prepared, executor=executor)
        events: list[TrackerEvent] = []
        watching = asyncio.create_task(executor.watch(job, on_event=events.append))
        # The job ends in Slurm while every query of the tracker fails.
        await asyncio.to_thread(wait_for_slurm_job, job.slurm_id or "", 60)
        await wait_async(lambda: sum(isinstance(e, QueryFailed) for e in events) >= 3, 30,
                         "three failed queries")
        assert all(isinstance(e, QueryFailed) for e in events), events
        assert not watching.done() and executor.tracker.tracked == [job.slurm_id]
        delays = [e.retry_in for e in events if isinstance(e, QueryFailed)]
        assert delays[0] < delays[2] <= executor.tracker.max_delay, delays
        switch.unlink()
        outcome = await asyncio.wait_for(watching, delays[-1] * 2 + 10)
        assert outcome == Outcome("failed", 4, "exit status 4")
        assert isinstance(events[-1], Finished)
    finally:
        await executor.close()


# -- logs ----------------------------------------------------------------------------------------

async def test_the_log_can_be_tailed_while_the_job_writes_it(slurm: SlurmSite) -> None:
    script = 'for i in $(seq 1 15); do echo "line $i $(date +%s.%N)"; sleep 0.2; done\n'
    prepared = slurm.prepare(job_text(script))
    job = await slurm.submit(prepared)
    watching = asyncio.create_task(slurm.executor.watch(job))
    seen: list[tuple[float, bytes]] = []
    lines = LineAssembler()
    async for _, chunk in follow(prepared.log_path, done=watching.done, poll_interval=0.05):
        now = time.time()
        seen += [(now, line) for line in lines.feed(chunk)]
    assert (await watching).state == "succeeded"
    stamped = [(at, line.split()) for at, line in seen if line.startswith(b"line ")]
    assert [int(words[1]) for _, words in stamped] == list(range(1, 16))
    lags = [at - float(words[2]) for at, words in stamped]
    assert max(lags) < 1.0, lags
    # Seen while being written, not all at the end.
    assert stamped[-1][0] - stamped[0][0] > 2.0


# -- restart -------------------------------------------------------------------------------------

async def test_a_restarted_agent_reconciles_its_jobs_with_slurm(slurm: SlurmSite) -> None:
    quick = slurm.prepare(job_text("exit 6\n"))
    waiting = slurm.prepare(job_text("echo never\n"))
    lost_id = slurm.prepare(job_text("echo never\n"))
    stranger = slurm.prepare(job_text("echo never\n"))
    later = SubmitOptions(begin="now+1hour")
    quick_job = await slurm.submit(quick)
    waiting_job = await slurm.submit(waiting, later)
    lost_job = await slurm.submit(lost_id, later)
    stranger_job = await slurm.submit(stranger, later)
    await asyncio.to_thread(wait_for_slurm_job, quick_job.slurm_id or "", 60)
    gone = SlurmJob(new_job_id(), slurm.root / "work" / "gone", slurm.root / "work" / "gone" / "output.log")

    # A new executor, as after a restart; the store lost the Slurm id of one job.
    restarted = SlurmExecutor(service_cli(), user=SERVICE_USER, poll_interval=POLL)
    known = [quick_job, waiting_job, replace(lost_job, slurm_id=None), gone]
    result = await restarted.reconcile(known)

    assert result.finished[quick.job_id] == Outcome("failed", 6, "exit status 6")
    assert result.finished[gone.job_id].state == "infra_failed"
    assert set(result.running) == {waiting.job_id, lost_id.job_id}
    assert result.running[lost_id.job_id].slurm_id == lost_job.slurm_id
    assert [row.slurm_id for row in result.unknown_hpcr if row.name.startswith("hpcr-")
            and row.slurm_id in slurm.submitted] == [stranger_job.slurm_id]
    # The estimate squeue shows for a pending job is the one `squeue --start` gives.
    rows = await restarted.cli.squeue([waiting_job.slurm_id or ""])
    starts = await restarted.cli.squeue_start([waiting_job.slurm_id or ""])
    assert rows[waiting_job.slurm_id or ""].start == starts[waiting_job.slurm_id or ""] is not None
    await restarted.close()


async def test_squeue_and_scontrol_answer_for_unknown_ids(slurm: SlurmSite) -> None:
    cli = slurm.executor.cli
    assert await cli.squeue(["999999"]) == {}
    assert await cli.squeue(["999998", "999999"]) == {}
    assert await cli.show_job("999999") is None
    assert await cli.scancel("999999") is False
