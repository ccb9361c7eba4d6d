"""The agent and `hpc-runner run` with the Slurm executor, on the real slurmctld and slurmd.

`run --executor slurm` and the agent (`executor = "slurm"`) run as the service account; a
local user submits to the agent through its shared socket. Slurm's accounting is enforced:
jobs are charged to `esm`, an account both may use, in the partition `debug`. The node (two
CPUs) may be shared with other test runs, so waits for a job to start are generous, while the
bounds that the product promises (how fast a cancelled job leaves Slurm) are exact.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pwd
import re
import signal
import socket
import sqlite3
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    OutputReader,
    RunnerSite,
    image_table,
    job_toml,
    make_runner_site,
    policy_document,
    slurm_job_fields,
    spawn_as_user,
    toml_table,
    wait_for,
    write_public_file,
    write_service_secret,
)

from integration.test_local_queue import QueueUser
from runner import exitcodes
from runner.config import load_config
from runner.executors.slurm.tracker import DEFAULT_INTERVAL_SECONDS
from runner.localqueue.peercred import peer_uid_gid
from runner.localqueue.protocol import encode
from runner.logs.tail import follow
from runner.store import DB_FILENAME

ALICE = "hpcr-alice"
# A Slurm account that exists in the dev cluster's accounting and that the service account may charge.
SLURM_ACCOUNT = "esm"
# How long a job may take to start and end: the node's two CPUs may be busy with other test runs.
JOB_TIMEOUT_S = 150.0
# The line the Slurm executor writes into a job's log once sbatch has accepted the job.
SUBMITTED = re.compile(rb"hpc-runner: submitted to Slurm as job ([0-9]+) \(hpcr-([0-9a-z]+)\)\n")

# 40 numbered lines, one every 0.1 s, each padded to 8 KB; line 7 holds a byte that is not UTF-8
# and line 40 has no newline. Before line 21 the job waits (within its walltime) until the test
# creates /work/go.
NUMBERED_SCRIPT = textwrap.dedent("""\
    pad=$(printf '%08000d' 0)
    i=1
    while [ "$i" -le 40 ]; do
        if [ "$i" -eq 21 ]; then
            while [ ! -e /work/go ]; do sleep 0.1; done
        fi
        if [ "$i" -eq 7 ]; then
            printf 'line %d \\377 is not UTF-8 %s\\n' "$i" "$pad"
        elif [ "$i" -eq 40 ]; then
            printf 'line %d has no newline' "$i"
        else
            printf 'line %d %s\\n' "$i" "$pad"
        fi
        i=$((i + 1))
        sleep 0.1
    done
    """)
# The agent is killed once it has stored an offset past the first chunk its log follower reads:
# a restarted agent that read the log from 0 again would then try to move the stored offset
# backwards, which the store refuses, so reading twice cannot go unnoticed.
FOLLOW_CHUNK_BYTES: int = inspect.signature(follow).parameters["chunk_size"].default


def numbered_output() -> bytes:
    """Exactly what NUMBERED_SCRIPT writes."""
    pad = b"0" * 8000
    lines = []
    for i in range(1, 41):
        if i == 7:
            lines.append(b"line 7 \xff is not UTF-8 " + pad + b"\n")
        elif i == 40:
            lines.append(b"line 40 has no newline")
        else:
            lines.append(f"line {i} ".encode() + pad + b"\n")
    return b"".join(lines)


# Runs until it is cancelled (or reaches its walltime).
LONG_SCRIPT = "echo started\nsleep 110\necho not cancelled\n"
NEVER_RUNS = "echo must never run\n"


# -- sites, jobs and Slurm ---------------------------------------------------------------------


def slurm_policy(cluster: Cluster, *, slurm_account: str = SLURM_ACCOUNT,
                 retry_node_failures: bool = False) -> str:
    """One account in the partition `debug`, for alice's group and for the service account.

    `max_memory` keeps each job's memory request small: the node's default per CPU is half its
    memory, which would let a single one-CPU job block every job that asks for two CPUs.
    """
    return policy_document(
        toml_table("[accounts.esm]", slurm_account=slurm_account, partitions=["debug"], max_time="2m",
                   max_memory="1G", retry_node_failures=retry_node_failures),
        image_table(cluster.image, cluster.image_sha256),
        toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm"], account="esm",
                   images=[TEST_IMAGE_NAME]),
        toml_table("[[grants]]", name="service", principals=[f"local:user:{SERVICE_USER}"], account="esm",
                   images=[TEST_IMAGE_NAME], mpi=True))


def slurm_job_toml(name: str, script: str, *, time: str, cpus_per_task: int = 1) -> str:
    text = job_toml(name, script=script, time=time)
    assert text.endswith(f'[job.resources]\ntime = "{time}"\n'), text
    return text + f"cpus_per_task = {cpus_per_task}\n"


@pytest.fixture
def slurm_site(cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str]
               ) -> RunnerSite:
    """An agent config with executor = "slurm" whose socket every local user may reach."""
    service_tmp.chmod(0o755)  # the users' workspaces live in it
    site = make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=4,
                            executor="slurm")
    site.write_policy(slurm_policy(cluster))
    # The bounds below count polling cycles of the tracker's default interval.
    assert load_config(site.config).slurm.poll_interval == DEFAULT_INTERVAL_SECONDS
    return site


@pytest.fixture
def alice(slurm_site: RunnerSite) -> QueueUser:
    return QueueUser(ALICE, slurm_site)


@pytest.fixture
def slurm_jobs() -> Iterator[list[str]]:
    """Ids of the hpc-runner jobs a test submits; whatever of them Slurm still runs afterwards is
    cancelled, so that no test leaves the node busy for the next."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        subprocess.run(["scancel", f"--name=hpcr-{job_id}", f"--user={SERVICE_USER}"], capture_output=True,
                       timeout=30, check=False)


