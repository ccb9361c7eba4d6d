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

import asyncio
import contextlib
import difflib
import grp
import json
import os
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import pytest

if TYPE_CHECKING:
    import aiohttp
    from fakes.buildkite_api import BuildkiteEmulator
    from fakes.github_api import ManualClock

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
P = ParamSpec("P")


async def wait_until(check: Callable[[], Any], what: str = "the condition", timeout: float = 20.0) -> Any:
    """Poll `check` on the event loop until it gives a true value, which is returned; the test
    fails, naming `what`, after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return value


def check_golden(path: Path, text: str, what: str) -> None:
    """Fail, with a diff, unless ``text`` is the golden file ``path`` (``what`` names the text);
    with UPDATE_GOLDEN=1 in the environment, write ``text`` to ``path`` instead."""
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    expected = path.read_text() if path.exists() else ""
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"{path.name} (golden)", f"{path.name} (planned)"))
        pytest.fail(f"{what} differs from {path} (UPDATE_GOLDEN=1 rewrites it):\n{diff}", pytrace=False)


def closing_factory(make: Callable[P, T], close: Callable[[T], object]) -> Iterator[Callable[P, T]]:
    """The body of a fixture that yields a factory: ``make`` makes each thing a test asks for, and
    ``close`` closes every one of them, in the order made, once the test is over."""
    made: list[T] = []

    def factory(*args: P.args, **kwargs: P.kwargs) -> T:
        item = make(*args, **kwargs)
        made.append(item)
        return item

    yield factory
    for item in made:
        close(item)


def git(*args: str | os.PathLike[str], cwd: Path) -> str:
    """Run git as a test author (no user or system config) in `cwd`; its standard output."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    argv = ["git", *(os.fspath(arg) for arg in args)]
    return subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def give_tree_to_service_user(path: Path) -> None:
    """Make `path` and everything below it the service account's (links themselves, not targets)."""
    account = pwd.getpwnam(SERVICE_USER)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)
    os.chown(path, account.pw_uid, account.pw_gid)


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `sandbox.images` hashes from now on (a digest cache hit hashes nothing)."""
    from sandbox import images

    calls: list[str] = []
    real = images.sha256_file

    def counting(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(images, "sha256_file", counting)
    return calls


# --------------------------------------------------------------------------------------------
# The CI services' emulators and their clients (imported when asked for: most tests need neither)


@pytest.fixture
def clock() -> ManualClock:
    """A clock that moves only when told to, for the GitHub emulator and the client under test."""
    from fakes.github_api import ManualClock

    return ManualClock()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session, closed after the test."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def bk() -> AsyncIterator[BuildkiteEmulator]:
    """The Buildkite agent API emulator, asking its agents to send the header Buildkite-Shard: 7."""
    from fakes.buildkite_api import BuildkiteEmulator

    async with BuildkiteEmulator(request_headers={"Buildkite-Shard": "7"}) as emulator:
        yield emulator


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
# The two-node cluster (deploy/dev/two-nodes.sh)

TWO_NODES_CONF = Path("/etc/slurm/two-nodes/slurm.conf")
# Job files of the two-node cluster live here: every node sees it, while each node's /tmp is its own.
TWO_NODES_SHARED = Path("/srv/hpc-runner-two-nodes")
# The Slurm account its jobs are charged to (the same accounts as the one-node cluster's).
TWO_NODES_ACCOUNT = "esm"


@dataclass(frozen=True)
class TwoNodes:
    """What the ``two_nodes`` fixture found: a second Slurm cluster whose two nodes each run in
    network, mount and UTS namespaces of their own, reached with ``SLURM_CONF=slurm_conf``."""

    slurm_conf: Path
    cluster_name: str
    partition: str
    account: str
    nodes: tuple[str, ...]
    gpu_node: str
    veths: Mapping[str, str]  # node -> the host side of its link into the bridge
    shared: Path

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm command (or the agent) needs in its environment to reach this cluster."""
        return {"SLURM_CONF": os.fspath(self.slurm_conf)}

    def slurm(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm command against this cluster, as root, with a deadline."""
        return subprocess.run(list(argv), env={**os.environ, **self.env}, text=True, capture_output=True,
                              timeout=_CHECK_TIMEOUT, check=check)

    def node_state(self, node: str) -> str:
        """sinfo's state of ``node``: idle, allocated, down* (not responding), drained..."""
        return self.slurm("sinfo", "-h", "-N", "-n", node, "-o", "%T").stdout.strip()


def _two_nodes_problems() -> tuple[list[str], dict[str, str]]:
    """Problems with the two-node cluster, and its nodes' states and GRES (``node -> state gres``)."""
    if not TWO_NODES_CONF.is_file():
        return [f"no {TWO_NODES_CONF}"], {}
    env = {**os.environ, "SLURM_CONF": os.fspath(TWO_NODES_CONF)}
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %G"], env=env, text=True,
                                capture_output=True, timeout=_CHECK_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return [f"sinfo with SLURM_CONF={TWO_NODES_CONF} timed out"], {}
    if result.returncode != 0:
        return [f"sinfo with SLURM_CONF={TWO_NODES_CONF} fails: {result.stderr.strip()}"], {}
    nodes: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, state, gres = [*line.split(), "", "", ""][:3]
        nodes[name] = f"{state} {gres}"
    problems = [f"node {name} is {info.split()[0]}" for name, info in nodes.items()
                if info.split()[0].rstrip("*~#") not in USABLE_NODE_STATES]
    if len(nodes) != 2:
        problems.append(f"the two-node cluster has nodes {sorted(nodes)}")
    return problems, nodes


@pytest.fixture(scope="session")
def two_nodes(cluster: Cluster) -> TwoNodes:
    """The two-node cluster from deploy/dev/setup.sh, checked to be up with both nodes usable; one
    of them has a GPU GRES. Skipped without it, failed in CI, as the ``cluster`` fixture."""
    problems, nodes = _two_nodes_problems()
    if problems:
        # A node left down by an interrupted run comes back when resumed.
        for name in nodes:
            subprocess.run(["scontrol", "update", f"nodename={name}", "state=resume"],
                           env={**os.environ, "SLURM_CONF": os.fspath(TWO_NODES_CONF)},
                           capture_output=True, timeout=_CHECK_TIMEOUT, check=False)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not _two_nodes_problems()[0], 30, interval=0.5, what="the two nodes to be up")
        problems, nodes = _two_nodes_problems()
    gpu_nodes = [name for name, info in nodes.items() if "gpu" in info]
    if not problems and len(gpu_nodes) != 1:
        problems.append(f"expected one node with a GPU GRES, sinfo shows {nodes}")
    if not TWO_NODES_SHARED.is_dir():
        problems.append(f"no {TWO_NODES_SHARED}")
    if problems:
        _unavailable([f"two-node cluster ({TWO_NODES_CONF}): " + "; ".join(problems)])
    config = subprocess.run(["scontrol", "show", "config"], env={**os.environ, "SLURM_CONF": os.fspath(
        TWO_NODES_CONF)}, text=True, capture_output=True, timeout=_CHECK_TIMEOUT, check=True).stdout
    name = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.MULTILINE)
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], env={**os.environ, "SLURM_CONF": os.fspath(
        TWO_NODES_CONF)}, text=True, capture_output=True, timeout=_CHECK_TIMEOUT, check=True).stdout.split()
    names = tuple(sorted(nodes))
    return TwoNodes(slurm_conf=TWO_NODES_CONF, cluster_name=name.group(1) if name else "",
                    partition=partitions[0].rstrip("*"), account=TWO_NODES_ACCOUNT, nodes=names,
                    gpu_node=gpu_nodes[0], veths={node: f"hpcr-{node}" for node in names},
                    shared=TWO_NODES_SHARED)


