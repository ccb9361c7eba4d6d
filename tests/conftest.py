"""Fixtures and helpers shared by the whole test suite.

Tests that need the real local cluster (munge, Slurm, Apptainer and the MPI test image, all set up
by ``deploy/dev/setup.sh``) take the ``cluster`` fixture; they are marked ``cluster`` automatically,
so ``-m "not cluster"`` leaves them out. Without the cluster such tests are skipped on a developer's
machine, and fail in CI (``CI`` or ``HPC_RUNNER_TEST_CLUSTER`` set): real-component tests must never
turn green by skipping.

Commands that the service account would run in production run here as that account, through
``as_service_user``, with a clean environment and in a directory it can read (``service_tmp``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

SERVICE_USER = "hpcrunner"
SERVICE_HOME = Path("/var/lib/hpcrunner")
VENV = Path("/opt/hpc-runner/venv")
TEST_IMAGE = Path("/var/cache/hpc-runner-dev/images/hpc-runner-test.sif")
TEST_IMAGE_SHA256_FILE = TEST_IMAGE.with_name(TEST_IMAGE.name + ".sha256")
SERVICE_TMP_ROOT = Path("/var/tmp/hpc-runner-tests")
SERVICE_PATH = f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin"
SETUP_HINT = "run `sudo deploy/dev/setup.sh` to set up the local test cluster"

# Node states in which the node accepts (or is running) jobs.
USABLE_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})
# Slurm job states after which a job never runs again.
FINAL_JOB_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

_RUNUSER = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/usr/sbin/runuser"
_CHECK_TIMEOUT = 20.0

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Helpers


def service_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The clean environment commands of the service account start with, plus ``extra``."""
    env = {
        "PATH": SERVICE_PATH,
        "LANG": "C.UTF-8",
        "HOME": str(SERVICE_HOME),
        "USER": SERVICE_USER,
        "LOGNAME": SERVICE_USER,
    }
    if extra:
        env.update(extra)
    return env