def submit(user: QueueUser, jobs: list[str], text: str) -> str:
    job_id = user.submit(text)
    jobs.append(job_id)
    return job_id


def squeue_lists(job_id: str) -> bool:
    """Whether `squeue -h -n hpcr-<id>` (pending, running and completing jobs) lists the job."""
    result = subprocess.run(["squeue", "-h", "-n", f"hpcr-{job_id}", "-o", "%i %T"], capture_output=True,
                            text=True, timeout=30, check=True)
    return bool(result.stdout.strip())


def wait_until_gone_from_squeue(job_id: str, timeout: float) -> None:
    wait_for(lambda: not squeue_lists(job_id), timeout, interval=0.2,
             what=f"squeue -n hpcr-{job_id} to be empty")


def kill_wait_seconds() -> float:
    """Slurm's KillWait: how long slurmd waits between SIGTERM and SIGKILL of a cancelled job."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30,
                            check=True).stdout
    match = re.search(r"^KillWait\s*=\s*([0-9]+) sec", config, re.MULTILINE)
    assert match, "scontrol show config prints no KillWait"
    return float(match.group(1))


def log_path(site: RunnerSite, job_id: str) -> Path:
    return site.work_root / job_id / "output.log"


def read_log(site: RunnerSite, job_id: str) -> bytes:
    path = log_path(site, job_id)
    return path.read_bytes() if path.exists() else b""


def log_lines(log: bytes) -> list[bytes]:
    """The log's lines, each with its newline (the last one may have none)."""
    pieces = log.split(b"\n")
    return [piece + b"\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


WHAT_RAN = b"--- what ran\n"


def job_bytes(log: bytes) -> bytes:
    """The log without hpc-runner's own lines and the `--- what ran` group that ends a finished
    job's log: what the job wrote (and the newline that ends its last line when the job left it
    unfinished)."""
    before, marker, _ = log.rpartition(WHAT_RAN)
    if marker:
        assert before.endswith(b"\n"), f"what ran does not start a line: {log[-600:]!r}"
    else:
        before = log
    return b"".join(line for line in log_lines(before) if not line.startswith(b"hpc-runner:"))


def runner_lines(log: bytes) -> list[bytes]:
    return [line for line in log_lines(log) if line.startswith(b"hpc-runner:")]


@dataclass(frozen=True)
class StoredJob:
    slurm_id: str | None
    log_offset: int
    final_status_entries: int
    states: list[str]  # the state changes of its audit log, in order


def stored_job(site: RunnerSite, job_id: str) -> StoredJob:
    """The job's row and its final_status audit entries in the agent's store, read-only, as root."""
    uri = f"file:{site.state_dir / DB_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute("SELECT slurm_id, log_offset FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert row is not None, f"no job {job_id} in the agent's store"
        (finals,) = db.execute("SELECT count(*) FROM audit WHERE job_id = ? AND action = 'final_status'",
                               (job_id,)).fetchone()
        states = [to for (to,) in db.execute(
            "SELECT json_extract(detail, '$.to') FROM audit WHERE job_id = ? AND action = 'state'"
            " ORDER BY seq", (job_id,))]
    return StoredJob(row[0], int(row[1]), int(finals), states)


def kill_agent(agent: AgentProcess) -> None:
    """SIGKILL the agent: the process that serves its socket, as the kernel names it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(agent.site.socket))
        pid, uid, _gid = peer_uid_gid(conn)
        conn.sendall(encode({"op": "ping"}))
        assert b'"ok":true' in conn.recv(65536)
    assert uid == pwd.getpwnam(SERVICE_USER).pw_uid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"agent" in cmdline and any(arg.endswith(b"hpc-runner") for arg in cmdline), cmdline
    os.kill(pid, signal.SIGKILL)
    assert agent.wait_exit(10) == -signal.SIGKILL, "the killed process was not the agent started"


def assert_log_is_what_the_job_wrote(site: RunnerSite, user: QueueUser, job_id: str, expected: bytes) -> None:
    """`hpc-runner logs` prints the log file; without hpc-runner's lines it is the job's bytes;
    the agent's store has shipped all of it (offset = size)."""
    printed = user.hpc_runner("logs", job_id, binary=True)
    assert printed.returncode == 0, printed.stderr
    log = printed.stdout
    assert log == read_log(site, job_id)
    # The agent ends an unfinished last line before it says what ran.
    assert WHAT_RAN in log
    assert job_bytes(log) == (expected if expected.endswith(b"\n") else expected + b"\n")
    ours = runner_lines(log)
    stored = stored_job(site, job_id)
    submitted = SUBMITTED.fullmatch(ours[0]) if ours else None
    assert submitted and submitted.groups() == (str(stored.slurm_id).encode(), job_id.encode()), ours
    # A job that had to wait for a CPU says so; nothing else is hpc-runner's to add here.
    assert all(line.startswith(b"hpc-runner: pending") for line in ours[1:]), ours
    assert stored.log_offset == len(log) == log_path(site, job_id).stat().st_size


def cancel(user: QueueUser, job_id: str) -> None:
    result = user.hpc_runner("cancel", job_id)
    assert result.returncode == 0, result.stderr


# -- hpc-runner run --executor slurm -----------------------------------------------------------


@pytest.fixture
def slurm_run_site(runner_site: RunnerSite, cluster: Cluster) -> RunnerSite:
    runner_site.write_policy(slurm_policy(cluster))
    return runner_site


def test_run_exits_with_the_jobs_exit_status_and_prints_its_output(slurm_run_site: RunnerSite) -> None:
    job = slurm_run_site.write_job("exit-3", job_toml("exit-3", script="echo about to fail\nexit 3\n",
                                                      time="1m"))

    result = slurm_run_site.run(job, "--executor", "slurm", timeout=JOB_TIMEOUT_S)

    assert result.returncode == 3, result.stderr
    # The log: hpc-runner's lines, the job's output, and srun's word on the failed task.
    ours = ("hpc-runner:", "srun: ")
    job_lines = [line for line in result.stdout.splitlines() if not line.startswith(ours)]
    assert job_lines == ["about to fail"], result.stdout
    submitted = SUBMITTED.match(result.stdout.encode())
    assert submitted, result.stdout
    assert "failed: exit status 3" in result.stderr
    # It ran in Slurm, as the policy decided.
    slurm_id, job_id = (group.decode() for group in submitted.groups())
    fields = slurm_job_fields(slurm_id)
    assert (fields["JobName"], fields["Account"], fields["Partition"], fields["ExitCode"]) == (
        f"hpcr-{job_id}", SLURM_ACCOUNT, "debug", "3:0"), fields
    # Its record: pending in Slurm's queue, then running (if a poll saw it run), then failed.
    stored = stored_job(slurm_run_site, job_id)
    assert stored.slurm_id == slurm_id
    assert stored.states in (["pending", "failed"], ["pending", "running", "failed"]), stored.states


def test_run_of_an_mpi_job_forms_one_world_of_two_ranks(slurm_run_site: RunnerSite) -> None:
    job = slurm_run_site.write_job("mpi", job_toml("mpi", command=["/usr/local/bin/mpi-hello"], tasks=2,
                                                   mpi=True, time="1m"))

    result = slurm_run_site.run(job, "--executor", "slurm", timeout=JOB_TIMEOUT_S)

    assert result.returncode == 0, result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert "world size 2" in lines and "allreduce sum 3" in lines, result.stdout
    assert {"rank 0 of 2", "rank 1 of 2"} <= set(lines), result.stdout
    submitted = SUBMITTED.match(result.stdout.encode())
    assert submitted, result.stdout
    assert slurm_job_fields(submitted.group(1).decode())["NumTasks"] == "2"


def test_run_with_an_account_slurm_rejects_fails_at_once_with_slurms_message(
    slurm_run_site: RunnerSite, cluster: Cluster
) -> None:
    slurm_run_site.write_policy(slurm_policy(cluster, slurm_account="bogus"))
    job = slurm_run_site.write_job("bogus", job_toml("bogus", script="echo must never run\n", time="1m"))

    result = slurm_run_site.run(job, "--executor", "slurm", timeout=60)

    assert result.returncode == exitcodes.INFRASTRUCTURE, result.stderr
    assert "Invalid account" in result.stdout, result.stdout
    assert "Slurm refused the job" in result.stderr and "Invalid account" in result.stderr, result.stderr
    assert "must never run" not in result.stdout
    job_id = re.search(r"hpc-runner: job ([0-9a-z]+) failed", result.stderr)
    assert job_id, result.stderr
    listed = subprocess.run(["squeue", "-h", "--states=all", "-n", f"hpcr-{job_id.group(1)}"],
                            capture_output=True, text=True, timeout=30, check=True)
    assert listed.stdout == "", "Slurm holds a job although sbatch refused it"


# -- the agent: start and restarts -------------------------------------------------------------


@contextlib.contextmanager
def agent_as_it_listens(site: RunnerSite) -> Iterator[tuple[subprocess.Popen[bytes], OutputReader]]:
    """An agent of `site`, started by hand and handed over (with its stderr) the moment it says its
    local queue listens; afterwards, if it still runs, SIGTERM and, 20 s later, SIGKILL."""
    agent = spawn_as_user(SERVICE_USER, ["hpc-runner", "agent", "--config", site.config], cwd=site.root,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        stderr = OutputReader(agent.stderr)
        stderr.wait_for(b"local queue listening", timeout=20)
        yield agent, stderr
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def test_an_agent_signalled_as_soon_as_it_listens_drains_and_exits_0(slurm_site: RunnerSite) -> None:
    with agent_as_it_listens(slurm_site) as (agent, stderr):
        agent.send_signal(signal.SIGTERM)
        logged = stderr.read_to_end(timeout=20)
        assert agent.wait(timeout=20) == 0, logged
    assert b"draining" in logged and b"agent stopped" in logged, logged


def numbered_job_with_the_agent_killed_midway(site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess],
                                              user: QueueUser, jobs: list[str]) -> str:
    """Submit NUMBERED_SCRIPT; SIGKILL the agent while the job writes its first 20 lines."""
    agent = agents(site)
    job_id = submit(user, jobs, slurm_job_toml("numbered", NUMBERED_SCRIPT, time="2m"))
    wait_for(lambda: stored_job(site, job_id).log_offset > FOLLOW_CHUNK_BYTES, JOB_TIMEOUT_S,
             what=f"the agent to store a log offset past {FOLLOW_CHUNK_BYTES}")
    kill_agent(agent)
    return job_id


def test_a_restarted_agent_follows_a_running_job_from_the_stored_offset(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    job_id = numbered_job_with_the_agent_killed_midway(slurm_site, agents, alice, slurm_jobs)
    # The job lives on without the agent, up to where it waits for /work/go.
    wait_for(lambda: b"\nline 20 " in read_log(slurm_site, job_id), 30, what="line 20 in the log")
    stored = stored_job(slurm_site, job_id)
    assert stored.slurm_id is not None
    assert slurm_job_fields(stored.slurm_id)["JobState"] == "RUNNING"
    assert 0 < stored.log_offset <= len(read_log(slurm_site, job_id))
    assert stored.final_status_entries == 0

    restarted = agents(slurm_site)
    restarted.wait_for_log("reattached to a Slurm job", timeout=30)
    assert alice.wait_state(job_id, "running", timeout=2 * DEFAULT_INTERVAL_SECONDS + 5)["state"] == "running"
    alice.release(job_id)

    finished = alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)
    assert (finished["state"], finished["exit_status"]) == ("succeeded", 0), finished
    assert_log_is_what_the_job_wrote(slurm_site, alice, job_id, numbered_output())
    assert stored_job(slurm_site, job_id).final_status_entries == 1


def test_a_job_that_ends_while_the_agent_is_down_is_reported_once_with_its_whole_log(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    job_id = numbered_job_with_the_agent_killed_midway(slurm_site, agents, alice, slurm_jobs)
    alice.release(job_id)
    wait_until_gone_from_squeue(job_id, JOB_TIMEOUT_S)
    stored = stored_job(slurm_site, job_id)
    assert stored.slurm_id is not None
    assert slurm_job_fields(stored.slurm_id)["JobState"] == "COMPLETED"
    assert stored.log_offset < len(read_log(slurm_site, job_id))
    assert stored.final_status_entries == 0

    restarted = agents(slurm_site)
    finished = alice.wait_end(job_id, timeout=30)
    assert (finished["state"], finished["exit_status"]) == ("succeeded", 0), finished
    assert_log_is_what_the_job_wrote(slurm_site, alice, job_id, numbered_output())
    assert stored_job(slurm_site, job_id).final_status_entries == 1

    # Another restart finds nothing left to report.
    restarted.stop()
    assert restarted.process.returncode == 0, restarted.log()
    agents(slurm_site)
    assert alice.status(job_id)["state"] == "succeeded"
    assert stored_job(slurm_site, job_id).final_status_entries == 1


def test_a_job_cancelled_while_the_restarted_agent_reattaches_is_cancelled_in_slurm(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    agent = agents(slurm_site)
    job_id = submit(alice, slurm_jobs, slurm_job_toml("outlives", LONG_SCRIPT, time="2m"))
    wait_for(lambda: b"started\n" in read_log(slurm_site, job_id), JOB_TIMEOUT_S, what="the job to start")
    kill_agent(agent)

    # The cancel request comes the moment the new agent listens, while it still asks Slurm
    # which of its jobs live on (root may cancel any job).
    with agent_as_it_listens(slurm_site):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(slurm_site.socket))
            conn.sendall(encode({"op": "cancel", "job_id": job_id}))
            assert b'"ok":true' in conn.recv(65536)
        cancelled = time.monotonic()
        bound = 2 * DEFAULT_INTERVAL_SECONDS + kill_wait_seconds()
        wait_until_gone_from_squeue(job_id, bound)
        assert time.monotonic() - cancelled <= bound
        assert alice.wait_end(job_id, timeout=bound)["state"] == "cancelled"
        assert stored_job(slurm_site, job_id).final_status_entries == 1


# -- the agent: pending jobs and cancel --------------------------------------------------------

def hog_and_pending_job(site: RunnerSite, user: QueueUser, jobs: list[str]) -> tuple[str, str]:
    """A running job that holds the node's two CPUs, and a job that therefore pends in Slurm."""
    hog = submit(user, jobs, slurm_job_toml("hog", LONG_SCRIPT, time="2m", cpus_per_task=2))
    user.wait_state(hog, "running", timeout=JOB_TIMEOUT_S)
    wait_for(lambda: b"started\n" in read_log(site, hog), 30, what="the hog to start")
    waiting = submit(user, jobs, slurm_job_toml("waits", NEVER_RUNS, time="1m"))
    user.wait_state(waiting, "pending", timeout=30)
    return hog, waiting


def slurm_state(job_id: str) -> str:
    result = subprocess.run(["squeue", "-h", "--states=all", "-n", f"hpcr-{job_id}", "-o", "%T"],
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


def test_a_pending_job_logs_why_it_waits(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    agents(slurm_site)
    hog, waiting = hog_and_pending_job(slurm_site, alice, slurm_jobs)

    # The tracker sees the reason on its first poll after Slurm's scheduler has looked at the job.
    pending = re.compile(rb"^hpc-runner: pending: ([A-Za-z]+)", re.MULTILINE)
    wait_for(lambda: pending.search(read_log(slurm_site, waiting)), 3 * DEFAULT_INTERVAL_SECONDS + 10,
             what="a pending line in the waiting job's log")

    log = alice.hpc_runner("logs", waiting, binary=True).stdout
    reason = pending.search(log)
    assert reason and reason.group(1) in (b"Resources", b"Priority"), log
    assert slurm_state(waiting) == "PENDING"
    assert alice.status(waiting)["state"] == "pending"
    assert job_bytes(log) == b""
    for job_id in (waiting, hog):
        cancel(alice, job_id)
    for job_id in (waiting, hog):
        assert alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)["state"] == "cancelled"


def whereabouts(site: RunnerSite, job_id: str) -> tuple[str | None, str | None]:
    """Why the agent's record says the job waits in Slurm, and the nodes it was given."""
    uri = f"file:{site.state_dir / DB_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute("SELECT state_reason, node_list FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert row is not None, f"no job {job_id} in the agent's store"
    return row[0], row[1]


def test_a_pending_jobs_record_says_slurms_reason_and_then_the_node_it_ran_on(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    agents(slurm_site)
    hog = submit(alice, slurm_jobs, slurm_job_toml("hog", LONG_SCRIPT, time="2m", cpus_per_task=2))
    alice.wait_state(hog, "running", timeout=JOB_TIMEOUT_S)
    waiting = submit(alice, slurm_jobs, slurm_job_toml("waits", "echo ran\n", time="1m"))
    alice.wait_state(waiting, "pending", timeout=30)

    # Slurm's own reason, from the tracker's first poll after the scheduler looked at the job.
    reason = wait_for(lambda: whereabouts(slurm_site, waiting)[0], 3 * DEFAULT_INTERVAL_SECONDS + 10,
                      what="Slurm's reason on the waiting job's record")
    assert reason in ("Resources", "Priority"), reason
    assert whereabouts(slurm_site, waiting)[1] is None
    assert whereabouts(slurm_site, hog) == (None, node_name())

    cancel(alice, hog)
    assert alice.wait_end(waiting, timeout=JOB_TIMEOUT_S)["state"] == "succeeded"
    # It ran on the node, and waits for nothing any more.
    assert whereabouts(slurm_site, waiting) == (None, node_name())
    assert alice.wait_end(hog, timeout=JOB_TIMEOUT_S)["state"] == "cancelled"


# What a job sees at /work and whether it can write there; the submitter's marker file tells their
# own directory apart from anything else.
PROBE_SCRIPT = textwrap.dedent("""\
    echo "listing:"; ls -A /work
    cat /work/secret-token 2>/dev/null || true
    touch /work/written-by-the-job
    echo "probe done"
    """)


def test_a_workspace_swapped_for_a_link_while_the_job_pends_mounts_nothing_of_the_agents(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    """The attack: submit from ~/ws, wait until Slurm lists the job PENDING, then
    `mv ~/ws ~/ws.real; ln -s <state_dir> ~/ws`. The job must still see only what was submitted,
    and nothing of its may reach the state dir."""
    agents(slurm_site)
    token = slurm_site.state_dir / "secret-token"
    write_service_secret(token, "agent-secret-3f9c\n")
    ws = alice.workspace / "ws"
    assert alice.run_as(["mkdir", "ws"]).returncode == 0
    assert alice.run_as(["sh", "-c", "echo mine > ws/alice-marker"]).returncode == 0

    hog = submit(alice, slurm_jobs, slurm_job_toml("hog", LONG_SCRIPT, time="2m", cpus_per_task=2))
    alice.wait_state(hog, "running", timeout=JOB_TIMEOUT_S)
    probe = alice.submit(job_toml("probe", script=PROBE_SCRIPT, time="1m"), workdir=ws)
    slurm_jobs.append(probe)
    alice.wait_state(probe, "pending", timeout=30)
    wait_for(lambda: slurm_state(probe) == "PENDING", 30, what="Slurm to list the probe PENDING")

    swap = alice.run_as(["sh", "-c", f"mv ws ws.real && ln -s {slurm_site.state_dir} ws"])
    assert swap.returncode == 0, swap.stderr
    cancel(alice, hog)
    finished = alice.wait_end(probe, timeout=JOB_TIMEOUT_S)

    log = alice.hpc_runner("logs", probe).stdout
    assert finished["state"] == "succeeded", log
    assert "probe done" in log
    listing = log.split("listing:\n", 1)[1].split("probe done", 1)[0]
    assert "alice-marker" in listing, log
    assert DB_FILENAME not in listing and "secret-token" not in listing, log
    assert "agent-secret-3f9c" not in log
    assert not (slurm_site.state_dir / "written-by-the-job").exists()
    assert token.read_text() == "agent-secret-3f9c\n"
    assert "results not copied back" in log, log


def test_cancel_takes_pending_and_running_jobs_out_of_slurm_within_two_polls_and_killwait(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    agents(slurm_site)
    bound = 2 * DEFAULT_INTERVAL_SECONDS + kill_wait_seconds()
    hog, waiting = hog_and_pending_job(slurm_site, alice, slurm_jobs)
    assert slurm_state(waiting) == "PENDING"
    assert slurm_state(hog) == "RUNNING"

    for job_id in (waiting, hog):
        cancel(alice, job_id)
        cancelled = time.monotonic()
        wait_until_gone_from_squeue(job_id, bound)
        assert time.monotonic() - cancelled <= bound
        assert alice.wait_state(job_id, "cancelled", "succeeded", "failed", "timed_out", "infra_failed",
                                timeout=bound)["state"] == "cancelled"
        assert stored_job(slurm_site, job_id).final_status_entries == 1

    assert b"must never run" not in read_log(slurm_site, waiting)
    assert b"not cancelled" not in read_log(slurm_site, hog)
    assert b"hpc-runner: job cancelled before it started\n" in read_log(slurm_site, waiting)
    assert b"hpc-runner: job cancelled; sent SIGTERM\n" in read_log(slurm_site, hog)


def test_a_job_cancelled_while_it_waits_for_the_agent_is_reported_once_and_never_reaches_slurm(
    slurm_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str]
) -> None:
    config = slurm_site.config.read_text()
    assert "max_jobs = 4\n" in config
    write_public_file(slurm_site.config, config.replace("max_jobs = 4\n", "max_jobs = 1\n"))
    agents(slurm_site)
    first = submit(alice, slurm_jobs, slurm_job_toml("first", LONG_SCRIPT, time="2m"))
    alice.wait_state(first, "pending", "running")
    queued = submit(alice, slurm_jobs, slurm_job_toml("queued", NEVER_RUNS, time="1m"))
    assert alice.status(queued)["state"] == "queued"

    cancel(alice, queued)

    assert alice.status(queued)["state"] == "cancelled"
    stored = stored_job(slurm_site, queued)
    assert (stored.slurm_id, stored.final_status_entries) == (None, 1)
    assert slurm_state(queued) == ""
    cancel(alice, first)
    assert alice.wait_end(first, timeout=JOB_TIMEOUT_S)["state"] == "cancelled"
    assert stored_job(slurm_site, first).final_status_entries == 1


# -- node failures -----------------------------------------------------------------------------

# Sleeps in its first attempt; a second attempt (after a node failure) ends at once. The marker is
# in the job's scratch directory (/tmp in the sandbox), which both attempts of one job share.
TWO_ATTEMPTS_SCRIPT = textwrap.dedent("""\
    if [ -e /tmp/attempted ]; then echo second attempt; exit 0; fi
    touch /tmp/attempted
    echo first attempt
    sleep 110
    echo the node never failed
    """)


def log_counts(site: RunnerSite, job_id: str, line: bytes, times: int) -> bool:
    return read_log(site, job_id).count(line) >= times


def node_name() -> str:
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30,
                            check=True)
    names = sorted(set(result.stdout.split()))
    assert len(names) == 1, f"the dev cluster has one node, sinfo lists {names}"
    return names[0]


@contextlib.contextmanager
def failing_node() -> Iterator[Callable[[], None]]:
    """`fail()` marks the node DOWN, as slurmctld does when a node stops answering: its jobs end
    NODE_FAIL. The node is back in service afterwards, whatever the test did."""
    node = node_name()

    def node_state() -> str:
        return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip().rstrip("*")

    def fail() -> None:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down",
                        "reason=hpc-runner node-failure test"], check=True, timeout=30)

    try:
        yield fail
    finally:
        if node_state() in ("down", "drained", "draining"):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], timeout=30,
                           check=False)
        wait_for(lambda: node_state() in ("idle", "mixed", "allocated"), 60, interval=0.5,
                 what=f"node {node} back in service")