@dataclass
class NodeLinks:
    """Takes a node of the two-node cluster off its network (its link into the bridge down), as a
    failed node or switch would; ``restore`` brings every link back and the nodes into service."""

    cluster: TwoNodes
    cut: set[str]

    def take_down(self, node: str) -> None:
        self.cut.add(node)
        subprocess.run(["ip", "link", "set", self.cluster.veths[node], "down"], check=True,
                       capture_output=True, timeout=_CHECK_TIMEOUT)

    def bring_up(self, node: str) -> None:
        subprocess.run(["ip", "link", "set", self.cluster.veths[node], "up"], check=True,
                       capture_output=True, timeout=_CHECK_TIMEOUT)
        self.cut.discard(node)

    def restore(self, timeout: float = 90.0) -> None:
        """Every link up, and every node answering and resumed (slurmctld keeps a node that stopped
        answering down until told otherwise)."""
        for node in self.cluster.nodes:
            self.bring_up(node)

        def usable() -> bool:
            ready = True
            for node in self.cluster.nodes:
                state = self.cluster.node_state(node)
                if state.rstrip("*~#") in USABLE_NODE_STATES and not state.endswith("*"):
                    continue
                ready = False
                if not state.endswith("*"):  # it answers again: down or drained only in name
                    self.cluster.slurm("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            return ready

        wait_for(usable, timeout, interval=0.5, what="both nodes of the two-node cluster back in service")


@pytest.fixture
def node_links(two_nodes: TwoNodes) -> Iterator[NodeLinks]:
    """`take_down(node)` cuts a node's link; after the test every link is up and every node in
    service again, whatever the test did."""
    links = NodeLinks(two_nodes, set())
    try:
        yield links
    finally:
        links.restore()


@pytest.fixture
def two_nodes_tmp(two_nodes: TwoNodes, service_user: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory of the service account under the two-node cluster's shared directory (as
    ``service_tmp``, on a path both nodes see), removed afterwards."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60] + "-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=two_nodes.shared))
    account = pwd.getpwnam(service_user)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# hpc-runner as the service account and as other local users

