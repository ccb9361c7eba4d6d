"""The setup phase and named caches on the real cluster: Apptainer, Slurm and the agent.

The agent (`executor = "slurm"`, as the service account) runs a job's setup on its own node and
its main phase through Slurm; `hpc-runner run` (local executor) shows the setup's network as the
grant says. Caches are directories of the service account under the test's own directory, which
the node (this machine) sees at the same path.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    RunnerSite,
    as_service_user,
    image_table,
    job_toml,
    make_runner_site,
    policy_document,
    toml_table,
    wait_for,
)

from integration.test_agent_slurm import (
    ALICE,
    JOB_TIMEOUT_S,
    SLURM_ACCOUNT,
    StoredJob,
    read_log,
    squeue_lists,
    stored_job,
    submit,
)
from integration.test_local_queue import QueueUser

CACHE = "depot"
SETUP_GROUP = b"--- setup\n"
MAIN_GROUP = b"--- main\n"


def cache_policy(cluster: Cluster, depot: Path, *, setup_network: bool = False) -> str:
    """The Slurm tests' account with a cache, granted to alice's group and the service account."""
    return policy_document(
        toml_table("[accounts.esm]", slurm_account=SLURM_ACCOUNT, partitions=["debug"], max_time="2m",
                   max_memory="1G", max_setup_time="5m"),
        toml_table("[accounts.esm.caches]", **{CACHE: str(depot)}),
        image_table(cluster.image, cluster.image_sha256),
        toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm"], account="esm",
                   images=[TEST_IMAGE_NAME], caches=[CACHE], setup_network=setup_network),
        toml_table("[[grants]]", name="service", principals=[f"local:user:{SERVICE_USER}"], account="esm",
                   images=[TEST_IMAGE_NAME], caches=[CACHE], setup_network=setup_network))


def with_setup(job: str, setup: str, *, time: str = "1m", caches: tuple[str, ...] = (CACHE,)) -> str:
    """`job` (a job_toml text) with a `[job.setup]` script and the caches it uses."""
    head, _, rest = job.partition("\n")
    assert head == "[job]", job
    listed = ", ".join(f'"{name}"' for name in caches)
    return f"[job]\ncaches = [{listed}]\n{rest}\n[job.setup]\nscript = '''\n{setup}'''\ntime = \"{time}\"\n"


def service_directory(path: Path, mode: int = 0o755) -> Path:
    account = pwd.getpwnam(SERVICE_USER)
    path.mkdir(mode=mode)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)
    return path


@pytest.fixture
def depot(service_tmp: Path) -> Path:
    return service_directory(service_tmp / "caches-depot")


@pytest.fixture
def cache_site(cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str],
               depot: Path) -> RunnerSite:
    """An agent config with executor = "slurm" whose socket every local user may reach."""
    service_tmp.chmod(0o755)  # the users' workspaces live in it
    site = make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=2,
                            executor="slurm")
    site.write_policy(cache_policy(cluster, depot))
    return site


@pytest.fixture
def agent(cache_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess]) -> AgentProcess:
    return agents(cache_site)


@pytest.fixture
def alice(cache_site: RunnerSite) -> QueueUser:
    return QueueUser(ALICE, cache_site)


@pytest.fixture
def slurm_jobs() -> Iterator[list[str]]:
    """The hpc-runner ids a test submits; whatever Slurm still runs of them afterwards is cancelled."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        subprocess.run(["scancel", f"--name=hpcr-{job_id}", f"--user={SERVICE_USER}"], capture_output=True,
                       timeout=30, check=False)


