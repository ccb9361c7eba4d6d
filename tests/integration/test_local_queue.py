"""The embedded local queue as a cluster admin sets it up for several users.

An agent runs as the service account with its socket outside the state dir, so every local
user can submit; two users in different Unix groups submit, inspect and cancel jobs, each
decided by the grant of their own group. Identities come from the socket's peer credentials:
the tests only choose which Unix user runs each command.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import signal
import socket
import stat
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TEST_IMAGE_NAME,
    VENV,
    AgentProcess,
    Cluster,
    OutputReader,
    RunnerSite,
    as_service_user,
    as_user,
    image_table,
    job_toml,
    make_runner_site,
    policy_document,
    spawn_as_user,
    toml_string,
    toml_table,
    user_workspace,
    wait_for,
    write_public_file,
)

ALICE, BOB = "hpcr-alice", "hpcr-bob"
JOB_TIMEOUT_S = 60.0
# A job that prints a line, then waits (at most its walltime) until the test creates /work/go.
WAITING_SCRIPT = (
    "echo first line\n"
    "while [ ! -e /work/go ]; do sleep 0.1; done\n"
    "echo second line\n"
)


def queue_policy(cluster: Cluster, *, esm_grant: bool = True) -> str:
    """Each group its own account and grant; alice administers ocean (bob's account)."""
    esm = toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm"], account="esm",
                     images=[TEST_IMAGE_NAME])
    ocean = toml_table("[[grants]]", name="ocean-members", principals=["local:group:hpcr-ocean"],
                       account="ocean", images=[TEST_IMAGE_NAME])
    return policy_document(
        toml_table("[accounts.esm]", slurm_account="esm", partitions=["local"], max_time="5m"),
        toml_table("[accounts.ocean]", slurm_account="ocean", partitions=["local"], max_time="1m",
                   admins=[f"local:user:{ALICE}"]),
        image_table(cluster.image, cluster.image_sha256),
        *([esm] if esm_grant else []), ocean)


@pytest.fixture
def queue_site(cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str]
               ) -> RunnerSite:
    service_tmp.chmod(0o755)  # the users' workspaces live in it
    site = make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=4)
    site.write_policy(queue_policy(cluster))
    return site


@pytest.fixture
def agent(queue_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess]) -> AgentProcess:
    return agents(queue_site)


