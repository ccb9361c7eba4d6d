"""What the benchmark scripts share: the service account, planned jobs, the hub as a process of its
own, statistics, results.

Every measured command runs as the unprivileged service account, with a clean environment
and in a directory it owns under /var/tmp, because that is how the agent runs jobs in
production (and Apptainer behaves differently for root on these hosts). Sandboxed commands
come from the project's own planner, so a benchmark measures exactly what the product runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import pwd
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from runner.identity import identity_from_json
from runner.policy import Decision, Policy, decide, parse_policy_text
from runner.spec import JobSpec, parse_job_text
from sandbox.hostmpi import HostMpi
from sandbox.images import verify_image
from sandbox.plan import JobPaths, SandboxPlan, SandboxSite, plan_local_launch, plan_sandbox

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SERVICE_USER = "hpcrunner"
SERVICE_HOME = "/var/lib/hpcrunner"
# The environment every measured command starts from (`env -i` drops everything else).
SERVICE_ENV: Mapping[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": SERVICE_HOME}
IMAGE = Path("/var/cache/hpc-runner-dev/images/hpc-runner-test.sif")
# Not /tmp: the service account's containers and mpirun need a path they can reach and
# that is not private to root; each run gets a fresh directory here, removed afterwards.
WORK_PARENT = Path("/var/tmp/hpc-runner-bench")
IMAGE_NAME = "test"
SETUP_HINT = "run `sudo bash deploy/dev/setup.sh` first"
# A run during which other processes used more than this many cores' worth of CPU was
# disturbed: on a 2-core machine that is a busy-polling MPI rank sharing its core.
QUIET_LOAD = 0.25
# How long a server process of a benchmark (the hub, the agent) may take to start listening.
START_TIMEOUT_S = 30.0


class BenchError(Exception):
    """The benchmark cannot run, or a measured command failed: the message says which."""


# -- preconditions ------------------------------------------------------------------------------

def check_environment() -> pwd.struct_passwd:
    """Root, the service account and the test image, or BenchError saying what to do."""
    if os.geteuid() != 0:
        raise BenchError(f"run as root: commands are measured as {SERVICE_USER} through runuser "
                         f"(sudo {sys.executable} {sys.argv[0]})")
    try:
        account = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise BenchError(f"no service account {SERVICE_USER}; {SETUP_HINT}") from None
    for tool in ("runuser", "apptainer"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            raise BenchError(f"{tool} is not installed; {SETUP_HINT}")
    if not IMAGE.is_file():
        raise BenchError(f"no test image {IMAGE}; {SETUP_HINT}")
    return account


# -- running as the service account -------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    seconds: float  # wall time of the whole command, runuser included
    stdout: str
    stderr: str
    # CPU time that other processes used meanwhile. On a shared machine this says how much
    # a measurement was disturbed, independently of the measurement itself.
    other_cpu_seconds: float

    @property
    def other_load(self) -> float:
        """Cores' worth of other work during the run (0.5: half a core busy on average)."""
        return self.other_cpu_seconds / self.seconds


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _busy_cpu_seconds() -> float:
    """CPU time all processors spent on anything but idling, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def _own_cpu_seconds() -> float:
    # This process, and the measured command: every process of its tree is waited for by
    # its parent, so their CPU time ends up in RUSAGE_CHILDREN once the command has exited.
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def service_argv(command: Sequence[str], env: Mapping[str, str]) -> list[str]:
    runuser = shutil.which("runuser", path="/usr/sbin:/usr/bin:/sbin:/bin") or "runuser"
    return [runuser, "-u", SERVICE_USER, "--", "env", "-i",
            *(f"{name}={value}" for name, value in env.items()), *command]


def run_as_service(command: Sequence[str], *, cwd: Path, env: Mapping[str, str] = SERVICE_ENV,
                   timeout: float = 300.0) -> Run:
    """Run `command` as the service account with exactly `env`; BenchError unless it exits 0."""
    argv = service_argv(command, env)
    busy, own = _busy_cpu_seconds(), _own_cpu_seconds()
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    others = (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BenchError(f"{' '.join(command[:3])} ... exited {result.returncode}:\n{tail}")
    return Run(seconds, result.stdout, result.stderr, max(others, 0.0))


@contextlib.contextmanager
def service_workdir(prefix: str) -> Iterator[Path]:
    """A fresh directory owned by the service account, removed afterwards."""
    WORK_PARENT.mkdir(mode=0o755, parents=True, exist_ok=True)
    WORK_PARENT.chmod(0o755)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_PARENT))
    try:
        give_to_service(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def give_to_service(path: Path, mode: int) -> None:
    account = pwd.getpwnam(SERVICE_USER)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)


def service_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    # 0700 like the agent's own job directories: only the service account reads them.
    give_to_service(path, 0o700)
    return path


def service_file(path: Path, content: str | bytes, mode: int) -> Path:
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    give_to_service(path, mode)
    return path


# -- jobs planned the way the product plans them ------------------------------------------------

def bench_policy() -> Policy:
    """The embedded default policy's shape, for the service account and the test image."""
    sha_file = IMAGE.with_name(IMAGE.name + ".sha256")
    if not sha_file.is_file():
        raise BenchError(f"no {sha_file}; {SETUP_HINT}")
    text = f"""
version = 1

[accounts.bench]
slurm_account = "bench"
partitions = ["local"]
max_time = "10m"

[images.{IMAGE_NAME}]
path = {json.dumps(str(IMAGE))}
sha256 = {json.dumps(sha_file.read_text().strip())}

[[grants]]
name = "bench"
principals = ["local:user:{SERVICE_USER}"]
events = ["local"]
account = "bench"
images = ["{IMAGE_NAME}"]
mpi = true
network = false
"""
    return parse_policy_text(text, "<bench policy>")


