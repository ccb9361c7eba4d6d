"""The sandbox for real: host Open MPI discovered here, jobs run by Apptainer as the service account.

Needs root (to act as the service account through runuser), the `hpcrunner` account, Apptainer,
the host's Open MPI and a test image. Without them these tests skip, except under CI or
HPC_RUNNER_TEST_CLUSTER, where they fail: a real-component test must not pass by skipping.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from runner.policy.engine import Decision, SlurmResources
from runner.spec import JobSpec, Resources
from sandbox.hostmpi import HostMpi, HostMpiError, discover_host_mpi
from sandbox.plan import JobPaths, SandboxSite, expected_env_name, plan_local_launch, plan_sandbox

pytestmark = pytest.mark.cluster

SERVICE_USER = "hpcrunner"
IMAGES = (Path("/var/cache/hpc-runner-dev/images/hpc-runner-test.sif"),)
WORK_ROOT = Path("/var/tmp/hpc-runner-sandbox-tests")
TIMEOUT_SECONDS = 180
# What runner/bundled/mpi-hello.c prints: a line per rank, then rank 0's world size and sum.
RANK_LINE = re.compile(r"^rank (\d+) of (\d+)$")
WORLD_LINE = re.compile(r"^world size (\d+)$")
SUM_LINE = re.compile(r"^allreduce sum (\d+)$")


def _required() -> bool:
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
               for name in ("CI", "HPC_RUNNER_TEST_CLUSTER"))


def unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason} (CI / HPC_RUNNER_TEST_CLUSTER forbid skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> Path:
    if os.geteuid() != 0:
        unavailable(f"these tests run as root to act as {SERVICE_USER} through runuser")
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        unavailable(f"no service account {SERVICE_USER}")
    for tool in ("apptainer", "runuser"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            unavailable(f"{tool} is not installed")
    found = next((path for path in IMAGES if path.is_file()), None)
    if found is None:
        unavailable(f"no test image (looked for {', '.join(map(str, IMAGES))})")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def host_mpi() -> HostMpi:
    try:
        return discover_host_mpi()
    except HostMpiError as exc:
        unavailable(f"no usable host Open MPI: {exc}")
        raise


@pytest.fixture(scope="module")
def hello_binary(host_mpi: HostMpi) -> Iterator[Path]:
    """The bundled MPI allreduce, compiled here against the host's Open MPI as the image's is."""
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        unavailable("mpicc (the host Open MPI's compiler wrapper) is not installed")
    assert mpicc is not None
    build = Path(tempfile.mkdtemp(prefix="mpi-hello-"))
    try:
        source = build / "mpi-hello.c"
        source.write_bytes(resources.files("runner.bundled").joinpath("mpi-hello.c").read_bytes())
        binary = build / "mpi-hello"
        result = subprocess.run([mpicc, "-O2", "-o", str(binary), str(source)], capture_output=True,
                                text=True, check=False)
        assert result.returncode == 0, f"mpicc failed:\n{result.stderr}"
        yield binary
    finally:
        shutil.rmtree(build, ignore_errors=True)


@dataclass(frozen=True)
class JobDirs:
    root: Path
    paths: JobPaths


@pytest.fixture
def job_dirs(image: Path) -> Iterator[JobDirs]:
    """Workspace, scratch and metadata directories owned by the service account."""
    WORK_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="job-", dir=WORK_ROOT))
    account = pwd.getpwnam(SERVICE_USER)
    for path in (root, root / "work", root / "scratch", root / "meta"):
        path.mkdir(exist_ok=True)
        os.chown(path, account.pw_uid, account.pw_gid)
        path.chmod(0o755)
    try:
        yield JobDirs(root, JobPaths(job_id=root.name, workspace=str(root / "work"),
                                     scratch=str(root / "scratch"), meta=str(root / "meta")))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def decide(spec: JobSpec) -> Decision:
    tasks = spec.resources.tasks or 1
    slurm = SlurmResources(account="test", partition="debug", nodes=1, tasks=tasks, tasks_per_node=None,
                           cpus_per_task=1, gpus=0, memory_mb=None, time_seconds=600)
    return Decision(True, grant="test", account="test", slurm=slurm, image=spec.image, mpi=spec.mpi,
                    network=spec.network, gpus=False)


def run_job(spec: JobSpec, dirs: JobDirs, image: Path, mpi: HostMpi | None,
            extra_host_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Plan the job, write its metadata, and launch it as the service account with only host_env."""
    decision = decide(spec)
    plan = plan_sandbox(spec, decision, str(image), dirs.paths, SandboxSite(), mpi)
    meta = Path(dirs.paths.meta)
    (meta / "env").write_text(plan.env_file)
    if plan.script is not None:
        (meta / "script").write_text(plan.script)
    host_env = {**plan.host_env, **(extra_host_env or {})}
    argv = ["runuser", "-u", SERVICE_USER, "--", "env", "-i",
            *(f"{k}={v}" for k, v in sorted(host_env.items())), *plan_local_launch(plan, spec, decision, mpi)]
    return subprocess.run(argv, cwd=dirs.root, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                          check=False)


def hello_job(dirs: JobDirs, tasks: int, binary: Path) -> JobSpec:
    account = pwd.getpwnam(SERVICE_USER)
    target = Path(dirs.paths.workspace) / "hello"
    shutil.copy(binary, target)
    os.chown(target, account.pw_uid, account.pw_gid)
    return JobSpec(name="mpi-hello", image="test", command=("/work/hello",), mpi=True,
                   resources=Resources(tasks=tasks))


