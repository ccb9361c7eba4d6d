"""API jobs through faults, as their submitters see them: `hpc-runner remote` run as a process of
its own, a cancel through the API, the hub or the agent SIGKILLed while a job runs and started
again, a token the hub trusts but the agent does not, and the hub's hooks across a restart of it.

Every component is real and a process of its own, as in `test_api_agent`: the hub (from this
checkout, as root), the agent (installed, as the service account) with its jobs going through
Slurm and Apptainer, `hpc-runner remote`; only the OIDC issuer and the hook's receiver run in this
process, on an event loop of their own thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import TEST_IMAGE_NAME, AgentProcess, Cluster, RunnerSite, job_toml, wait_for

from integration.test_agent_slurm import squeue_lists
from integration.test_api_agent import (
    CLUSTER,
    JOB,
    REPOSITORY,
    TERMINAL,
    IssuerThread,
    api_site,
    call,
    ended,
    hub_site,
    published_repository,
    start_hub,
    submit,
)
from integration.test_gateway import REPO_ROOT, GatewayProcess, Site, write_secret

# 60 numbered lines over some 15 s: long enough to kill a process while the job writes them.
LINES = "".join(f"line {number}\n" for number in range(1, 61)).encode()
LINES_JOB = {**JOB, "script": "for i in $(seq 1 60); do echo line $i; sleep 0.25; done\n"}
SLEEPING_JOB = {**JOB, "script": "echo sleeping\nsleep 300\n",
                "resources": {"time": "2m", "cpus_per_task": 1}}
# Long enough for a job through Slurm after its agent or the hub came back.
WAIT_S = 60.0
# What `remote` sees of the environment: no CI system's variables, so the token file is the token.
REMOTE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
HOOK_SECRET = "hook-secret-0123456789abcdef"


@dataclass
class Hub:
    """`hpc-runner hub` serving the jobs API to tokens of `issuer`, which a test may SIGKILL and
    start again on the same config, state directory and port."""

    site: Site
    issuer: IssuerThread
    logs: Path
    process: GatewayProcess | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        self.process = start_hub(self.site, self.logs / f"hub-{self.starts}.log", self.issuer)

    def kill(self) -> None:
        assert self.process is not None
        self.process.proc.send_signal(signal.SIGKILL)
        assert self.process.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()

    def log_text(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.logs.glob("hub-*.log")))

    def view(self, job_id: str, token: str) -> dict[str, Any]:
        status, body = call(self.site, "GET", f"/api/v1/jobs/{job_id}", token)
        assert status == 200, body
        found: dict[str, Any] = json.loads(body)
        return found

    def job_log(self, job_id: str, token: str) -> bytes:
        status, body = call(self.site, "GET", f"/api/v1/jobs/{job_id}/log", token)
        assert status == 200, body
        return body


@pytest.fixture
def hub(tmp_path: Path, unused_tcp_port: int) -> Iterator[Hub]:
    """A hub and its issuer; not started, so that a test may add to its config first."""
    with contextlib.closing(IssuerThread()) as issuer:
        found = Hub(hub_site(tmp_path / "hub", unused_tcp_port, issuer), issuer, tmp_path)
        try:
            yield found
        finally:
            found.stop()


@dataclass
class Served:
    """An agent on the cluster leasing the hub's jobs, and a token of the repository it grants."""

    site: RunnerSite
    agent: AgentProcess
    token: str
    commit: str


def serve(cluster: Cluster, root: Path, hub: Hub, socket: Path, agents: Callable[[RunnerSite], AgentProcess],
          *, trusting: IssuerThread | None = None) -> Served:
    """An agent for the hub's jobs (trusting `trusting`'s tokens, by default the hub's issuer's)."""
    _, commit = published_repository(root)
    site = api_site(cluster, root, hub.site, trusting or hub.issuer, socket=socket)
    return Served(site, agents(site), hub.issuer.token(REPOSITORY, commit), commit)