class QueueUser:
    """One local user's view of the queue: their workspace and the CLI as them."""

    def __init__(self, name: str, site: RunnerSite) -> None:
        self.name = name
        self.site = site
        self.workspace = user_workspace(site.root, name)

    def hpc_runner(self, *args: str | os.PathLike[str], binary: bool = False
                   ) -> subprocess.CompletedProcess[Any]:
        return as_user(self.name, ["hpc-runner", *args, "--config", self.site.config], cwd=self.workspace,
                       binary=binary, timeout=60)

    def run_as(self, argv: list[str]) -> subprocess.CompletedProcess[Any]:
        """A command as this user in their workspace."""
        return as_user(self.name, argv, cwd=self.workspace, timeout=60)

    def submit(self, job_text: str, *, expect: int = 0, workdir: Path | None = None) -> str:
        """Submit from the user's workspace (or `workdir`); the job id (the last line printed)."""
        job = self.workspace / f"job-{len(list(self.workspace.glob('job-*.toml')))}.toml"
        write_public_file(job, job_text)
        result = self.hpc_runner("submit", job, *(("--workdir", workdir) if workdir else ()))
        assert result.returncode == expect, f"submit exited {result.returncode}: {result.stderr}"
        return str(result.stdout.splitlines()[-1])

    def status(self, job_id: str) -> dict[str, Any]:
        result = self.hpc_runner("status", job_id, "--json")
        assert result.returncode == 0, result.stderr
        record: dict[str, Any] = json.loads(result.stdout)[0]
        return record

    def wait_state(self, job_id: str, *states: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            record = self.status(job_id)
            return record if record["state"] in states else None

        return wait_for(reached, timeout, interval=0.2, what=f"job {job_id} of {self.name} to be {states}")

    def job_workspace(self, job_id: str) -> Path:
        """The job's /work: the agent's copy of the workspace it was submitted from."""
        return self.site.work_root / job_id / "workspace"

    def release(self, job_id: str) -> None:
        """Let a job of WAITING_SCRIPT go on past its wait."""
        (self.job_workspace(job_id) / "go").touch()

    def released(self, job_id: str) -> bool:
        return (self.job_workspace(job_id) / "go").exists()

    def wait_end(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        return self.wait_state(job_id, "succeeded", "failed", "cancelled", "timed_out", "denied",
                               "infra_failed", timeout=timeout)


@pytest.fixture
def alice(queue_site: RunnerSite) -> QueueUser:
    return QueueUser(ALICE, queue_site)


@pytest.fixture
def bob(queue_site: RunnerSite) -> QueueUser:
    return QueueUser(BOB, queue_site)


def stored_state(site: RunnerSite, job_id: str) -> str:
    """The job's state in the agent's store, read as the service account (with no agent running)."""
    code = ("import sys; from runner.store import Store\n"
            "with Store.open(sys.argv[1]) as store: print(store.get_job(sys.argv[2]).state)")
    result = as_service_user([VENV / "bin" / "python", "-c", code, site.state_dir, job_id])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# -- policy per user ---------------------------------------------------------------------------


def test_each_user_is_decided_by_the_grant_of_their_own_group(
    agent: AgentProcess, alice: QueueUser, bob: QueueUser
) -> None:
    # Every local user may connect; what each may do is the policy's business.
    assert stat.S_IMODE(agent.site.socket.stat().st_mode) == 0o666
    assert stat.S_IMODE(agent.site.socket.parent.stat().st_mode) == 0o755
    job = job_toml("three-minutes", script="echo ran as decided\n", time="3m")

    alice_job = alice.submit(job)
    denied = bob.hpc_runner("submit", write_job(bob, job))

    assert denied.returncode == 126, denied.stderr
    assert "grant 'ocean-members': walltime 3m exceeds account ocean's max_time = 1m" in denied.stderr
    bob_job = denied.stdout.splitlines()[-1]
    assert bob.status(bob_job)["state"] == "denied"
    finished = alice.wait_end(alice_job)
    assert (finished["state"], finished["account"]) == ("succeeded", "esm")
    # The job's output, then the lines that say what ran.
    assert alice.hpc_runner("logs", alice_job).stdout.startswith("ran as decided\n--- what ran\n")


def write_job(user: QueueUser, text: str) -> Path:
    path = user.workspace / "job.toml"
    write_public_file(path, text)
    return path


# -- who may cancel ----------------------------------------------------------------------------


def test_cancel_is_for_the_submitter_and_the_admins_of_the_jobs_account(
    agent: AgentProcess, alice: QueueUser, bob: QueueUser
) -> None:
    alice_job = alice.submit(job_toml("alice-waits", script=WAITING_SCRIPT, time="4m"))
    bob_jobs = [bob.submit(job_toml("bob-waits", script=WAITING_SCRIPT, time="50s")) for _ in range(2)]
    alice.wait_state(alice_job, "running")
    for job_id in bob_jobs:
        bob.wait_state(job_id, "running")

    refused = bob.hpc_runner("cancel", alice_job)
    assert refused.returncode == 1
    assert f"job {alice_job} belongs to {ALICE}" in refused.stderr
    assert bob.hpc_runner("status", alice_job).returncode == 1  # nor may bob look at it
    assert alice.status(alice_job)["state"] == "running"

    # Alice administers ocean, bob's account; bob cancels his own job.
    assert alice.hpc_runner("cancel", bob_jobs[0]).returncode == 0
    assert bob.hpc_runner("cancel", bob_jobs[1]).returncode == 0
    assert [bob.wait_end(job_id)["state"] for job_id in bob_jobs] == ["cancelled", "cancelled"]
    assert alice.status(alice_job)["state"] == "running"
    assert alice.hpc_runner("cancel", alice_job).returncode == 0
    assert alice.wait_end(alice_job)["state"] == "cancelled"
    assert not alice.released(alice_job)


# -- logs --------------------------------------------------------------------------------------


def test_logs_follow_streams_each_line_as_the_job_writes_it(agent: AgentProcess, alice: QueueUser) -> None:
    job_id = alice.submit(job_toml("streams", script=WAITING_SCRIPT, time="2m"))
    follower = spawn_as_user(ALICE, ["hpc-runner", "logs", job_id, "--follow", "--config", alice.site.config],
                             cwd=alice.workspace, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        output = OutputReader(follower.stdout)
        early = output.wait_for(b"first line\n", timeout=JOB_TIMEOUT_S)
        # The job is still waiting for /work/go, which does not exist yet: the line came live.
        assert not alice.released(job_id)
        assert b"second line" not in early
        alice.release(job_id)
        rest = output.read_to_end(timeout=JOB_TIMEOUT_S)
        assert rest.startswith(b"first line\nsecond line\n--- what ran\n"), rest
        assert follower.wait(timeout=JOB_TIMEOUT_S) == 0, follower.communicate()[1]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert alice.status(job_id)["state"] == "succeeded"


# Not UTF-8, a NUL, a carriage return, and no newline at the end.
RAW_OUTPUT = b"caf\xc3\xa9 \xff\xfe raw\r\nnul \x00 inside\nno newline at the end"


def test_logs_are_byte_identical_to_what_the_job_wrote(agent: AgentProcess, alice: QueueUser) -> None:
    script = "printf 'caf\\303\\251 \\377\\376 raw\\r\\nnul \\000 inside\\nno newline at the end'\n"
    job_id = alice.submit(job_toml("raw-bytes", script=script))
    assert alice.wait_end(job_id)["state"] == "succeeded"

    printed = alice.hpc_runner("logs", job_id, binary=True)
    followed = alice.hpc_runner("logs", job_id, "--follow", binary=True)

    assert printed.returncode == 0, printed.stderr
    # Byte for byte, then what ran, on a line of its own after the job's unfinished last line.
    assert printed.stdout.startswith(RAW_OUTPUT + b"\n--- what ran\n"), printed.stdout
    assert followed.stdout == printed.stdout


# -- workspaces --------------------------------------------------------------------------------


def test_a_workspace_of_another_user_is_refused(
    agent: AgentProcess, alice: QueueUser, bob: QueueUser
) -> None:
    alice_uid = pwd.getpwnam(ALICE).pw_uid
    job = job_toml("elsewhere", script="touch /work/ran.txt\n", time="30s")
    link = bob.workspace / "link-to-alice"
    link.symlink_to(alice.workspace)
    os.lchown(link, pwd.getpwnam(BOB).pw_uid, -1)

    for workdir in (alice.workspace, link):
        refused = bob.hpc_runner("submit", write_job(bob, job), "--workdir", workdir)
        assert refused.returncode == 1
        assert f"is owned by uid {alice_uid}, not by you" in refused.stderr

    assert json.loads(bob.hpc_runner("status", "--json").stdout) == []
    assert not (alice.workspace / "ran.txt").exists()


# -- the agent's lifecycle ---------------------------------------------------------------------


def test_agent_refuses_to_start_on_an_invalid_policy_naming_file_line_and_field(
    queue_site: RunnerSite, cluster: Cluster
) -> None:
    text = queue_policy(cluster) + '\n[accounts.broken]\nslurm_account = "x"\n' \
        'partitions = ["local"]\nmax_time = "forever"\n'
    queue_site.write_policy(text)
    line = text.splitlines().index('max_time = "forever"') + 1

    result = as_service_user(["hpc-runner", "agent", "--config", queue_site.config], cwd=queue_site.root,
                             timeout=30)

    assert result.returncode == 1
    assert f"{queue_site.policy}:{line}: accounts.broken.max_time:" in result.stderr
    assert not queue_site.socket.exists()


def test_an_agent_config_with_a_gateway_section_serves_and_says_the_gateway_is_not_its_own(
        queue_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    section = (f'[gateway]\nlisten = "127.0.0.1:{port}"\nwebhook_secret_file = "/etc/hpc-runner/secret"\n'
               'agent_tokens_file = "/etc/hpc-runner/tokens"\nstate_dir = "/var/lib/hpc-runner-gateway"\n')
    write_public_file(queue_site.config, queue_site.config.read_text() + "\n" + section)

    agent = agents(queue_site)

    assert "hpc-runner: note: the config's [gateway] section is served by `hpc-runner gateway`, " \
           "not by the agent" in agent.log()
    assert queue_site.socket.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the agent must not listen for webhooks"


def test_agent_with_buildkite_refuses_to_start_without_its_token_file(queue_site: RunnerSite) -> None:
    buildkite_config = queue_site.root / "buildkite.toml"
    section = '[buildkite]\ntoken_file = "/etc/hpc-runner/buildkite-token"\nallow_unsigned = true\n'
    write_public_file(buildkite_config, queue_site.config.read_text() + "\n" + section)

    result = as_service_user(["hpc-runner", "agent", "--config", buildkite_config], cwd=queue_site.root,
                             timeout=30)

    assert result.returncode == 1
    assert "refusing to start: " in result.stderr and "/etc/hpc-runner/buildkite-token" in result.stderr
    assert not queue_site.socket.exists()


def test_agent_refuses_a_socket_path_too_long_for_a_unix_socket(queue_site: RunnerSite) -> None:
    long_socket = queue_site.root / ("d" * 100) / "agent.sock"
    config = queue_site.root / "long-socket.toml"
    write_public_file(config, queue_site.config.read_text().replace(
        f"socket = {toml_string(queue_site.socket)}", f"socket = {toml_string(long_socket)}"))

    result = as_service_user(["hpc-runner", "agent", "--config", config], cwd=queue_site.root, timeout=30)

    assert result.returncode == 1
    assert f"the local queue socket {long_socket} is {len(str(long_socket))} bytes long" in result.stderr
    assert "Traceback" not in result.stderr


def test_sighup_keeps_the_old_policy_when_the_new_one_is_invalid(
    agent: AgentProcess, queue_site: RunnerSite, cluster: Cluster, alice: QueueUser
) -> None:
    valid = queue_policy(cluster)
    queue_site.write_policy(valid.replace("[[grants]]", "[[grant]]", 1))
    agent.send(signal.SIGHUP)
    agent.wait_for_log("policy reload refused")

    job_id = alice.submit(job_toml("after-bad-reload", script="echo still allowed\n"))
    assert alice.wait_end(job_id)["state"] == "succeeded"

    # A valid new policy does take effect: without the esm grant, alice is denied.
    queue_site.write_policy(queue_policy(cluster, esm_grant=False))
    agent.send(signal.SIGHUP)
    agent.wait_for_log("policy reloaded")
    denied = alice.submit(job_toml("after-good-reload", script="echo denied\n"), expect=126)
    assert alice.status(denied)["state"] == "denied"


def drain_while_running(agent: AgentProcess, user: QueueUser, name: str) -> str:
    """Submit a WAITING_SCRIPT job `name`, wait until it runs, then SIGTERM the agent and wait until
    it says it is draining; the job's id."""
    job_id = user.submit(job_toml(name, script=WAITING_SCRIPT, time="2m"))
    user.wait_state(job_id, "running")
    agent.send(signal.SIGTERM)
    agent.wait_for_log("draining")
    return job_id


def test_sigterm_lets_the_running_job_finish_then_the_agent_exits_0(
    agent: AgentProcess, queue_site: RunnerSite, alice: QueueUser
) -> None:
    job_id = drain_while_running(agent, alice, "outlives-sigterm")
    refused = alice.hpc_runner("submit", write_job(alice, job_toml("too-late", script="true\n")))
    assert refused.returncode == 1
    assert "shutting down" in refused.stderr
    assert agent.process.poll() is None, "the agent left before its running job finished"
    alice.release(job_id)

    assert agent.wait_exit(JOB_TIMEOUT_S) == 0
    assert stored_state(queue_site, job_id) == "succeeded"
    log = (queue_site.work_root / job_id / "output.log").read_text()
    assert log.startswith("first line\nsecond line\n--- what ran\n"), log


def test_second_sigterm_cancels_the_running_job_then_the_agent_exits_0(
    agent: AgentProcess, queue_site: RunnerSite, alice: QueueUser
) -> None:
    job_id = drain_while_running(agent, alice, "cancelled-by-sigterm")
    agent.send(signal.SIGTERM)

    assert agent.wait_exit(JOB_TIMEOUT_S) == 0
    assert stored_state(queue_site, job_id) == "cancelled"
    assert not alice.released(job_id)


# -- hostile clients ---------------------------------------------------------------------------

# Run as one user: opens COUNT connections to the socket and sends nothing; once the agent has
# answered all but the connections it may hold for that user, prints what it answered (and how
# many connections it has not answered yet), then holds every socket open until stdin closes.
IDLE_CONNECTIONS = textwrap.dedent("""
    import collections, json, resource, selectors, socket, sys, time
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    path, count, may_hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)  # blocking: waits while the agent's listen backlog is full
        socks.append(sock)
    answers, silent, deadline = collections.Counter(), set(socks), time.monotonic() + 60
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    while len(silent) > may_hold and time.monotonic() < deadline:
        for key, _ in selector.select(1):
            answers[json.loads(key.fileobj.recv(65536) or b"{}").get("error", "")] += 1
            silent.discard(key.fileobj)
            selector.unregister(key.fileobj)
    print(json.dumps({"answers": answers, "silent": len(silent)}), flush=True)
    sys.stdin.read()
""")
IDLE_COUNT = 1040  # as in the report: enough to fill the usual 1024 open files
PER_USER_CAP = 16


@pytest.fixture
def low_open_file_limit() -> Iterator[None]:
    """Commands started meanwhile inherit the usual soft limit of 1024 open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_file_limits(pid: int) -> tuple[int, int]:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_one_users_idle_connections_neither_shut_out_another_user_nor_flood_the_log(
    queue_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], low_open_file_limit: None,
    alice: QueueUser, bob: QueueUser
) -> None:
    agent = agents(queue_site)
    log_before = len(agent.log())
    flood = spawn_as_user(ALICE, [VENV / "bin" / "python", "-c", IDLE_CONNECTIONS, queue_site.socket,
                                  str(IDLE_COUNT), str(PER_USER_CAP)],
                          cwd=alice.workspace, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        assert flood.stdout is not None and flood.stderr is not None
        try:
            line = OutputReader(flood.stdout).wait_for(b"\n", timeout=120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stderr: {flood.stderr.read().decode()}") from None
        summary = json.loads(line)
        # While alice holds every socket she opened, bob is served.
        served = bob.hpc_runner("status", "--json")
        assert served.returncode == 0, served.stderr
        assert json.loads(served.stdout) == []
    finally:
        flood.communicate(timeout=30)  # closes stdin: alice's sockets close
    refusal = (f"too many connections: uid {pwd.getpwnam(ALICE).pw_uid} already has {PER_USER_CAP} open "
               f"with the agent (at most {PER_USER_CAP} at once); close some and try again")
    assert summary["silent"] <= PER_USER_CAP, summary
    assert set(summary["answers"]) <= {refusal, "no complete request within 10 s"}, summary
    assert summary["answers"][refusal] > 0, summary

    assert agent.process.poll() is None, agent.log()
    assert alice.hpc_runner("status", "--json").returncode == 0
    flood_log = agent.log()[log_before:]
    assert "Traceback" not in flood_log
    assert len(flood_log) < 4096, flood_log
    soft, hard = open_file_limits(agent.process.pid)
    assert soft == hard, f"the agent kept a soft limit of {soft} open files (hard: {hard})"