def check_world(result: subprocess.CompletedProcess[str], tasks: int) -> None:
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    output = result.stdout.splitlines()
    ranks = [m.groups() for m in map(RANK_LINE.match, output) if m]
    if sum(1 for _, size in ranks if size == "1") > 1:
        pytest.fail(f"ranks started as singletons (each saw a world of 1): the launcher's "
                    f"variables did not reach them\n{report}")
    assert result.returncode == 0, report
    assert sorted(int(rank) for rank, _ in ranks) == list(range(tasks)), report
    assert {int(size) for _, size in ranks} == {tasks}, report
    assert [int(m[1]) for m in map(WORLD_LINE.match, output) if m] == [tasks], report
    assert [int(m[1]) for m in map(SUM_LINE.match, output) if m] == [tasks * (tasks + 1) // 2], report


# -- discovery -----------------------------------------------------------------------------------

def test_discovers_the_host_open_mpi(host_mpi: HostMpi) -> None:
    assert host_mpi.family == "openmpi"
    assert Path(host_mpi.libmpi).is_file() and Path(host_mpi.mpirun).is_file()
    assert host_mpi.plugin_dirs and all(Path(d).is_dir() for d in host_mpi.plugin_dirs)
    assert any(Path(d, "mca_btl_vader.so").exists() or Path(d, "mca_btl_sm.so").exists()
               for d in host_mpi.plugin_dirs)
    libs = {b.target.rsplit("/", 1)[1] for b in host_mpi.binds if b.target.startswith(host_mpi.library_dir)}
    assert re.compile(r"libmpi\.so\.\d+").fullmatch(os.path.basename(host_mpi.libmpi))
    assert any(name.startswith("libmpi.so.") for name in libs)
    assert any(name.startswith("libpmix.so.") for name in libs)
    for forbidden in ("libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1"):
        assert forbidden not in libs
    assert all(b.mode == "ro" and Path(b.source).exists() for b in host_mpi.binds)


# -- MPI -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tasks", [2, 4])
def test_mpi_allreduce_through_the_sandbox(image: Path, host_mpi: HostMpi, job_dirs: JobDirs,
                                           hello_binary: Path, tasks: int) -> None:
    check_world(run_job(hello_job(job_dirs, tasks, hello_binary), job_dirs, image, host_mpi), tasks)


def test_ranks_use_shared_memory_between_them(image: Path, host_mpi: HostMpi, job_dirs: JobDirs,
                                               hello_binary: Path) -> None:
    """Only the self and shared-memory transports allowed: works only if ranks share /dev/shm."""
    result = run_job(hello_job(job_dirs, 2, hello_binary), job_dirs, image, host_mpi,
                     extra_host_env={"OMPI_MCA_btl": "self,vader"})
    check_world(result, 2)


# -- environment, HOME, scripts, network ---------------------------------------------------------

def test_env_values_arrive_literally_and_nothing_else_is_set(image: Path, job_dirs: JobDirs) -> None:
    marker = f"/tmp/pwned-{uuid.uuid4().hex}"
    env = {"PWN_SUBST": f"$(touch {marker})", "PWN_TICKS": f"`touch {marker}`",
           "QUOTES": "it's \"x\"", "NEWLINES": "one\ntwo\n", "BRACES": "${HOME}", "EMPTY": ""}
    spec = JobSpec(name="env", image="test", command=("env", "-0"), env=env)
    result = run_job(spec, job_dirs, image, None)
    assert result.returncode == 0, result.stderr
    got = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
    for name, value in env.items():
        assert got[name] == value, name
    assert not Path(marker).exists()
    assert not list(Path(job_dirs.paths.scratch).rglob(Path(marker).name))
    plan = plan_sandbox(spec, decide(spec), str(image), job_dirs.paths, SandboxSite(), None)
    unexpected = sorted(name for name in got if not expected_env_name(name, spec, plan))
    assert unexpected == []
    assert got["HPC_RUNNER_JOB_ID"] == job_dirs.paths.job_id and got["CI"] == "true"


def test_home_is_a_private_writable_tmp(image: Path, job_dirs: JobDirs) -> None:
    service_home = pwd.getpwnam(SERVICE_USER).pw_dir
    spec = JobSpec(name="home", image="test", command=(
        "/bin/sh", "-c", 'echo "HOME=$HOME"; touch "$HOME/written" && echo writable; cat /etc/passwd; env'))
    result = run_job(spec, job_dirs, image, None)
    assert result.returncode == 0, result.stderr
    assert "HOME=/tmp\n" in result.stdout and "writable\n" in result.stdout
    assert service_home not in result.stdout
    assert (Path(job_dirs.paths.scratch) / "tmp" / "written").exists()


def test_a_script_runs_with_sh_e(image: Path, job_dirs: JobDirs) -> None:
    spec = JobSpec(name="script", image="test", script="echo one\nfalse\necho two\n")
    result = run_job(spec, job_dirs, image, None)
    assert result.returncode == 1 and result.stdout == "one\n", result.stderr


def test_a_job_without_network_sees_only_loopback(image: Path, job_dirs: JobDirs) -> None:
    spec = JobSpec(name="net", image="test", command=("cat", "/proc/net/dev"))
    result = run_job(spec, job_dirs, image, None)
    assert result.returncode == 0, result.stderr
    interfaces = {line.split(":", 1)[0].strip() for line in result.stdout.splitlines()[2:]}
    assert interfaces == {"lo"}


def test_workspace_is_the_working_directory_and_writable(image: Path, job_dirs: JobDirs) -> None:
    spec = JobSpec(name="ws", image="test", command=("/bin/sh", "-c", "pwd; echo hi > out.txt"))
    result = run_job(spec, job_dirs, image, None)
    assert result.returncode == 0 and result.stdout == "/work\n", result.stderr
    assert (Path(job_dirs.paths.workspace) / "out.txt").read_text() == "hi\n"