@contextlib.contextmanager
def explained(hub: Hub, agent: Callable[[], AgentProcess]) -> Iterator[None]:
    """A failed assertion within, told with the ends of the hub's and the agent's logs."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- the hub's log:\n{hub.log_text()[-8000:]}\n"
                             f"--- the agent's log:\n{agent().log()[-8000:]}") from None


def job_log_file(site: RunnerSite) -> Path:
    """The log file in the agent's directory of its one job."""
    [found] = site.work_root.glob("*/output.log")
    return found


def wait_for_log(hub: Hub, job_id: str, token: str, text: bytes) -> bytes:
    return wait_for(lambda: (log if text in (log := hub.job_log(job_id, token)) else None), WAIT_S,
                    interval=0.2, what=f"the hub's log of job {job_id} to hold {text!r}")


def wait_for_state(hub: Hub, job_id: str, token: str, state: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        view = hub.view(job_id, token)
        assert view["state"] == state or view["state"] not in TERMINAL, view
        return view if view["state"] == state else None

    found: dict[str, Any] = wait_for(reached, WAIT_S, interval=0.2, what=f"job {job_id} to be {state}")
    return found


def remote_argv(*args: str, token_file: Path) -> list[str]:
    """`hpc-runner remote ARGS --token-file F`, run from this checkout as the hub is."""
    return [sys.executable, "-m", "runner", "remote", *args, "--token-file", str(token_file)]


def remote(*args: str, token_file: Path, timeout: float = 180.0) -> subprocess.CompletedProcess[bytes]:
    """`hpc-runner remote ARGS --token-file F` as a process of its own, until it exits."""
    return subprocess.run(remote_argv(*args, token_file=token_file), cwd=REPO_ROOT, env=REMOTE_ENV,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def submitted_id(stderr: bytes) -> str:
    match = re.search(rb"^hpc-runner: job (\S+) queued: ", stderr, re.MULTILINE)
    assert match, stderr
    return match.group(1).decode()


# --- hpc-runner remote ---

def test_remote_run_prints_the_hubs_log_and_exits_as_the_job_or_126_with_each_reason_of_a_denial(
        cluster: Cluster, service_tmp: Path, tmp_path: Path, hub: Hub, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    hub.start()
    served = serve(cluster, service_tmp, hub, shared_socket, agents)
    job_file = tmp_path / "job.toml"
    job_file.write_text(job_toml("unit", image=TEST_IMAGE_NAME, time="1m",
                                 script="cat data.txt\necho to stderr >&2\necho last words\nexit 3\n"))
    granted, elsewhere = tmp_path / "granted-token", tmp_path / "elsewhere-token"
    write_secret(granted, served.token + "\n")
    write_secret(elsewhere, hub.issuer.token("octo-org/elsewhere", served.commit) + "\n")
    run = ["run", str(job_file), "--hub", hub.site.url, "--cluster", CLUSTER]

    with explained(hub, lambda: served.agent):
        result = remote(*run, token_file=granted)
        job_id = submitted_id(result.stderr)
        denial = remote(*run, token_file=elsewhere)
        denied_id = submitted_id(denial.stderr)

    assert result.returncode == 3, result.stderr
    log = hub.job_log(job_id, served.token)
    assert result.stdout == log
    assert all(line in log for line in (b"from the repository\n", b"to stderr\n", b"last words\n"))
    # Byte-exact: the hub holds the job's log as the agent's job directory does.
    assert log in [path.read_bytes() for path in served.site.work_root.glob("*/output.log")]
    assert f"hpc-runner: job {job_id} failed (exit status 3)".encode() in result.stderr
    assert served.token.encode() not in result.stdout + result.stderr

    denied = hub.view(denied_id, hub.issuer.token("octo-org/elsewhere", served.commit))
    assert denial.returncode == 126, denial.stderr
    assert denied["state"] == "denied" and denied["reasons"]
    for reason in denied["reasons"]:
        assert f"hpc-runner: denied: {reason}\n".encode() in denial.stderr
    assert b"hpc-runner: denied by policy:\n" in denial.stdout


def test_a_running_job_cancelled_through_the_api_ends_cancelled_and_leaves_slurm(
        cluster: Cluster, service_tmp: Path, tmp_path: Path, hub: Hub, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    hub.start()
    served = serve(cluster, service_tmp, hub, shared_socket, agents)
    token_file = tmp_path / "token"
    write_secret(token_file, served.token + "\n")
    job_id = submit(hub.site, served.token, {"job": SLEEPING_JOB, "cluster": CLUSTER})

    with explained(hub, lambda: served.agent):
        wait_for_state(hub, job_id, served.token, "running")
        record_id = job_log_file(served.site).parent.name
        assert squeue_lists(record_id)
        asked_at = time.monotonic()
        cancel = remote("cancel", job_id, "--hub", hub.site.url, token_file=token_file, timeout=60)
        assert cancel.returncode == 0, cancel.stderr
        assert f"hpc-runner: job {job_id} cancel requested (running)".encode() in cancel.stderr
        view = ended(hub.site, job_id, served.token)
        wait_for(lambda: not squeue_lists(record_id), 30, interval=0.2,
                 what=f"squeue to drop hpcr-{record_id}")
    took = time.monotonic() - asked_at

    assert view["state"] == "cancelled", view
    log = hub.job_log(job_id, served.token)
    assert b"sleeping\n" in log and b"hpc-runner: cancelled through the hub's API\n" in log
    # The agent asks every 5 s; Slurm's KillWait is 10 s.
    assert took < 30, took


# --- a process SIGKILLed while the job runs ---

def test_a_hub_sigkilled_while_a_job_runs_ends_up_with_its_whole_log_byte_exact(
        cluster: Cluster, service_tmp: Path, tmp_path: Path, hub: Hub, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    hub.start()
    served = serve(cluster, service_tmp, hub, shared_socket, agents)
    token_file = tmp_path / "token"
    write_secret(token_file, served.token + "\n")
    job_id = submit(hub.site, served.token, {"job": LINES_JOB, "cluster": CLUSTER})
    # Someone following the log meanwhile reads on from where the dead hub left off.
    follower = subprocess.Popen(remote_argv("logs", job_id, "--follow", "--hub", hub.site.url,
                                            token_file=token_file),
                                cwd=REPO_ROOT, env=REMOTE_ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with explained(hub, lambda: served.agent):
            before = wait_for_log(hub, job_id, served.token, b"line 3\n")
            hub.kill()
            assert b"line 60\n" not in job_log_file(served.site).read_bytes(), "the job ended before the kill"
            hub.start()
            view = ended(hub.site, job_id, served.token)
            followed, complaints = follower.communicate(timeout=WAIT_S)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)

    assert (view["state"], view["exit_status"]) == ("succeeded", 0), view
    log = hub.job_log(job_id, served.token)
    assert log.startswith(before) and LINES in log
    assert log == job_log_file(served.site).read_bytes()
    assert (follower.returncode, followed) == (0, log), complaints


def test_an_agent_sigkilled_while_a_job_runs_carries_on_when_started_again(
        cluster: Cluster, service_tmp: Path, hub: Hub, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    hub.start()
    served = serve(cluster, service_tmp, hub, shared_socket, agents)
    job_id = submit(hub.site, served.token, {"job": LINES_JOB, "cluster": CLUSTER})
    current = [served.agent]

    with explained(hub, lambda: current[-1]):
        wait_for_log(hub, job_id, served.token, b"line 3\n")
        served.agent.send(signal.SIGKILL)
        assert served.agent.wait_exit(10) == -signal.SIGKILL
        assert b"line 60\n" not in job_log_file(served.site).read_bytes(), "the job ended before the kill"
        current.append(agents(served.site))
        view = ended(hub.site, job_id, served.token)

    assert (view["state"], view["exit_status"]) == ("succeeded", 0), view
    assert "carrying on with an API job after a restart" in current[-1].log()
    log = hub.job_log(job_id, served.token)
    assert LINES in log
    assert log == job_log_file(served.site).read_bytes()


# --- trust ---

def test_a_token_the_hub_trusts_and_the_agent_does_not_is_denied_and_never_reaches_slurm(
        cluster: Cluster, service_tmp: Path, hub: Hub, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    hub.start()
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    with contextlib.closing(IssuerThread()) as other:
        served = serve(cluster, service_tmp, hub, shared_socket, agents, trusting=other)
        job_id = submit(hub.site, served.token, {"job": JOB, "cluster": CLUSTER})
        with explained(hub, lambda: served.agent):
            view = ended(hub.site, job_id, served.token)

    assert view["state"] == "denied", view
    [reason] = view["reasons"]
    assert reason.startswith("this agent does not accept the job's token: "), reason
    assert hub.job_log(job_id, served.token) == f"hpc-runner: refused: {reason}\n".encode()
    # Nothing of it was made on the cluster: no job directory, nothing in Slurm.
    assert not served.site.work_root.exists() or not any(served.site.work_root.iterdir())
    queued = subprocess.run(["squeue", "-h", "-o", "%k"], capture_output=True, text=True, timeout=30,
                            check=True)
    assert job_id not in queued.stdout
    accounted = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-S", started, "-o", "JobName,WorkDir"],
                               capture_output=True, text=True, timeout=30, check=True)
    assert str(served.site.root) not in accounted.stdout


# --- hooks ---

@dataclass
class HookReceiver:
    """A hook's receiver on 127.0.0.1: takes every POST (204) and keeps its headers (their names in
    lower case) and its raw body."""

    url: str = ""
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._take)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _take(self, request: web.Request) -> web.Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.deliveries.append((headers, await request.read()))
        return web.Response(status=204)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for _, raw in list(self.deliveries)]


def distinct(states: list[str]) -> list[str]:
    """`states` with each run of one state told once (a delivery repeated after a crash)."""
    return [state for index, state in enumerate(states) if index == 0 or states[index - 1] != state]


def test_a_hook_receiver_gets_every_state_of_a_job_in_order_signed_across_a_hub_sigkill(
        cluster: Cluster, service_tmp: Path, hub: Hub, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    receiver = HookReceiver()
    hub.issuer.run(receiver.start())
    try:
        secret_file = hub.site.root / "hook-secret"
        write_secret(secret_file, HOOK_SECRET + "\n")
        with hub.site.config.open("a") as config:
            config.write(f'\n[[hooks]]\nurl = "{receiver.url}"\nsecret_file = "{secret_file}"\n')
        hub.start()
        served = serve(cluster, service_tmp, hub, shared_socket, agents)
        job_id = submit(hub.site, served.token, {"job": LINES_JOB, "cluster": CLUSTER})

        with explained(hub, lambda: served.agent):
            wait_for_state(hub, job_id, served.token, "running")
            hub.kill()
            hub.start()
            view = ended(hub.site, job_id, served.token)
            wait_for(lambda: any(body["job"]["state"] == "succeeded" for body in receiver.bodies()), 30,
                     interval=0.2, what="the receiver to get the job's end")
    finally:
        hub.issuer.run(receiver.close())

    assert view["state"] == "succeeded", view
    bodies = receiver.bodies()
    assert all((body["event"], body["job"]["id"]) == ("job.state", job_id) for body in bodies), bodies
    states = [body["job"]["state"] for body in bodies]
    assert distinct(states) == ["queued", "pending", "running", "succeeded"], states
    # The last delivery is the job as it ended; each is signed over the bytes sent, as GitHub signs.
    assert bodies[-1]["job"] == view
    for headers, raw in receiver.deliveries:
        expected = "sha256=" + hmac.new(HOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert headers["x-hpc-runner-signature-256"] == expected
        assert headers["x-hpc-runner-event"] == "job.state"