def as_service_user(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the service account (``runuser -u hpcrunner --``), capturing text output.

    The environment is ``service_env(env)``: nothing leaks in from the test process. ``cwd``
    defaults to the service account's home, because Slurm and Apptainer need a working directory
    the account can read. Other keyword arguments go to ``subprocess.run`` (for example
    ``check=True`` or ``input=...``). The exit status is not checked unless asked.
    """
    return subprocess.run(
        [_RUNUSER, "-u", SERVICE_USER, "--", *(os.fspath(arg) for arg in argv)],
        cwd=os.fspath(cwd) if cwd is not None else os.fspath(SERVICE_HOME),
        env=service_env(env),
        text=True,
        capture_output=True,
        timeout=timeout,
        **kw,
    )


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.1,
    what: str = "a condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` (and showing the last value) after ``timeout`` seconds.
    Tests synchronise with this, never with a bare sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def slurm_job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job -o JOB_ID`` as a dict of its single-word fields (JobState, ExitCode, ...).

    Empty when Slurm no longer knows the job. Fields whose values contain spaces (such as
    Command) are cut at the first space.
    """
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        text=True,
        capture_output=True,
        timeout=_CHECK_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        return {}
    return dict(re.findall(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(\S*)", result.stdout))


def wait_for_slurm_job(job_id: str, timeout: float = 60.0) -> dict[str, str]:
    """Wait until job ``job_id`` reaches a final state; return its ``slurm_job_fields``."""

    def finished() -> dict[str, str] | None:
        fields = slurm_job_fields(job_id)
        return fields if fields.get("JobState") in FINAL_JOB_STATES else None

    return wait_for(finished, timeout, interval=0.2, what=f"Slurm job {job_id} to finish")


def apptainer_exec_argv(*command: str, image: Path = TEST_IMAGE) -> list[str]:
    """``apptainer exec`` of ``command`` in ``image``, isolated the way jobs are (no host home, no env)."""
    return ["apptainer", "exec", "--contain", "--cleanenv", "--no-home", os.fspath(image), *command]


# --------------------------------------------------------------------------------------------
# Skip or fail


def _cluster_required() -> bool:
    """True when a missing cluster is an error (CI, or after deploy/dev/run-tests.sh set it up)."""
    for name in ("CI", "HPC_RUNNER_TEST_CLUSTER"):
        if os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no"):
            return True
    return False


def _unavailable(problems: Sequence[str]) -> NoReturn:
    message = "local test cluster not usable: " + "; ".join(problems)
    if _cluster_required():
        pytest.fail(message + " (CI and HPC_RUNNER_TEST_CLUSTER forbid skipping)", pytrace=False)
    pytest.skip(f"{message}; {SETUP_HINT}")


def _run_check(argv: Sequence[str], input_text: str | None = None) -> tuple[bool, str]:
    """Run a probe command; return (succeeded, stdout or a short error)."""
    try:
        result = subprocess.run(
            list(argv),
            input=input_text,
            text=True,
            capture_output=True,
            timeout=_CHECK_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return False, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return False, f"{' '.join(argv)} timed out after {_CHECK_TIMEOUT:g} s"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        return False, f"{' '.join(argv)} exited {result.returncode}" + (f": {detail[-1]}" if detail else "")
    return True, result.stdout


def _service_user_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append(f"tests must run as root (they switch to {SERVICE_USER} with runuser)")
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        problems.append(f"no user {SERVICE_USER}")
    return problems


# --------------------------------------------------------------------------------------------
# Fixtures


@dataclass(frozen=True)
class Cluster:
    """What the ``cluster`` fixture found."""

    node: str
    node_state: str
    partitions: tuple[str, ...]
    default_partition: str
    apptainer_version: str
    image: Path
    image_sha256: str
    venv: Path


@pytest.fixture(scope="session")
def service_user() -> str:
    """The service account's name, after checking that tests can act as it."""
    problems = _service_user_problems()
    if problems:
        _unavailable(problems)
    return SERVICE_USER


@pytest.fixture(scope="session")
def cluster(service_user: str) -> Cluster:
    """The local cluster from deploy/dev/setup.sh, checked to be up: munge, Slurm, Apptainer, image."""
    problems: list[str] = []

    ok, out = _run_check(["munge", "-n"])
    if ok:
        ok, detail = _run_check(["unmunge"], input_text=out)
        if not ok:
            problems.append(f"munge credentials do not verify ({detail})")
    else:
        problems.append(f"munge does not work ({out})")

    node = node_state = default_partition = ""
    partitions: tuple[str, ...] = ()
    ok, out = _run_check(["sinfo", "-h", "-N", "-o", "%N %T"])
    if not ok:
        problems.append(f"sinfo fails ({out})")
    else:
        nodes = [line.split() for line in out.splitlines() if line.strip()]
        usable = [fields for fields in nodes if len(fields) == 2 and fields[1] in USABLE_NODE_STATES]
        if usable:
            node, node_state = usable[0]
        else:
            problems.append(f"no Slurm node accepts jobs (sinfo: {out.strip() or 'no nodes'})")
        ok, out = _run_check(["sinfo", "-h", "-o", "%P"])
        names = [name.strip() for name in out.split()] if ok else []
        partitions = tuple(name.rstrip("*") for name in names)
        default_partition = next((name.rstrip("*") for name in names if name.endswith("*")), "")
        if not default_partition:
            problems.append("Slurm has no default partition")

    ok, out = _run_check(["apptainer", "--version"])
    apptainer_version = out.strip() if ok else ""
    if not ok:
        problems.append(f"apptainer does not run ({out})")

    image_sha256 = ""
    if not TEST_IMAGE.is_file():
        problems.append(f"no test image {TEST_IMAGE}")
    elif not TEST_IMAGE_SHA256_FILE.is_file():
        problems.append(f"no {TEST_IMAGE_SHA256_FILE}")
    else:
        image_sha256 = TEST_IMAGE_SHA256_FILE.read_text().strip()

    if not (VENV / "bin" / "python").is_file():
        problems.append(f"no virtual environment {VENV}")

    if problems:
        _unavailable(problems)
    return Cluster(
        node=node,
        node_state=node_state,
        partitions=partitions,
        default_partition=default_partition,
        apptainer_version=apptainer_version,
        image=TEST_IMAGE,
        image_sha256=image_sha256,
        venv=VENV,
    )


@pytest.fixture
def service_tmp(service_user: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory owned by the service account under /var/tmp/hpc-runner-tests, removed afterwards.

    Slurm jobs and containers of the service account can read and write it (it is not under
    root's home or a private /tmp), and so can this test, as root.
    """
    SERVICE_TMP_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    SERVICE_TMP_ROOT.chmod(0o755)
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60] + "-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=SERVICE_TMP_ROOT))
    account = pwd.getpwnam(service_user)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(0o750)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Hooks


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the ``cluster`` fixture (even indirectly) with ``cluster``."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