# Name of the test image in the policies that `policy_toml` writes.
TEST_IMAGE_NAME = "test"
# Unix users and groups of the local queue tests: one user per group, each group with a grant of
# its own. Created on first use and left in place (creating them again would only cost time).
QUEUE_USERS = {"hpcr-alice": "hpcr-esm", "hpcr-bob": "hpcr-ocean"}
_SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin") or "/usr/bin/setpriv"


def toml_string(value: str | os.PathLike[str]) -> str:
    """A TOML basic string holding ``value`` (a JSON string of printable text is one)."""
    return json.dumps(os.fspath(value))


TomlValue = str | os.PathLike[str] | bool | int | Sequence[str]


def toml_value(value: TomlValue) -> str:
    """``value`` as TOML: a string (or path), a boolean, an integer or an array of strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, os.PathLike)):
        return toml_string(value)
    return f"[{', '.join(toml_string(item) for item in value)}]"


def toml_table(header: str, **keys: TomlValue) -> str:
    """A table of a policy or config: its ``header`` (``[name]`` or ``[[name]]``), a line a key."""
    return "\n".join([header, *(f"{key} = {toml_value(value)}" for key, value in keys.items())]) + "\n"


def policy_document(*tables: str) -> str:
    """A policy file of version 1 holding ``tables`` (from `toml_table`), a blank line between two."""
    return "\n".join(["version = 1\n", *tables])


def image_table(path: str | os.PathLike[str], sha256: str) -> str:
    """The policy's catalogue entry for the test image, named ``TEST_IMAGE_NAME``."""
    return toml_table(f"[images.{TEST_IMAGE_NAME}]", path=path, sha256=sha256)


def binds_policy(*binds: str, grant: str = "data") -> str:
    """A policy whose one grant, ``grant``, gives local user alice ``binds`` (and no image)."""
    return policy_document(
        toml_table("[accounts.esm]", slurm_account="esm", partitions=["batch"]),
        toml_table("[[grants]]", name=grant, principals=["local:user:alice"], account="esm", binds=binds))


def policy_toml(
    image_sha256: str,
    *,
    image_path: Path = TEST_IMAGE,
    slurm_account: str = "ci",
    partitions: Sequence[str] = ("local",),
    principals: Sequence[str] = (f"local:user:{SERVICE_USER}",),
    max_time: str = "10m",
    mpi: bool = True,
    network: bool = False,
    binds: Sequence[str] = (),
) -> str:
    """A policy with one account ``ci``, the test image as ``test``, and one grant ``ci-jobs``."""
    return policy_document(
        toml_table("[accounts.ci]", slurm_account=slurm_account, partitions=partitions, max_time=max_time),
        image_table(image_path, image_sha256),
        toml_table("[[grants]]", name="ci-jobs", principals=principals, account="ci",
                   images=[TEST_IMAGE_NAME], mpi=mpi, network=network, binds=binds))


