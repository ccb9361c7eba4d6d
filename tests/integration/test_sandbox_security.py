"""What a job can and cannot reach from inside its sandbox, run for real as the service account.

Jobs run as the agent's own Unix account, so everything that account can read on the host is a
file the sandbox must keep out: the agent's state (database, policy copy, secrets), its local
queue socket and its home directory. Each test first shows that the account *can* reach the
thing on the host, so that a test passes only because the sandbox stops the job.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from conftest import (
    SERVICE_HOME,
    SERVICE_USER,
    AgentProcess,
    Cluster,
    RunnerSite,
    as_service_user,
    as_user,
    config_toml,
    job_toml,
    make_runner_site,
    policy_toml,
    user_workspace,
    wait_for,
    write_public_file,
    write_service_secret,
)

from sandbox.plan import APPTAINER_ADDED_ENV, DOCUMENTED_ENV

SECRET_NAME = "agent-token"

# Reports each path the job can read or list as "visible: PATH". The job's own workspace is
# probed too, directly and through /proc/self/root: both must be visible, which shows that the
# probe itself, and the way through /proc, work.
CONTROLS = ["/work/control.txt", "/proc/self/root/work/control.txt"]
PROBE_FUNCTION = """probe() {
    if cat "$1" >/dev/null 2>&1 || ls "$1" >/dev/null 2>&1; then echo "visible: $1"; fi
}
"""


def probe_script(paths: list[str], *, via_proc: list[str]) -> str:
    """A job script that probes ``paths`` directly and, through every process it can see,
    ``via_proc`` below ``/proc/PID/root`` and relative to ``/proc/PID/cwd``."""
    lines = [PROBE_FUNCTION, *(f"probe {path}" for path in CONTROLS)]
    lines += [f"probe {path}" for path in paths]
    lines.append("for pid in /proc/[0-9]*; do")
    for path in via_proc:
        lines.append(f'    probe "$pid/root{path}"')
    lines += ['    probe "$pid/cwd/state"', "done", "echo probe finished"]
    return "\n".join(lines) + "\n"


def visible_paths(output: str) -> list[str]:
    return re.findall(r"^visible: (.*)$", output, re.M)


@pytest.fixture
def root_marker() -> Iterator[Path]:
    """A file in root's home for the duration of a test (root's home must never reach a job)."""
    path = Path("/root") / f".hpc-runner-test-{secrets.token_hex(6)}"
    path.write_text("root's file\n")
    path.chmod(0o644)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture
def service_home_file() -> Iterator[Path]:
    """A file of the service account in its home for the duration of a test: the agent's own home
    (its git and shell configuration) must never reach a job. Made here, as setup.sh makes the
    home empty."""
    account = pwd.getpwnam(SERVICE_USER)
    path = SERVICE_HOME / f".hpc-runner-test-{secrets.token_hex(6)}"
    path.write_text("the service account's file\n")
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(0o644)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def write_secret(state_dir: Path) -> Path:
    """A secret file of the service account (0600) in its state dir, as the agent keeps them."""
    return write_service_secret(state_dir / SECRET_NAME, f"secret-{secrets.token_hex(8)}\n")


def create_private_state(site: RunnerSite) -> Path:
    """The state dir as the agent creates it (0700), holding a secret file; returns the secret."""
    account = pwd.getpwnam(SERVICE_USER)
    site.state_dir.mkdir(mode=0o700)
    os.chown(site.state_dir, account.pw_uid, account.pw_gid)
    return write_secret(site.state_dir)


def test_job_sees_neither_the_state_dir_nor_its_secrets_nor_the_host_homes(
    runner_site: RunnerSite, root_marker: Path, service_home_file: Path
) -> None:
    secret = create_private_state(runner_site)
    home_file = service_home_file
    host = as_service_user(["cat", secret, home_file])
    assert host.returncode == 0, f"the service account cannot read its own files on the host: {host.stderr}"
    write_public_file(runner_site.workspace / "control.txt", "readable\n")
    paths = [str(runner_site.state_dir), str(secret), str(SERVICE_HOME), str(home_file), str(root_marker)]
    script = probe_script(paths, via_proc=[str(secret), str(home_file)])
    job = runner_site.write_job("probe", job_toml("probe", script=script))

    result = runner_site.run(job)

    assert result.returncode == 0, result.stderr
    assert "probe finished" in result.stdout
    assert visible_paths(result.stdout) == CONTROLS
    assert secret.read_text().strip() not in result.stdout


def test_non_mpi_job_cannot_connect_to_a_server_on_the_host_loopback(
    runner_site: RunnerSite, cluster: Cluster
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        connect = ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"]
        host = as_service_user(connect)
        assert host.returncode == 0 and host.stdout == "connected\n", f"no server to reach: {host.stderr}"

        isolated = runner_site.run(runner_site.write_job("isolated", job_toml("isolated", command=connect)))

        # The same job under a grant with network = true: it connects, so the image's bash can.
        runner_site.write_policy(policy_toml(cluster.image_sha256, network=True))
        networked = runner_site.run(
            runner_site.write_job("networked", job_toml("networked", command=connect, network=True)))

    assert isolated.returncode == 1, isolated.stderr
    assert "connected" not in isolated.stdout
    assert f"/dev/tcp/127.0.0.1/{port}: " in isolated.stdout  # bash's own connect error
    assert networked.returncode == 0, networked.stderr
    assert networked.stdout == "connected\n"


def read_env_file(path: Path) -> dict[str, str]:
    """An `env -0` dump as a dict."""
    entries = [entry for entry in path.read_bytes().decode().split("\0") if entry]
    return dict(entry.split("=", 1) for entry in entries)


def undocumented(names: set[str], allowed: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names
                  if not any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in allowed))


# Set in the environment `hpc-runner run` starts with: none of it may reach a job.
LAUNCHER_CANARIES = {
    "HPC_RUNNER_TEST_CANARY": "from the launcher",
    "AWS_SECRET_ACCESS_KEY": "launcher-secret",
    "OMPI_MCA_test_canary": "1",
}
SPEC_ENV = {"JOB_SETTING": "42", "OTHER_SETTING": "a b"}


@pytest.mark.parametrize("mpi", [False, True], ids=["plain", "mpi"])
def test_environment_holds_only_the_documented_variables(runner_site: RunnerSite, mpi: bool) -> None:
    dump_env = "env -0 > /work/env-${OMPI_COMM_WORLD_RANK:-single}.bin"
    # MPI ranks run mpi-hello first: ranks that share namespaces (--sharens) must all have
    # started before the first one ends, and MPI_Init waits for every rank.
    command = ["/bin/sh", "-c", f"/usr/local/bin/mpi-hello && {dump_env}" if mpi else dump_env]
    job = runner_site.write_job(
        "env", job_toml("env", command=command, env=SPEC_ENV, mpi=mpi, tasks=2 if mpi else None))

    result = runner_site.run(job, env=LAUNCHER_CANARIES)

    assert result.returncode == 0, result.stderr
    dumps = sorted(runner_site.workspace.glob("env-*.bin"))
    assert [p.name for p in dumps] == (["env-0.bin", "env-1.bin"] if mpi else ["env-single.bin"])
    # MPI ranks also get their launcher's variables, carried in by the rank wrapper.
    allowed = (*DOCUMENTED_ENV, *APPTAINER_ADDED_ENV, *SPEC_ENV, *(("OMPI_*", "PMIX_*") if mpi else ()))
    for dump in dumps:
        env = read_env_file(dump)
        assert undocumented(set(env), allowed) == [], f"{dump.name}: {env}"
        for name, value in LAUNCHER_CANARIES.items():
            assert env.get(name) != value, f"{name} leaked from the launcher into the job"
        assert set(DOCUMENTED_ENV) <= set(env)
        assert {name: env[name] for name in SPEC_ENV} == SPEC_ENV
        assert env["HOME"] == "/tmp"
        assert env["TMPDIR"] == "/tmp"
        assert env["CI"] == "true"
        assert env["HPC_RUNNER_WORKSPACE"] == "/work"
        assert env["HPC_RUNNER_JOB_NAME"] == "env"
        assert env["HPC_RUNNER_ACCOUNT"] == "ci"
        assert env["HPC_RUNNER_TASKS"] == ("2" if mpi else "1")
        if mpi:
            assert env["OMPI_COMM_WORLD_SIZE"] == "2"


def test_shell_syntax_in_an_env_value_reaches_the_job_literally(runner_site: RunnerSite) -> None:
    token = secrets.token_hex(6)
    host_file = Path("/tmp") / f"pwned-{token}"
    value = (f"$(touch {host_file}) `touch /work/pwned-{token}` ${{HOME}} $PATH "
             f"'single' \"double\" \\back; touch /work/pwned2-{token}")
    script = 'printf "%s\\n" "$PROBE"\nls -A /tmp\n'
    job = runner_site.write_job("literal", job_toml("literal", script=script, env={"PROBE": value}))

    result = runner_site.run(job)

    assert result.returncode == 0, result.stderr
    printed, *listing = result.stdout.splitlines()
    assert printed == value
    assert not [name for name in listing if token in name], "the command ran inside the job's /tmp"
    assert not host_file.exists(), "the command in the value ran on the host"
    assert list(runner_site.workspace.glob("pwned*")) == []
    assert list(runner_site.work_root.glob(f"*/tmp/pwned-{token}")) == []


def test_workspace_holding_the_state_dir_is_refused_and_runs_nothing(runner_site: RunnerSite) -> None:
    create_private_state(runner_site)
    job = runner_site.write_job("too-wide", job_toml("too-wide", script="touch /work/ran.txt\n"))

    result = runner_site.run(job, workspace=runner_site.root)

    assert result.returncode == 126, result.stderr
    assert f"workspace {runner_site.root}" in result.stderr
    assert f"would expose {runner_site.state_dir} to the job" in result.stderr
    assert not (runner_site.root / "ran.txt").exists()


def run_refused_bind(site: RunnerSite, cluster: Cluster, name: str, bind: str,
                     *run_args: str) -> subprocess.CompletedProcess[str]:
    """Grant `bind` in the site's policy and run a job `name` that binds it, which must not run (it
    would leave ran.txt in the workspace); what `hpc-runner run` did."""
    site.write_policy(policy_toml(cluster.image_sha256, binds=[bind]))
    job = site.write_job(name, job_toml(name, script="touch /work/ran.txt\n", binds=[bind]))
    result = site.run(job, *run_args)
    assert not (site.workspace / "ran.txt").exists(), result.stderr
    return result


def test_policy_granting_a_bind_of_the_state_dir_is_refused_and_runs_nothing(
    runner_site: RunnerSite, cluster: Cluster
) -> None:
    bind = f"{runner_site.root}:/site:ro"

    result = run_refused_bind(runner_site, cluster, "binds-state", bind)

    assert result.returncode == 125, result.stderr
    assert f"bind '{bind}' contains {runner_site.state_dir}, the agent's state_dir" in result.stderr


def test_a_bind_others_could_swap_before_the_job_starts_is_refused_and_runs_nothing(
    runner_site: RunnerSite, cluster: Cluster
) -> None:
    """A directory above the bind that others can write lets them put a link to the state dir
    in its place between the checks and the moment Apptainer binds it."""
    shared = runner_site.root / "shared"
    (shared / "data").mkdir(parents=True)
    shared.chmod(0o777)
    bind = f"{shared / 'data'}:/data:ro"

    result = run_refused_bind(runner_site, cluster, "swappable", bind)

    assert result.returncode == 126, result.stderr
    assert f"bind {bind} refused: {shared} is writable by " in result.stderr


def test_bind_reaching_the_local_queue_socket_is_refused_and_runs_nothing(
    runner_site: RunnerSite, cluster: Cluster
) -> None:
    # A socket outside the state dir (one for every local user) must stay as far from jobs as
    # the state dir: a job that reached it would be taken for the agent's own user.
    run_dir = runner_site.root / "run"
    run_dir.mkdir()
    config = runner_site.root / "with-socket.toml"
    write_public_file(config, config_toml(runner_site.root, policy=runner_site.policy,
                                          socket=run_dir / "agent.sock"))
    bind = f"{run_dir}:/agent-run:ro"

    result = run_refused_bind(runner_site, cluster, "binds-socket", bind, "--config", os.fspath(config))

    assert result.returncode == 126, result.stderr
    assert f"bind {bind} refused" in result.stderr
    assert f"parent of the protected path {run_dir / 'agent.sock'}" in result.stderr


# -- through the agent -------------------------------------------------------------------------


@pytest.fixture
def shared_site(cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str]
                ) -> RunnerSite:
    """An agent site whose socket every local user can reach, with a grant for hpcr-alice."""
    service_tmp.chmod(0o755)  # other users reach their workspaces in it
    site = make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket)
    site.write_policy(policy_toml(cluster.image_sha256, principals=["local:user:hpcr-alice"]))
    return site


def submit_and_wait(site: RunnerSite, user: str, workspace: Path, job: str, timeout: float = 60.0
                    ) -> tuple[str, Mapping[str, object]]:
    """Submit ``job`` (TOML text) as ``user``; wait until it ends; return its log and status."""
    job_file = workspace / "job.toml"
    write_public_file(job_file, job)
    submitted = as_user(user, ["hpc-runner", "submit", job_file, "--config", site.config], cwd=workspace)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[-1]

    def final() -> Mapping[str, object] | None:
        status = as_user(user, ["hpc-runner", "status", job_id, "--json", "--config", site.config],
                         cwd=workspace)
        assert status.returncode == 0, status.stderr
        record: Mapping[str, object] = json.loads(status.stdout)[0]
        return record if record["state"] not in ("queued", "running") else None

    record = wait_for(final, timeout, interval=0.2, what=f"job {job_id} to end")
    logs = as_user(user, ["hpc-runner", "logs", job_id, "--config", site.config], cwd=workspace)
    assert logs.returncode == 0, logs.stderr
    return logs.stdout, record


def test_job_through_the_agent_sees_neither_its_state_nor_its_socket_nor_its_home(
    shared_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess], root_marker: Path,
    service_home_file: Path
) -> None:
    agent = agents(shared_site)
    secret = write_secret(shared_site.state_dir)  # the running agent created the dir
    host = as_service_user(["cat", secret])
    assert host.returncode == 0, host.stderr
    workspace = user_workspace(shared_site.root, "hpcr-alice")
    write_public_file(workspace / "control.txt", "readable\n")
    paths = [str(shared_site.state_dir), str(secret), str(shared_site.socket), str(shared_site.socket.parent),
             str(SERVICE_HOME), str(service_home_file), str(root_marker)]
    script = probe_script(paths, via_proc=[str(secret), str(shared_site.socket)])
    script += "env -0 > /work/env.bin\n"

    log, record = submit_and_wait(shared_site, "hpcr-alice", workspace, job_toml("probe", script=script))

    assert record["state"] == "succeeded", log
    assert "probe finished" in log
    assert visible_paths(log) == CONTROLS
    job_env = read_env_file(workspace / "env.bin")
    assert undocumented(set(job_env), (*DOCUMENTED_ENV, *APPTAINER_ADDED_ENV)) == []
    assert agent.process.poll() is None


# Jobs run as the agent's own Unix account and kill(2) compares the kernel's uids whatever
# the user namespace: only the job's own PID namespace keeps it from signalling the agent.
def test_job_cannot_signal_the_agent(
    shared_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess]
) -> None:
    agent = agents(shared_site)
    workspace = user_workspace(shared_site.root, "hpcr-alice")
    script = f"if kill -0 {agent.process.pid}; then echo signalled; fi\n"

    log, record = submit_and_wait(shared_site, "hpcr-alice", workspace, job_toml("signal", script=script))

    assert record["state"] == "succeeded", log
    assert "signalled" not in log

