"""The agent and the hub as deploy/systemd installs them: hardened systemd units, sandboxed jobs.

A Debian bookworm root with systemd (built with debootstrap once, cached under
/var/cache/hpc-runner-dev) boots in systemd-nspawn with a throwaway overlay over it. The
installed venv, Apptainer and the test image are bound in read-only, /dev/fuse read-write; the
repository's unit, sysusers.d and tmpfiles.d files are installed as a package would install
them. Commands run inside the container through nsenter, as its root, who submits through the
local queue's socket in /run/hpc-runner.

A second container is a login node of this machine's Slurm cluster: its agent submits to the
host's slurmctld (the cluster's config, the munge socket and the node names bound in), the host's
slurmd runs the jobs in a work_root bound at the same path on both sides, and the service account
has the host's uid and gid, as a cluster's accounts are the same on every node.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    TEST_IMAGE,
    TEST_IMAGE_NAME,
    VENV,
    Cluster,
    _cluster_required,
    image_table,
    job_toml,
    policy_document,
    slurm_job_fields,
    toml_table,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
CACHE = Path("/var/cache/hpc-runner-dev")
ROOT_SUITE = "bookworm"
# systemd boots it; python3 runs the venv (whose home is /usr/bin); procps has /bin/kill for
# ExecReload; openmpi-bin is the host MPI that MPI jobs bind (the host's own version: both are
# bookworm); slurm-client has the commands the Slurm executor runs (sbatch, squeue, scancel: the
# host's own version, setup.sh installs bookworm's Slurm too); the rest is what Apptainer runs or
# loads (the dependencies of its package).
ROOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "openmpi-bin", "slurm-client",
                 "squashfuse", "fuse3", "fuse2fs", "squashfs-tools", "uidmap", "libseccomp2", "libsqlite3-0",
                 "ca-certificates")
ROOT = CACHE / f"systemd-root-{ROOT_SUITE}"
ROOT_STAMP = ROOT.with_name(ROOT.name + ".packages")
DEBIAN_MIRROR = os.environ.get("HPC_RUNNER_DEBIAN_MIRROR", "http://deb.debian.org/debian")  # as setup.sh
# Apptainer as deploy/dev/setup.sh installs it (sid's package unpacked into /, its binaries
# patched to load sid's glibc from a private prefix): what the container binds from the host.
APPTAINER_PATHS = ("/usr/bin/apptainer", "/usr/lib/x86_64-linux-gnu/apptainer", "/etc/apptainer",
                   "/opt/hpc-runner-deps")
AGENT = "hpc-runner-agent.service"
HUB = "hpc-runner-hub.service"
CONFIG = Path("/etc/hpc-runner/agent.toml")
WORK_ROOT = Path("/var/lib/hpc-runner/work")
# The Slurm login node's work_root: a host directory (made and removed by the test) bound at the
# same path, as a shared file system is mounted on login and compute nodes alike. Not under /tmp
# or /var/tmp, which the unit makes private (PrivateTmp=): slurmd would not see the jobs' files.
SLURM_WORK_PARENT = Path("/srv/hpc-runner-systemd-tests")
# What a login node of the host's cluster has of it: its config, munged's socket (the host's
# munged vouches for the container's users: they are the host's uids), and the names of its nodes.
SLURM_BINDS = ("/etc/slurm", "/run/munge", "/etc/hosts")
# The Slurm account the policy charges jobs to: one of the service account's associations that is
# not its default, so that sacct showing it shows the policy's choice.
SLURM_ACCOUNT = "esm"
SUBMITTED = re.compile(r"hpc-runner: submitted to Slurm as job ([0-9]+) \(hpcr-([0-9a-z]+)\)")
# Where jobs are submitted from: a project in a home directory, as users have them.
PROJECT = Path("/home/ci/project")
BOOT_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 60.0
# A Slurm job may also wait for the one-node cluster's CPUs (as in test_agent_slurm.py).
SLURM_JOB_TIMEOUT_S = 150.0
# A job that waits (at most its walltime) until its workspace holds the file `go`.
WAITING_SCRIPT = "echo waiting\nwhile [ ! -e /work/go ]; do sleep 0.1; done\necho released\n"


def _nspawn() -> str:
    path = shutil.which("systemd-nspawn")
    if path is None:
        message = "systemd-nspawn not found (package systemd-container; deploy/dev/setup.sh installs it)"
        if _cluster_required():
            pytest.fail(message + " (CI and HPC_RUNNER_TEST_CLUSTER forbid skipping)", pytrace=False)
        pytest.skip(message)
    return path


def build_root() -> None:
    """The cached root, debootstrapped again when its recipe (the package list and what is added
    after) changed. A lock keeps two test runs from building at once; the root appears under its
    name only when complete."""
    CACHE.mkdir(mode=0o755, exist_ok=True)
    wanted = ",".join(ROOT_PACKAGES)
    recipe = f"{wanted}; apptainer mount points; /etc/hosts; munge masked"
    with open(CACHE / "systemd-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOT.is_dir() and ROOT_STAMP.is_file() and ROOT_STAMP.read_text().strip() == recipe:
            return
        debs = CACHE / "debootstrap-debs"
        debs.mkdir(mode=0o755, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix="systemd-root.", dir=CACHE))
        try:
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={wanted}", f"--cache-dir={debs}",
                 ROOT_SUITE, build / "root", DEBIAN_MIRROR],
                capture_output=True, text=True, timeout=900, check=False)
            assert result.returncode == 0, \
                f"debootstrap failed: {result.stdout[-3000:]}{result.stderr[-2000:]}"
            # Apptainer's mount points, made by its package on a host (dpkg-deb -x leaves them out
            # when only its binaries are bound in).
            for directory in ("session", "source"):
                (build / "root" / "var/lib/apptainer/mnt" / directory).mkdir(parents=True, exist_ok=True)
            # debootstrap writes none, and Apptainer binds it into every container (apptainer.conf).
            (build / "root" / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
            # slurm-client brings munge along. A login node's munged would replace the host's socket
            # in the bound /run/munge with one of its own key: the host's munged serves it instead.
            (build / "root" / "etc/systemd/system/munge.service").symlink_to("/dev/null")
            shutil.rmtree(ROOT, ignore_errors=True)
            ROOT_STAMP.unlink(missing_ok=True)
            (build / "root").rename(ROOT)
            ROOT_STAMP.write_text(recipe + "\n")
        finally:
            shutil.rmtree(build, ignore_errors=True)


@dataclass
class Machine:
    """A booted container: `run` executes a command inside it, `root` is its file system as seen
    from the host, `etc` the host directory bound read-only at /etc/hpc-runner."""

    process: subprocess.Popen[bytes]
    leader: int
    etc: Path
    log: Path

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.leader}/root")

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--",
                                 *argv], capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, \
                f"{argv} exited {result.returncode}: {result.stdout}{result.stderr}"
        return result

    def hpc_runner(self, *args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", 'cd "$0" && exec "$@"', str(cwd), f"{VENV}/bin/hpc-runner", *args,
                        "--config", str(CONFIG), check=False)

    def unit(self, *properties: str, unit: str = AGENT) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={name}" for name in properties)).stdout
        return {name: value for name, _, value in (line.partition("=") for line in out.splitlines())}

    def journal(self, unit: str = AGENT) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def submit(self, text: str, *, expect: int = 0) -> str:
        (self.root / PROJECT.relative_to("/") / "job.toml").write_text(text)
        result = self.hpc_runner("submit", "job.toml")
        assert result.returncode == expect, \
            f"submit exited {result.returncode}: {result.stdout}{result.stderr}"
        return result.stdout.strip().splitlines()[-1]

    def status(self, job_id: str) -> dict[str, str]:
        result = self.hpc_runner("status", job_id, "--json")
        assert result.returncode == 0, result.stderr
        record: dict[str, str] = json.loads(result.stdout)[0]
        return record

    def wait_state(self, job_id: str, *states: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        def reached() -> dict[str, str] | None:
            record = self.status(job_id)
            return record if record["state"] in states else None

        return wait_for(reached, timeout, interval=0.2, what=f"job {job_id} to be {states}")

    def start_agent(self) -> None:
        self.run("systemctl", "start", AGENT)
        wait_for(lambda: (self.root / "run/hpc-runner/agent.sock").is_socket(), 20.0,
                 what="the agent's local queue socket")

    def stopped(self, unit: str = AGENT) -> dict[str, str] | None:
        shown = self.unit("ActiveState", "Result", "ExecMainStatus", unit=unit)
        return shown if shown["ActiveState"] in ("inactive", "failed") else None


def write_policy(etc: Path, image_sha256: str, *, principal: str, slurm_account: str = "ci",
                 partition: str = "local") -> None:
    etc.joinpath("policy.toml").write_text(policy_document(
        toml_table("[accounts.ci]", slurm_account=slurm_account, partitions=[partition], max_time="10m"),
        image_table("/var/cache/hpc-runner-dev/images/hpc-runner-test.sif", image_sha256),
        toml_table("[[grants]]", name="ci-jobs", principals=[principal], account="ci",
                   images=[TEST_IMAGE_NAME], mpi=True)))


def write_agent_config(etc: Path, *, executor: str, work_root: Path, sections: str = "") -> None:
    """The agent's config as an admin writes it: the paths of the tmpfiles.d file (but work_root)."""
    etc.joinpath("agent.toml").write_text(
        'state_dir = "/var/lib/hpc-runner/state"\n'
        f'work_root = "{work_root}"\n'
        'policy = "/etc/hpc-runner/policy.toml"\n'
        f'executor = "{executor}"\n'
        "max_jobs = 2\n"
        'socket = "/run/hpc-runner/agent.sock"\n'
        "\n[sandbox]\n"
        'apptainer = "/usr/bin/apptainer"\n'
        'grace_period = "2s"\n'
        "\n[mpi]\n"
        'implementation = "openmpi"\n' + sections)