def job_toml(
    name: str,
    *,
    script: str | None = None,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    time: str | None = None,
    tasks: int | None = None,
    partition: str | None = None,
    mpi: bool = False,
    network: bool = False,
    binds: Sequence[str] = (),
    image: str = TEST_IMAGE_NAME,
) -> str:
    """A job file's text; ``script`` goes into a TOML literal string, so backslashes stay as written."""
    lines = ["[job]", f"name = {toml_string(name)}", f"image = {toml_string(image)}"]
    if script is not None:
        if "'''" in script:
            raise ValueError("a script for job_toml must not contain three single quotes")
        lines.append("script = '''\n" + script + "'''")
    if command is not None:
        lines.append(f"command = [{', '.join(toml_string(arg) for arg in command)}]")
    if env:
        lines.append("env = { " + ", ".join(f"{k} = {toml_string(v)}" for k, v in env.items()) + " }")
    if binds:
        lines.append(f"binds = [{', '.join(toml_string(b) for b in binds)}]")
    lines.append(f"network = {str(network).lower()}")
    resources = []
    if time is not None:
        resources.append(f"time = {toml_string(time)}")
    if tasks is not None:
        resources.append(f"tasks = {tasks}")
    if partition is not None:
        resources.append(f"partition = {toml_string(partition)}")
    if resources:
        lines += ["", "[job.resources]", *resources]
    if mpi:
        lines += ["", "[job.mpi]", "enabled = true"]
    return "\n".join(lines) + "\n"