def sacct_lists(job_id: str) -> str:
    """What Slurm's accounting knows of jobs named hpcr-<id> (nothing: empty)."""
    result = subprocess.run(["sacct", "-n", "-X", f"--name=hpcr-{job_id}", "-S", "now-1days", "-o", "JobID"],
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


def in_order(log: bytes, *parts: bytes) -> bool:
    at = 0
    for part in parts:
        found = log.find(part, at)
        if found < 0:
            return False
        at = found + len(part)
    return True


def test_setup_fills_a_cache_that_the_main_phase_reads_offline_under_slurm_and_cannot_write(
        cache_site: RunnerSite, agent: AgentProcess, alice: QueueUser, slurm_jobs: list[str],
        depot: Path) -> None:
    setup = ('echo "filling $HPC_RUNNER_CACHE_DEPOT"\n'
             'printf "instantiated %s\\n" "$HPC_RUNNER_JOB_ID" > "$HPC_RUNNER_CACHE_DEPOT/Manifest"\n')
    main = ('echo "main reads: $(cat "$HPC_RUNNER_CACHE_DEPOT/Manifest")"\n'
            'if echo changed > /cache/depot/Manifest; then echo "main wrote the cache"; '
            'else echo "main could not write the cache"; fi\n')
    job_id = submit(alice, slurm_jobs, with_setup(job_toml("fill", script=main, time="1m"), setup))

    record = alice.wait_state(job_id, "succeeded", "failed", "infra_failed", timeout=JOB_TIMEOUT_S)

    log = read_log(cache_site, job_id)
    assert record["state"] == "succeeded", log.decode(errors="replace")
    # The setup wrote into the cache, as the service account, and the main phase left it alone.
    manifest = depot / "Manifest"
    assert manifest.read_text() == f"instantiated {job_id}\n"
    assert manifest.stat().st_uid == pwd.getpwnam(SERVICE_USER).pw_uid
    size = len(f"instantiated {job_id}\n")
    assert in_order(log, SETUP_GROUP, b"filling /cache/depot\n", f"cache depot: {size} bytes\n".encode(),
                    MAIN_GROUP, f"main reads: instantiated {job_id}\n".encode(),
                    b"main could not write the cache\n", b"--- what ran\n"), log.decode(errors="replace")
    # The shell's own word on the write (stderr: its place among the lines above is Slurm's to choose).
    assert b"cannot create /cache/depot/Manifest: Read-only file system" in log.partition(MAIN_GROUP)[2]
    assert b"main wrote the cache" not in log
    # The main phase went through Slurm, after the setup.
    stored = stored_job(cache_site, job_id)
    assert stored.slurm_id is not None
    assert "running" in stored.states and "pending" in stored.states, stored.states
    assert stored.states.index("running") < stored.states.index("pending"), stored.states


def test_a_failing_setup_ends_the_job_failed_and_submits_nothing_to_slurm(
        cache_site: RunnerSite, agent: AgentProcess, alice: QueueUser, slurm_jobs: list[str]) -> None:
    job = with_setup(job_toml("broken", script="echo must never run\n", time="1m"),
                     "echo cannot resolve the registry\nexit 4\n")
    job_id = submit(alice, slurm_jobs, job)

    record = alice.wait_state(job_id, "succeeded", "failed", "infra_failed", "pending", timeout=JOB_TIMEOUT_S)

    log = read_log(cache_site, job_id)
    assert (record["state"], record["exit_status"]) == ("failed", 4), log.decode(errors="replace")
    assert "the setup phase failed: exit status 4" in record["detail"]
    assert in_order(log, SETUP_GROUP, b"cannot resolve the registry\n", b"cache depot: 0 bytes\n",
                    b"hpc-runner: the setup phase failed (exit status 4); the main phase does not run\n")
    assert MAIN_GROUP not in log and b"must never run" not in log
    stored: StoredJob = stored_job(cache_site, job_id)
    assert stored.slurm_id is None and "pending" not in stored.states
    assert not squeue_lists(job_id)
    assert sacct_lists(job_id) == ""


def test_a_cancel_during_setup_stops_it_and_nothing_reaches_slurm(
        cache_site: RunnerSite, agent: AgentProcess, alice: QueueUser, slurm_jobs: list[str],
        depot: Path) -> None:
    setup = "echo setting up\nsleep 100\ntouch /cache/depot/not-cancelled\n"
    job_id = submit(alice, slurm_jobs, with_setup(job_toml("slow", script="echo must never run\n", time="1m"),
                                                  setup, time="3m"))
    wait_for(lambda: b"setting up\n" in read_log(cache_site, job_id), JOB_TIMEOUT_S,
             what="the setup to start")

    assert alice.hpc_runner("cancel", job_id).returncode == 0
    record = alice.wait_state(job_id, "cancelled", "failed", "succeeded", timeout=30)

    assert record["state"] == "cancelled"
    assert record["detail"] == "cancelled during the setup phase"
    assert not (depot / "not-cancelled").exists()
    assert stored_job(cache_site, job_id).slurm_id is None and sacct_lists(job_id) == ""


def test_a_cache_writable_by_others_refuses_the_job(
        cache_site: RunnerSite, agent: AgentProcess, alice: QueueUser, slurm_jobs: list[str],
        depot: Path) -> None:
    depot.chmod(0o777)
    job_id = submit(alice, slurm_jobs, with_setup(job_toml("open", script="echo must never run\n", time="1m"),
                                                  "echo must never run either\n"))

    record = alice.wait_state(job_id, "denied", "failed", "succeeded", timeout=JOB_TIMEOUT_S)

    assert record["state"] == "denied"
    assert "can be written by others (mode 777)" in record["detail"]
    assert b"must never run" not in read_log(cache_site, job_id)


# -- the setup's network (hpc-runner run, local executor) --------------------------------------


def network_policy(cluster: Cluster, *, setup_network: bool) -> str:
    return policy_document(
        toml_table("[accounts.ci]", slurm_account="ci", partitions=["local"], max_time="10m"),
        image_table(cluster.image, cluster.image_sha256),
        toml_table("[[grants]]", name="ci-jobs", principals=[f"local:user:{SERVICE_USER}"], account="ci",
                   images=[TEST_IMAGE_NAME], setup_network=setup_network))


def test_a_setup_has_no_network_unless_the_grant_gives_it_setup_network(
        runner_site: RunnerSite, cluster: Cluster) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        connect = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected\n"
        host = as_service_user(["bash", "-c", connect])
        assert host.returncode == 0 and host.stdout == "connected\n", f"no server to reach: {host.stderr}"
        job = with_setup(job_toml("fetch", command=["echo", "main phase"]), f"bash -c '{connect.strip()}'\n",
                         caches=())

        runner_site.write_policy(network_policy(cluster, setup_network=False))
        offline = runner_site.run(runner_site.write_job("offline", job))
        runner_site.write_policy(network_policy(cluster, setup_network=True))
        online = runner_site.run(runner_site.write_job("online", job))

    assert offline.returncode == 1, offline.stderr
    assert f"/dev/tcp/127.0.0.1/{port}: " in offline.stdout  # bash's own connect error
    assert "connected" not in offline.stdout.splitlines() and "main phase" not in offline.stdout.splitlines()
    assert "the setup phase failed: exit status 1" in offline.stderr
    assert online.returncode == 0, online.stderr + online.stdout
    assert in_order(online.stdout.encode(), SETUP_GROUP, b"connected\n", MAIN_GROUP, b"main phase\n")


def test_a_setup_past_its_time_is_stopped_and_fails_the_job(runner_site: RunnerSite,
                                                            cluster: Cluster) -> None:
    runner_site.write_policy(network_policy(cluster, setup_network=False))
    job = with_setup(job_toml("slow", command=["echo", "main phase"]),
                     "echo setting up\nsleep 60\necho still setting up\n", time="3s", caches=())
    started = time.monotonic()

    result = runner_site.run(runner_site.write_job("slow", job))

    took = time.monotonic() - started
    assert result.returncode != 0, result.stdout
    lines = result.stdout.splitlines()
    assert "setting up" in lines and "still setting up" not in lines and "main phase" not in lines
    assert "hpc-runner: setup time of 3s exceeded; sent SIGTERM" in lines, result.stdout
    assert "the setup phase failed: setup time of 3s exceeded" in result.stderr
    # The 3 s, the grace period (1 s) and Apptainer's start and end: far from the 60 s asked for.
    assert took < 30, took