@dataclass(frozen=True)
class PlannedJob:
    spec: JobSpec
    decision: Decision
    plan: SandboxPlan
    launch: tuple[str, ...]  # what the local executor runs on the host
    env: Mapping[str, str]  # the launcher's environment
    workspace: Path  # the executor's working directory


def plan_job(job_text: str, job_dir: Path, host_mpi: HostMpi | None) -> PlannedJob:
    """Decide, verify the image, plan and write the job's files, as `runner.lifecycle.prepare` does.

    `runner.lifecycle.prepare.Site` is not used: it plans for the user it runs as, and this script
    runs as root while the jobs run as the service account, as they do in production.
    """
    spec = parse_job_text(job_text, f"<{job_dir.name}>")
    policy = bench_policy()
    identity = identity_from_json({"source": "local", "user": SERVICE_USER})
    decision = decide(policy, identity, spec)
    if not decision.allowed:
        raise BenchError(f"the bench policy denies {spec.name}: {'; '.join(decision.reasons)}")
    image = verify_image(policy.images[spec.image])
    paths = JobPaths(job_id=job_dir.name, workspace=str(service_dir(job_dir / "work")),
                     scratch=str(service_dir(job_dir / "tmp")), meta=str(service_dir(job_dir / "meta")))
    service_dir(job_dir)
    plan = plan_sandbox(spec, decision, image.path, paths, SandboxSite(), host_mpi)
    service_file(Path(paths.env_file), plan.env_file, 0o600)
    if plan.script is not None:
        service_file(Path(paths.script_file), plan.script, 0o600)
    launch = plan_local_launch(plan, spec, decision, host_mpi)
    # The executor's environment is the plan's host_env alone; HOME is added so that every
    # variant of a benchmark starts from the same SERVICE_ENV.
    env = {**SERVICE_ENV, **plan.host_env}
    return PlannedJob(spec, decision, plan, launch, env, Path(paths.workspace))


def timestamped_lines_job(lines: int, interval: float) -> str:
    """A job file printing `lines` lines `line N SECONDS.NANOSECONDS` (the wall clock at the write),
    one every `interval` seconds: a log's latency is read from its lines (same machine, same clock)."""
    script = (f'i=0\nwhile [ "$i" -lt {lines} ]; do i=$((i + 1)); echo "line $i $(date +%s.%N)"; '
              f"sleep {interval}; done\n")
    return f"[job]\nname = \"log-latency\"\nimage = \"{IMAGE_NAME}\"\nscript = '''\n{script}'''\n" \
           "[job.resources]\ntime = \"5m\"\n"


def timestamped_line(line: bytes) -> tuple[int, float] | None:
    """(N, when it was written) of a line of `timestamped_lines_job`; None for any other line."""
    words = line.split()
    if len(words) != 3 or words[0] != b"line":
        return None
    try:
        return int(words[1]), float(words[2])
    except ValueError:
        return None


# -- statistics ---------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    return {"n": len(values), "median": statistics.median(values), "p10": percentile(values, 10),
            "p90": percentile(values, 90), "min": min(values), "max": max(values)}


def latency_ms(values: Sequence[float]) -> dict[str, float | int]:
    """Latencies in seconds as n and p50/p90/p99/max in milliseconds."""
    return {"n": len(values), **{key: round(1000 * percentile(values, q), 2)
                                 for key, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}}