@pytest.fixture
def retrying_site(slurm_site: RunnerSite, cluster: Cluster, agents: Callable[[RunnerSite], AgentProcess]
                  ) -> RunnerSite:
    """The Slurm site with its agent running, under a policy whose account retries node failures."""
    slurm_site.write_policy(slurm_policy(cluster, retry_node_failures=True))
    agents(slurm_site)
    return slurm_site


def test_a_node_failure_is_retried_once_when_the_account_allows(
    retrying_site: RunnerSite, alice: QueueUser, slurm_jobs: list[str]
) -> None:
    with failing_node() as fail:
        job_id = submit(alice, slurm_jobs, slurm_job_toml("node-failure", TWO_ATTEMPTS_SCRIPT, time="2m"))
        wait_for(lambda: b"first attempt\n" in read_log(retrying_site, job_id), JOB_TIMEOUT_S,
                 what="the first attempt")
        first_slurm_id = stored_job(retrying_site, job_id).slurm_id
        assert first_slurm_id is not None

        fail()

        finished = alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)
    assert (finished["state"], finished["exit_status"]) == ("succeeded", 0), finished
    assert slurm_job_fields(first_slurm_id)["JobState"] == "NODE_FAIL"
    log = read_log(retrying_site, job_id)
    # Slurm says what happened in its own words too ("srun: error: Node failure on <node>").
    slurms = (b"srun:", b"slurmstepd")
    assert [line for line in log_lines(job_bytes(log)) if not line.startswith(slurms)] == [
        b"first attempt\n", b"second attempt\n"], log
    assert b"a node of the job failed (NODE_FAIL)" in log and b"submitting it again, once" in log
    stored = stored_job(retrying_site, job_id)
    assert stored.slurm_id not in (None, first_slurm_id)
    assert stored.final_status_entries == 1
    assert len(SUBMITTED.findall(log)) == 2