@contextlib.contextmanager
def booted(name: str, etc: Path, binds: Sequence[str] = (),
           account: pwd.struct_passwd | None = None) -> Iterator[Machine]:
    """The cached root booted as machine `name`, with `etc` at /etc/hpc-runner and `binds`
    (systemd-nspawn options) besides what every job needs; powered off at the end.

    The units are installed, then the sysusers.d and tmpfiles.d files are, and applied, as a
    package's scripts do on a running system. With `account`, the service account exists before
    (with that account's uid and gid, as a site's directory service has it): sysusers.d leaves it.
    """
    nspawn = _nspawn()
    build_root()
    log = etc.parent / f"{name}.log"
    common = [f"--bind-ro={path}" for path in (VENV.parent, TEST_IMAGE.parent, *APPTAINER_PATHS)]
    installs = [f"--bind-ro={UNITS / AGENT}:/etc/systemd/system/{AGENT}",
                f"--bind-ro={UNITS / HUB}:/etc/systemd/system/{HUB}",
                f"--bind-ro={etc}:/etc/hpc-runner"]
    with open(log, "wb") as output:
        # --volatile=overlay: writes go to a tmpfs over the cached root, gone at power-off.
        process = subprocess.Popen(
            [nspawn, "--quiet", "-D", str(ROOT), "--volatile=overlay", "-b", "--register=no",
             "--keep-unit", "--console=pipe", f"--machine={name}", "--bind=/dev/fuse",
             *common, *binds, *installs],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        leader = wait_for(lambda: _container_init(process.pid), BOOT_TIMEOUT_S,
                          what="systemd-nspawn's container to start")
        machine = Machine(process, leader, etc, log)
        wait_for(lambda: machine.run("systemctl", "is-system-running", check=False).stdout.strip()
                 in ("running", "degraded"), BOOT_TIMEOUT_S, interval=0.5, what="the container to boot")
        if account is not None:
            group = machine.run("getent", "group", str(account.pw_gid), check=False).stdout
            assert not group, f"gid {account.pw_gid} is taken in the container: {group}"
            machine.run("groupadd", "--system", "--gid", str(account.pw_gid), account.pw_name)
            machine.run("useradd", "--system", "--uid", str(account.pw_uid), "--gid", str(account.pw_gid),
                        "--home-dir", "/var/lib/hpc-runner", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", account.pw_name)
        for name, directory in (("hpc-runner.sysusers.conf", "sysusers.d"),
                                ("hpc-runner.tmpfiles.conf", "tmpfiles.d")):
            (machine.root / "etc" / directory).mkdir(mode=0o755, exist_ok=True)
            shutil.copyfile(UNITS / name, machine.root / "etc" / directory / "hpc-runner.conf")
        machine.run("systemd-sysusers")
        machine.run("systemd-tmpfiles", "--create", "hpc-runner.conf")
        machine.run("systemctl", "daemon-reload")
        project = machine.root / PROJECT.relative_to("/")
        project.mkdir(parents=True)
        project.chmod(0o777)  # jobs run as the service account: results go back into it
        yield machine
    except Exception:  # the boot's console says why the container did not come up
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        process.terminate()  # systemd-nspawn powers the container off
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def machine(cluster: Cluster) -> Iterator[Machine]:
    """A node that runs jobs itself (the local executor)."""
    with tempfile.TemporaryDirectory(prefix="hpc-runner-systemd.") as tmp:
        etc = Path(tmp) / "etc"
        etc.mkdir()
        write_agent_config(etc, executor="local", work_root=WORK_ROOT)
        write_policy(etc, cluster.image_sha256, principal="local:user:root")
        etc.chmod(0o755)
        with booted("hpc-runner-systemd-test", etc) as machine:
            yield machine


@dataclass
class LoginNode:
    """A booted login node of the host's Slurm cluster, and its work_root (the same path on the host)."""

    machine: Machine
    work_root: Path


@pytest.fixture
def login_node(cluster: Cluster) -> Iterator[LoginNode]:
    """A node whose agent submits to the host's Slurm cluster (the Slurm executor)."""
    account = pwd.getpwnam(SERVICE_USER)  # the host's service account, which Slurm's accounting knows
    SLURM_WORK_PARENT.mkdir(mode=0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hpc-runner-systemd-slurm.") as tmp, \
            tempfile.TemporaryDirectory(prefix="login-node.", dir=SLURM_WORK_PARENT) as shared:
        Path(shared).chmod(0o755)
        work_root = Path(shared) / "work"
        work_root.mkdir(mode=0o700)
        os.chown(work_root, account.pw_uid, account.pw_gid)
        etc = Path(tmp) / "etc"
        etc.mkdir()
        write_agent_config(etc, executor="slurm", work_root=work_root,
                           sections='\n[slurm]\npoll_interval = "1s"\n')
        write_policy(etc, cluster.image_sha256, principal="local:user:root", slurm_account=SLURM_ACCOUNT,
                     partition=cluster.default_partition)
        etc.chmod(0o755)
        binds = [*(f"--bind-ro={path}" for path in SLURM_BINDS), f"--bind={work_root}"]
        with booted("hpc-runner-systemd-slurm-test", etc, binds, account) as machine:
            yield LoginNode(machine, work_root)


def _container_init(nspawn_pid: int) -> int | None:
    """The container's systemd, a child of systemd-nspawn, once it has exec'd."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except FileNotFoundError:
        raise AssertionError("systemd-nspawn exited") from None
    for pid in children:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        except FileNotFoundError:
            continue
    return None


def test_the_hardened_agent_unit_runs_sandboxed_jobs_reloads_its_policy_and_drains_on_stop(
        machine: Machine, cluster: Cluster) -> None:
    machine.start_agent()
    assert machine.unit("ActiveState")["ActiveState"] == "active"
    # The tmpfiles.d entries made the service account's private directories.
    for path in ("var/lib/hpc-runner", "var/lib/hpc-runner/state", "var/lib/hpc-runner/work"):
        assert (machine.root / path).stat().st_mode & 0o777 == 0o700, path

    job_id = machine.submit(job_toml("hello", script=(
        "cat /etc/debian_version; id -un; echo computed > /work/result.txt\n"
        "grep -E '^(NoNewPrivs|CapBnd):' /proc/self/status\n")))
    record = machine.wait_state(job_id, "succeeded", "failed", "denied", "infra_failed")
    logs = machine.hpc_runner("logs", job_id).stdout
    assert record["state"] == "succeeded", (record, logs, machine.journal()[-3000:])
    # Apptainer ran unprivileged under the unit: as the account, without capabilities or a way to gain any.
    assert "hpcrunner\n" in logs and "NoNewPrivs:\t1" in logs and "CapBnd:\t0000000000000000" in logs, logs
    # What the job wrote is back in the submitted directory, in the submitter's home.
    result = machine.root / PROJECT.relative_to("/") / "result.txt"
    assert result.read_text() == "computed\n"
    # It belongs to the service account: its submitter reads it only if the unit's umask lets all read.
    assert result.stat().st_mode & 0o777 == 0o644, oct(result.stat().st_mode)

    # An MPI job: the host's Open MPI launches the ranks, each in its sandbox, bound to that MPI.
    mpi_job = machine.submit(job_toml("mpi", command=["/usr/local/bin/mpi-hello"], tasks=2, mpi=True))
    record = machine.wait_state(mpi_job, "succeeded", "failed", "denied", "infra_failed")
    logs = machine.hpc_runner("logs", mpi_job).stdout
    assert record["state"] == "succeeded", (record, logs)
    lines = logs.splitlines()
    assert sorted(line for line in lines if line.startswith("rank ")) == ["rank 0 of 2", "rank 1 of 2"], logs
    assert "allreduce sum 3" in lines, logs

    # Reload: a policy without the submitter's grant now refuses what it ran a moment ago.
    write_policy(machine.etc, cluster.image_sha256, principal="local:user:nobody-here")
    machine.run("systemctl", "reload", AGENT)
    wait_for(lambda: machine.journal().count('"policy reloaded"') == 1, 20.0,
             what="the agent to log its reload")
    denied = machine.submit(job_toml("after-reload", script="true\n"), expect=126)
    assert machine.status(denied)["state"] == "denied"
    write_policy(machine.etc, cluster.image_sha256, principal="local:user:root")
    machine.run("systemctl", "reload", AGENT)
    wait_for(lambda: machine.journal().count('"policy reloaded"') == 2, 20.0, what="the second reload")

    # Stop drains: the running job is left to finish (systemd signals the agent alone), then the
    # agent exits 0.
    long_job = machine.submit(job_toml("drained", script=WAITING_SCRIPT, time="5m"))
    machine.wait_state(long_job, "running")
    wait_for(lambda: "waiting" in machine.hpc_runner("logs", long_job).stdout, JOB_TIMEOUT_S,
             what="the job to start waiting")
    machine.run("systemctl", "stop", "--no-block", AGENT)
    wait_for(lambda: "draining: no new jobs" in machine.journal(), 20.0, what="the agent to drain")
    assert machine.unit("ActiveState")["ActiveState"] == "deactivating"
    assert machine.status(long_job)["state"] == "running"
    (machine.root / WORK_ROOT.relative_to("/") / long_job / "workspace" / "go").touch()
    unit = wait_for(machine.stopped, JOB_TIMEOUT_S, what="the agent to stop after its job")
    # A main process killed by a signal shows the signal's number here, not 0.
    assert (unit["Result"], unit["ExecMainStatus"]) == ("success", "0"), unit

    # A second SIGTERM during the drain cancels the running job, and the agent still exits 0.
    machine.start_agent()
    record = machine.status(long_job)
    assert record["state"] == "succeeded", record
    assert "released" in machine.hpc_runner("logs", long_job).stdout
    # The drained job's workspace went back to its submitter, `go` with it: the next must wait again.
    (machine.root / PROJECT.relative_to("/") / "go").unlink()
    cancelled = machine.submit(job_toml("cancelled", script=WAITING_SCRIPT, time="5m"))
    machine.wait_state(cancelled, "running")
    machine.run("systemctl", "stop", "--no-block", AGENT)
    wait_for(lambda: machine.journal().count("draining: no new jobs") == 2, 20.0, what="the second drain")
    machine.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGTERM", AGENT)
    unit = wait_for(machine.stopped, JOB_TIMEOUT_S, what="the agent to stop after cancelling its job")
    assert (unit["Result"], unit["ExecMainStatus"]) == ("success", "0"), unit
    machine.start_agent()
    assert machine.status(cancelled)["state"] == "cancelled"
    machine.run("systemctl", "stop", AGENT)


def hub_status(port: int, token: str) -> int:
    """The HTTP status of the hub's agent status endpoint for a bearer token."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/status",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_the_hardened_hub_unit_serves_reloads_its_agent_tokens_and_stops_cleanly(machine: Machine) -> None:
    # systemd-nspawn shares the host's network: the hub's port is one free here.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first, second = secrets.token_hex(32), secrets.token_hex(32)
    tokens = machine.etc / "hub-agent-tokens"
    account = next(line.split(":") for line in (machine.root / "etc/passwd").read_text().splitlines()
                   if line.startswith("hpcrunner:"))
    tokens.write_text(f"first:{first}\n")
    os.chown(tokens, int(account[2]), int(account[3]))
    tokens.chmod(0o600)
    machine.etc.joinpath("hub.toml").write_text(
        f'[hub]\nlisten = "127.0.0.1:{port}"\nstate_dir = "/var/lib/hpc-runner-hub"\n'
        'agent_tokens_file = "/etc/hpc-runner/hub-agent-tokens"\npublic_url = "https://hub.example.org"\n\n'
        '[[oidc]]\nname = "github-actions"\nissuer = "https://token.actions.githubusercontent.com"\n'
        'audience = "hpc-runner"\nkind = "github"\n')
    machine.run("systemctl", "start", HUB)
    wait_for(lambda: '"hub listening"' in machine.journal(HUB), 20.0, what="the hub to listen")
    assert hub_status(port, first) == 200
    assert hub_status(port, second) == 401
    assert (machine.root / "var/lib/hpc-runner-hub/jobs.sqlite3").stat().st_mode & 0o777 == 0o600

    tokens.write_text(f"first:{first}\nsecond:{second}\n")
    machine.run("systemctl", "reload", HUB)
    wait_for(lambda: '"agent tokens reloaded"' in machine.journal(HUB), 20.0,
             what="the hub to reload its tokens")
    assert hub_status(port, second) == 200

    machine.run("systemctl", "stop", HUB)
    unit = machine.stopped(HUB)
    assert unit is not None and (unit["Result"], unit["ExecMainStatus"]) == ("success", "0"), unit


def sacct_job(job_id: str) -> dict[str, str] | None:
    """What Slurm's accounting recorded of the allocation of our job `job_id` once it ended, else
    None. Found by its name: Slurm's job ids come round again when its state is reset, and sacct
    shows only the newest job of an id."""
    fields = ("JobID", "JobName", "Account", "User", "Partition", "State", "ExitCode")
    result = subprocess.run(["sacct", "-X", "-n", "-P", "--starttime=now-1days", f"--name=hpcr-{job_id}",
                             f"--format={','.join(fields)}"],
                            capture_output=True, text=True, timeout=30, check=False)
    rows = [dict(zip(fields, line.split("|"), strict=True)) for line in result.stdout.splitlines() if line]
    return rows[0] if len(rows) == 1 and rows[0]["State"] not in ("PENDING", "RUNNING") else None


def slurm_id_in(log: str, job_id: str) -> str:
    submitted = SUBMITTED.search(log)
    assert submitted and submitted.group(2) == job_id, log
    return submitted.group(1)


def test_the_hardened_agent_unit_runs_jobs_through_slurm_and_drains_them_on_stop(
        login_node: LoginNode, cluster: Cluster) -> None:
    machine, work_root = login_node.machine, login_node.work_root
    account = pwd.getpwnam(SERVICE_USER)
    machine.start_agent()
    assert machine.unit("ActiveState")["ActiveState"] == "active"

    # The host's slurmd runs the batch script, and Apptainer in it, as the service account: the
    # host's, by the uid and the gid the container gave the unit's account.
    job_id = machine.submit(job_toml("hello", script=(
        "cat /etc/debian_version; id -un; id -gn; echo computed > /work/result.txt\n"), time="2m"))
    record = machine.wait_state(job_id, "succeeded", "failed", "denied", "infra_failed",
                                timeout=SLURM_JOB_TIMEOUT_S)
    logs = machine.hpc_runner("logs", job_id).stdout
    assert record["state"] == "succeeded", (record, logs, machine.journal()[-3000:])
    assert f"\n{account.pw_name}\n{grp.getgrgid(account.pw_gid).gr_name}\n" in logs, logs
    assert (machine.root / PROJECT.relative_to("/") / "result.txt").read_text() == "computed\n"
    # Slurm's accounting charged it to the policy's account, as the host's service account.
    slurm_id = slurm_id_in(logs, job_id)
    accounted = wait_for(lambda: sacct_job(job_id), JOB_TIMEOUT_S, what=f"sacct to show job {slurm_id} ended")
    assert accounted == {"JobID": slurm_id, "JobName": f"hpcr-{job_id}", "Account": SLURM_ACCOUNT,
                         "User": SERVICE_USER, "Partition": cluster.default_partition, "State": "COMPLETED",
                         "ExitCode": "0:0"}, accounted

    # An MPI job: srun --mpi=pmix starts the ranks on the host, each in its sandbox, bound to the
    # Open MPI the agent found in its own root (the host's: both are bookworm's).
    mpi_job = machine.submit(job_toml("mpi", command=["/usr/local/bin/mpi-hello"], tasks=2, mpi=True,
                                      time="2m"))
    record = machine.wait_state(mpi_job, "succeeded", "failed", "denied", "infra_failed",
                                timeout=SLURM_JOB_TIMEOUT_S)
    logs = machine.hpc_runner("logs", mpi_job).stdout
    assert record["state"] == "succeeded", (record, logs)
    lines = logs.splitlines()
    assert sorted(line for line in lines if line.startswith("rank ")) == ["rank 0 of 2", "rank 1 of 2"], logs
    assert "allreduce sum 3" in lines, logs
    assert "--mpi=pmix" in (work_root / mpi_job / "slurm.sh").read_text()

    # Stop drains: the Slurm job runs on, outside the unit, and the agent follows it to its end,
    # then exits 0; started again, it shows the job succeeded.
    long_job = machine.submit(job_toml("drained", script=WAITING_SCRIPT, time="5m"))
    machine.wait_state(long_job, "running", timeout=SLURM_JOB_TIMEOUT_S)
    wait_for(lambda: "waiting" in machine.hpc_runner("logs", long_job).stdout.splitlines(),
             SLURM_JOB_TIMEOUT_S, what="the job to start waiting")
    machine.run("systemctl", "stop", "--no-block", AGENT)
    wait_for(lambda: "draining: no new jobs" in machine.journal(), 20.0, what="the agent to drain")
    assert machine.unit("ActiveState")["ActiveState"] == "deactivating"
    assert machine.status(long_job)["state"] == "running"
    slurm_id = slurm_id_in(machine.hpc_runner("logs", long_job).stdout, long_job)
    assert slurm_job_fields(slurm_id).get("JobState") == "RUNNING", slurm_job_fields(slurm_id)
    (work_root / long_job / "workspace" / "go").touch()
    unit = wait_for(machine.stopped, JOB_TIMEOUT_S, what="the agent to stop after its job")
    assert (unit["Result"], unit["ExecMainStatus"]) == ("success", "0"), unit
    machine.start_agent()
    record = machine.status(long_job)
    logs = machine.hpc_runner("logs", long_job).stdout
    assert record["state"] == "succeeded", (record, logs)
    assert "released" in logs.splitlines(), logs
    accounted = wait_for(lambda: sacct_job(long_job), JOB_TIMEOUT_S,
                         what="sacct to show the drained job ended")
    assert (accounted["JobID"], accounted["State"]) == (slurm_id, "COMPLETED"), accounted
    machine.run("systemctl", "stop", AGENT)