def paired_ratios(candidate: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-round ratios: both runs of a round saw about the same load on a shared machine."""
    return [c / b for c, b in zip(candidate, baseline, strict=True)]


def ratio_interval(candidate: Sequence[float], baseline: Sequence[float], *, level: float = 0.95,
                   resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap confidence interval of median(candidate) / median(baseline).

    Whole rounds are resampled, keeping each candidate run with the baseline run of its round,
    so that a round a neighbour slowed down counts for both sides. A fixed seed makes a
    report reproducible from its samples.
    """
    rng = random.Random(0)
    count = len(candidate)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(count) for _ in range(count)]
        ratios.append(statistics.median(candidate[i] for i in picks)
                      / statistics.median(baseline[i] for i in picks))
    tail = (1.0 - level) / 2.0 * 100.0
    return percentile(ratios, tail), percentile(ratios, 100.0 - tail)


def other_load(runs: Iterable[Run]) -> float:
    """Cores' worth of other work over all of `runs` together."""
    runs = list(runs)
    return sum(r.other_cpu_seconds for r in runs) / sum(r.seconds for r in runs)


def rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    """The round's order: each variant takes every position equally often (ABC, BCA, CAB...)."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


# -- the hub, a process of its own --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def root_secret(path: Path, text: str) -> Path:
    """A secret file of this process's user (0600), as the hub reads its secrets."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def oidc_table(name: str, issuer: str, audience: str, kind: str) -> str:
    """An `[[oidc]]` table of a config: the issuer whose tokens are trusted."""
    return (f"[[oidc]]\nname = {json.dumps(name)}\nissuer = {json.dumps(issuer)}\n"
            f"audience = {json.dumps(audience)}\nkind = {json.dumps(kind)}\n")


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` itself (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class HubProcess:
    """`python -m runner hub` from this checkout on 127.0.0.1, trusting the tokens of `oidc` (an
    `oidc_table`) and agents holding `agent_token`; its CPU time and memory from /proc.

    With `login` (the keys of a `[login]` table), the hub serves its dashboard to people logged in
    at that provider, and its public URL is its own loopback one, where the browser comes back to."""

    def __init__(self, root: Path, *, oidc: str, agent_token: str, login: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        public_url = "https://hub.example.org" if login is None else self.url
        login_table = "" if login is None else f"\n[login]\n{login}"
        tokens = root_secret(root / "agent-tokens", f"bench:{agent_token}\n")
        secret = root_secret(root / "webhook-secret", "bench-webhook-secret\n")
        self.config = root / "hub.toml"
        self.config.write_text(f"""state_dir = "{root / 'agent-state'}"

[hub]
listen = "127.0.0.1:{self.port}"
webhook_secret_file = "{secret}"
agent_tokens_file = "{tokens}"
state_dir = "{root / 'hub-state'}"
public_url = "{public_url}"

{oidc}{login_table}""")
        self.log = root / "hub.log"
        self.argv = [sys.executable, "-m", "runner", "hub", "--config", str(self.config)]
        with open(self.log, "ab") as stderr:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr)

    async def ready(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the hub exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(self.url + "/healthz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise BenchError(f"the hub did not start listening:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise BenchError(f"no {key} in /proc/{self.proc.pid}/status")

    def peak_rss_mb(self) -> float:
        return round(self._status_kib("VmHWM") / 1024, 1)

    def rss_mb(self) -> float:
        return round(self._status_kib("VmRSS") / 1024, 1)

    def reset_peak_rss(self) -> None:
        # "5" resets VmHWM to the current RSS (proc(5), clear_refs), so a phase's peak is its own.
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- the machine and the results ----------------------------------------------------------------

def _first_line(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def _checkout() -> dict[str, Any]:
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                            text=True, timeout=60, check=False)
    return {"commit": commit, "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def machine_info() -> dict[str, Any]:
    """What the numbers depend on, recorded beside them."""
    mpirun = _first_line(["mpirun", "--version"])
    version = re.search(r"\(Open MPI\)\s+(\S+)", mpirun)
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "os": _os_name(),
        "apptainer": _first_line(["apptainer", "--version"]).removeprefix("apptainer version "),
        "openmpi": version.group(1) if version else mpirun,
        "python": platform.python_version(),
        "loadavg_at_start": [round(value, 2) for value in load],
        "checkout": _checkout(),
    }


def write_results(path: Path, results: Mapping[str, Any]) -> Path:
    """Write atomically, so an interrupted run never leaves half a result file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a short run (seconds) that checks the benchmark works; numbers are rough")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help="where to write the JSON results (default: %(default)s)")


def main_guard(run: Callable[[], int]) -> int:
    """Run `run()`; a BenchError becomes a one-paragraph message and exit status 1."""
    try:
        return run()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