def test_a_node_failure_ends_the_job_as_an_infrastructure_failure_when_the_account_does_not_retry(
    slurm_run_site: RunnerSite
) -> None:
    job = slurm_run_site.write_job("node-failure",
                                   job_toml("node-failure", script=TWO_ATTEMPTS_SCRIPT, time="2m"))
    site = slurm_run_site
    with failing_node() as fail:
        process = spawn_as_user(SERVICE_USER, ["hpc-runner", "run", job, "--config", site.config, "--workdir",
                                               site.workspace, "--executor", "slurm"],
                                cwd=site.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stdout = OutputReader(process.stdout)
            stdout.wait_for(b"first attempt\n", JOB_TIMEOUT_S)
            fail()
            assert process.wait(JOB_TIMEOUT_S) == exitcodes.INFRASTRUCTURE
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    assert "infra_failed: a node of the job failed (NODE_FAIL)" in stderr, stderr
    output = stdout.read_to_end(10)
    assert b"second attempt" not in output and b"submitting it again" not in output, output


def test_a_job_retried_after_a_node_failure_is_not_retried_a_second_time(
    retrying_site: RunnerSite, alice: QueueUser, slurm_jobs: list[str]
) -> None:
    with failing_node() as fail:
        job_id = submit(alice, slurm_jobs, slurm_job_toml("node-failures", "echo attempt\nsleep 110\n",
                                                          time="2m"))
        for attempt in (1, 2):
            wait_for(partial(log_counts, retrying_site, job_id, b"attempt\n", attempt), JOB_TIMEOUT_S,
                     what=f"attempt {attempt}")
            fail()

        finished = alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)
    assert finished["state"] == "infra_failed", finished
    log = read_log(retrying_site, job_id)
    assert len(SUBMITTED.findall(log)) == 2
    assert b"it was already submitted again once, so it ends here\n" in log
    assert stored_job(retrying_site, job_id).final_status_entries == 1