def user_env(user: str, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The clean environment a local user's commands start with, plus ``extra``."""
    env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": str(home), "USER": user, "LOGNAME": user}
    if extra:
        env.update(extra)
    return env


def as_user(
    user: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    binary: bool = False,
    **kw: Any,
) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` as local user ``user`` in ``cwd``, capturing output.

    Output is text unless ``binary``; the exit status is not checked unless asked. (runuser sets
    HOME to the user's home from the password database, whatever ``env`` says.)
    """
    return subprocess.run(
        [_RUNUSER, "-u", user, "--", *(os.fspath(arg) for arg in argv)],
        cwd=os.fspath(cwd),
        env=user_env(user, Path(cwd), env),
        text=not binary,
        capture_output=True,
        timeout=timeout,
        **kw,
    )


def spawn_as_user(
    user: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    **kw: Any,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as ``user`` with setpriv, which execs it: the Popen's pid is the command's own,
    so signals reach it directly (runuser would stand in between)."""
    return subprocess.Popen(
        [_SETPRIV, f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups", "--",
         *(os.fspath(arg) for arg in argv)],
        cwd=os.fspath(cwd),
        env=user_env(user, Path(cwd), env),
        **kw,
    )


class OutputReader:
    """Reads a child's pipe as it is written, so a test can wait for output with a deadline."""

    def __init__(self, stream: Any) -> None:
        self._fd = stream.fileno()
        os.set_blocking(self._fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self.data = bytearray()
        self.closed = False

    def _pump(self, timeout: float) -> None:
        if self.closed or not self._selector.select(max(timeout, 0.0)):
            return
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            self.data += chunk
        else:
            self.closed = True

    def wait_for(self, needle: bytes, timeout: float) -> bytes:
        """Everything read so far, once it holds ``needle``; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while needle not in self.data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                raise AssertionError(f"{needle!r} did not arrive within {timeout:g} s; "
                                     f"got {bytes(self.data)!r}")
            self._pump(min(remaining, 0.2))
        return bytes(self.data)

    def read_to_end(self, timeout: float) -> bytes:
        """Everything until the writer closes the pipe; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"output did not end within {timeout:g} s; got {bytes(self.data)!r}")
            self._pump(min(remaining, 0.2))
        return bytes(self.data)


@dataclass(frozen=True)
class RunnerSite:
    """An agent config, its policy and a workspace, all under one directory of the service account.

    ``run`` is `hpc-runner run` as the service account with this config; `AgentProcess` serves the
    same config as a long-running agent.
    """

    root: Path
    config: Path
    policy: Path
    state_dir: Path
    work_root: Path
    workspace: Path
    socket: Path

    def write_policy(self, text: str) -> None:
        write_public_file(self.policy, text)

    def write_job(self, name: str, text: str) -> Path:
        path = self.root / "jobs" / f"{name}.toml"
        path.parent.mkdir(mode=0o755, exist_ok=True)
        write_public_file(path, text)
        return path

    def run(
        self,
        job: Path,
        *args: str,
        workspace: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        return as_service_user(
            ["hpc-runner", "run", job, "--config", self.config, "--workdir", workspace or self.workspace,
             *args],
            cwd=self.root,
            env=env,
            timeout=timeout,
        )


def write_service_secret(path: Path, text: str) -> Path:
    """A file only the service account may read (0600, its own), as the agent keeps its secrets."""
    account = pwd.getpwnam(SERVICE_USER)
    path.write_text(text)
    path.chmod(0o600)
    os.chown(path, account.pw_uid, account.pw_gid)
    return path


def write_public_file(path: Path, text: str) -> None:
    """Write a file (as root) that every local user may read and nobody else may change."""
    path.write_text(text)
    path.chmod(0o644)


def config_toml(
    root: Path,
    *,
    policy: Path,
    socket: Path | None = None,
    max_jobs: int = 2,
    grace_period: str = "1s",
    apptainer: str | None = None,
    executor: str = "local",
) -> str:
    lines = [
        f"state_dir = {toml_string(root / 'state')}",
        f"work_root = {toml_string(root / 'work')}",
        f"policy = {toml_string(policy)}",
        f"executor = {toml_string(executor)}",
        f"max_jobs = {max_jobs}",
    ]
    if socket is not None:
        lines.append(f"socket = {toml_string(socket)}")
    lines += ["", "[sandbox]", f'grace_period = "{grace_period}"']
    if apptainer is not None:
        lines.append(f"apptainer = {toml_string(apptainer)}")
    return "\n".join(lines) + "\n"


def make_runner_site(
    root: Path,
    image_sha256: str,
    *,
    socket: Path | None = None,
    max_jobs: int = 2,
    grace_period: str = "1s",
    apptainer: str | None = None,
    executor: str = "local",
    policy_text: str | None = None,
    sections: Sequence[str] = (),
) -> RunnerSite:
    """Write config.toml and policy.toml into ``root``, a directory of the service account, and
    create its workspace. The policy is ``policy_text``, or ``policy_toml``'s defaults; the config
    ends with ``sections`` (tables from `toml_table`, such as a source's)."""
    policy = root / "policy.toml"
    write_public_file(policy, policy_toml(image_sha256) if policy_text is None else policy_text)
    config = root / "config.toml"
    write_public_file(config, "\n".join([
        config_toml(root, policy=policy, socket=socket, max_jobs=max_jobs, grace_period=grace_period,
                    apptainer=apptainer, executor=executor),
        *sections]))
    workspace = root / "workspace"
    workspace.mkdir(mode=0o755)
    account = pwd.getpwnam(SERVICE_USER)
    os.chown(workspace, account.pw_uid, account.pw_gid)
    return RunnerSite(root=root, config=config, policy=policy, state_dir=root / "state",
                      work_root=root / "work", workspace=workspace,
                      socket=socket or root / "state" / "agent.sock")


@pytest.fixture
def runner_site(cluster: Cluster, service_tmp: Path) -> RunnerSite:
    """A config and policy for the test image in ``service_tmp``, for `hpc-runner run` and `agent`."""
    return make_runner_site(service_tmp, cluster.image_sha256)


def source_site(cluster: Cluster, root: Path, *, grant: str, section: str, socket: Path,
                max_jobs: int) -> RunnerSite:
    """A site whose agent serves a CI source (its config ``section``) through Slurm: the policy
    has the account ``esm`` in the partition ``debug`` (2 minutes and 1G a job at most), the test
    image and the source's one ``grant``."""
    policy = policy_document(
        toml_table("[accounts.esm]", slurm_account="esm", partitions=["debug"], max_time="2m",
                   max_memory="1G"),
        image_table(cluster.image, cluster.image_sha256),
        grant)
    return make_runner_site(root, cluster.image_sha256, socket=socket, max_jobs=max_jobs, executor="slurm",
                            policy_text=policy, sections=[section])


@dataclass
class AgentProcess:
    """`hpc-runner agent --config CONFIG` running as the service account; stderr goes to a file."""

    process: subprocess.Popen[bytes]
    site: RunnerSite
    stderr_path: Path

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        def found() -> str | None:
            if self.process.poll() is not None and text not in self.log():
                raise AssertionError(f"the agent exited ({self.process.returncode}) before logging "
                                     f"{text!r}:\n{self.log()}")
            return self.log() if text in self.log() else None

        return wait_for(found, timeout, what=f"the agent to log {text!r}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent still runs after {timeout:g} s:\n{self.log()}") from None

    def stop(self) -> None:
        """Drain, then cancel what still runs, then kill: whatever it takes, within seconds."""
        for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                return
            self.process.send_signal(signum)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                continue


def start_agent(site: RunnerSite, timeout: float = 20.0) -> AgentProcess:
    """Start the agent and wait until its local queue listens."""
    stderr_path = site.root / f"agent-{time.monotonic_ns()}.log"
    with stderr_path.open("wb") as stderr:
        process = spawn_as_user(SERVICE_USER, ["hpc-runner", "agent", "--config", site.config],
                                cwd=site.root, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    agent = AgentProcess(process, site, stderr_path)
    try:
        agent.wait_for_log("local queue listening", timeout)
    except BaseException:
        agent.stop()
        raise
    return agent


@pytest.fixture
def agents() -> Iterator[Callable[[RunnerSite], AgentProcess]]:
    """Starts agents (``agents(site)``) and stops every one still running at the end of the test."""
    yield from closing_factory(start_agent, AgentProcess.stop)


@pytest.fixture
def shared_socket(service_user: str) -> Iterator[Path]:
    """A local queue socket path for every local user, outside any state dir.

    It lives in a short-named directory of its own, because a Unix socket path holds at most 107
    bytes and ``service_tmp`` paths carry the test's name; the agent creates ``run/`` (0755).
    """
    SERVICE_TMP_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    parent = Path(tempfile.mkdtemp(prefix="sock-", dir=SERVICE_TMP_ROOT))
    account = pwd.getpwnam(service_user)
    os.chown(parent, account.pw_uid, account.pw_gid)
    parent.chmod(0o755)
    try:
        yield parent / "run" / "agent.sock"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def queue_users(service_user: str) -> dict[str, str]:
    """The users of ``QUEUE_USERS`` (user -> their one group), created if missing."""
    for user, group in QUEUE_USERS.items():
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=True, capture_output=True, timeout=_CHECK_TIMEOUT)
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(
                ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                 "--gid", group, "--comment", "hpc-runner test user", user],
                check=True, capture_output=True, timeout=_CHECK_TIMEOUT,
            )
        account = pwd.getpwnam(user)
        if grp.getgrgid(account.pw_gid).gr_name != group:
            pytest.fail(f"user {user} exists with primary group {grp.getgrgid(account.pw_gid).gr_name}, "
                        f"not {group}; remove it (userdel {user}) and run the tests again")
    return dict(QUEUE_USERS)


def user_workspace(parent: Path, user: str) -> Path:
    """A fresh directory owned by ``user`` under ``parent``, writable by the service account's jobs."""
    path = Path(tempfile.mkdtemp(prefix=f"{user}-", dir=parent))
    account = pwd.getpwnam(user)
    os.chown(path, account.pw_uid, account.pw_gid)
    # Jobs run as the service account: it must be able to write the submitter's workspace.
    path.chmod(0o777)
    return path


# --------------------------------------------------------------------------------------------
# Hooks


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the ``cluster`` fixture (even indirectly) with ``cluster``."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
