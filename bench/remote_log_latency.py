"""Log latency through the hub: a job's line, written on the cluster, read from `hpc-runner remote run`.

Every component is real but the token's issuer:

- `hpc-runner hub` (`python -m runner hub` from this checkout, as root, on 127.0.0.1), trusting the
  ID tokens of a site's identity provider (an `[[oidc]]` issuer of kind generic); the tokens are
  minted by the OIDC issuer emulator (`tests/fakes/oidc_issuer.py`) in this process, and the hub and
  the agent fetch its keys and verify every token as in production;
- `hpc-runner agent` of the installed package (the venv this script runs in), as the service
  account, leasing the hub's API jobs for cluster `dev` and running them through Slurm and
  Apptainer on the dev cluster (`deploy/dev`);
- `python -m runner remote run JOB.toml --hub URL --cluster dev --token-file F` (this checkout), as a
  user runs it; its standard output is read line by line as it arrives.

The job (no repository: an empty workspace) prints `line N SECONDS` every 0.135 s, SECONDS being the
wall clock of the write. Lag = line read from `remote run`'s stdout - the time in the line (same
machine, same clock); the target is p99 < 1 s. The baseline, in the same run and for the same lines,
is the job's output file (`output.log` in its job directory on the cluster, the file the agent
reads) followed directly every 10 ms: the difference, line by line, is what the path through the
agent, the hub and the client adds.

    sudo /opt/hpc-runner/venv/bin/python bench/remote_log_latency.py [--lines N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The hub and the client from this checkout, not the copies installed in the venv.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import aiohttp  # noqa: E402
from fakes.oidc_issuer import OidcIssuerEmulator  # noqa: E402

from bench._common import (  # noqa: E402
    SERVICE_ENV,
    SERVICE_USER,
    START_TIMEOUT_S,
    BenchError,
    HubProcess,
    check_environment,
    common_arguments,
    latency_ms,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    oidc_table,
    percentile,
    process_cpu_seconds,
    root_secret,
    service_file,
    service_workdir,
    timestamped_line,
    timestamped_lines_job,
    write_results,
)
from bench._slurm import check_slurm, slurm_policy_text  # noqa: E402
from runner.logs.tail import LineAssembler, follow  # noqa: E402

NAME = "remote_log_latency"
AUDIENCE = "hpc-runner"
AGENT_TOKEN = "bench-agent-0123456789abcdef0123456789abcdef"
CLUSTER = "dev"
USER = "alice"                    # the identity provider's user the tokens name
# The job's pause between two lines. With the few milliseconds each line costs, two lines are about
# 0.38 of the agent's 0.1 s file reads apart, which spreads the lines evenly over the phases of those
# reads: at 0.1 s they would drift through them by a fraction of a millisecond a line, at 0.15 s
# alternate between two, and a run of a few dozen lines would see one part of the distribution.
INTERVAL = 0.135
FILE_POLL_S = 0.01                # the baseline's reads of the job's output file
# How often the agent reads a running job's output file (the file follower's default).
AGENT_POLL_S = inspect.signature(follow).parameters["poll_interval"].default
TARGET_P99_S = 1.0
FULL_LINES = 400
QUICK_LINES = 40
JOB_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 10.0
AGENT = Path(sys.prefix) / "bin" / "hpc-runner"
SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin") or "/usr/bin/setpriv"
# What `remote run` says on stderr once the hub took the job.
SUBMITTED = re.compile(r"hpc-runner: job (\S+) ")


# -- the agent, as the service account -----------------------------------------------------------

def agent_config(root: Path, hub_url: str, issuer_url: str) -> Path:
    """An agent leasing the hub's API jobs for CLUSTER through Slurm; the policy grants the
    identity provider's USER the dev cluster's bench account and the pinned test image."""
    policy = service_file(root / "policy.toml", slurm_policy_text(f"idp:user:{USER}"), 0o644)
    token = service_file(root / "hub-token", AGENT_TOKEN + "\n", 0o600)
    keys = {"hub_url": hub_url, "hub_token_file": str(token), "cluster": CLUSTER,
            "state_dir": str(root / "state"), "work_root": str(root / "work"), "policy": str(policy),
            "executor": "slurm"}
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    text += "max_jobs = 2\n\n" + oidc_table("site-idp", issuer_url, AUDIENCE, "generic")
    return service_file(root / "agent.toml", text, 0o644)


class AgentProcess:
    """`hpc-runner agent` as the service account, started by setpriv (which execs it, so the
    process is the agent's own: its signals and CPU time); its log in a file."""

    def __init__(self, root: Path, config: Path) -> None:
        if not AGENT.is_file():
            raise BenchError(f"no {AGENT}: run this script with the python of the venv hpc-runner is "
                             "installed in")
        env = {**SERVICE_ENV, "PATH": f"{AGENT.parent}:{SERVICE_ENV['PATH']}", "LANG": "C.UTF-8",
               "USER": SERVICE_USER, "LOGNAME": SERVICE_USER}
        self.argv = [SETPRIV, f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups", "--",
                     str(AGENT), "agent", "--config", str(config)]
        self.log = root / "agent.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out)

    async def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "local queue listening" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise BenchError(f"the agent exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the agent did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    async def stop(self) -> None:
        """Drain, then cancel what still runs (a second SIGTERM), then kill."""
        for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)


# -- one job, read two ways ----------------------------------------------------------------------

@dataclass
class Reads:
    """What the client printed and what the job's output file held, each line with when it was read."""

    remote: list[tuple[float, bytes]] = field(default_factory=list)
    file: list[tuple[float, bytes]] = field(default_factory=list)
    file_attached: float | None = None    # when the baseline began to follow the output file
    stderr: list[str] = field(default_factory=list)
    returncode: int | None = None
    seconds: float = 0.0                  # the client's run, submission to exit
    hub_cpu_seconds: float = 0.0
    agent_cpu_seconds: float = 0.0


async def output_log(work_root: Path, hub_id: str, given_up: asyncio.Task[None]) -> Path | None:
    """The output file of the agent's job for hub job `hub_id` (its log opens with the id), as
    soon as the agent made it; None if the client ended first."""
    opening = f"API job {hub_id} ".encode()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not given_up.done() and time.monotonic() < deadline:
        for path in work_root.glob("*/output.log"):
            with contextlib.suppress(OSError), path.open("rb") as log:
                if opening in log.read(4096):
                    return path
        await asyncio.sleep(FILE_POLL_S)
    return None


def client_argv(hub_url: str, job_file: Path, token_file: Path) -> list[str]:
    return [sys.executable, "-m", "runner", "remote", "run", str(job_file), "--hub", hub_url,
            "--cluster", CLUSTER, "--token-file", str(token_file)]


async def run_client(argv: list[str], root: Path, work_root: Path, hub: HubProcess,
                     agent: AgentProcess) -> Reads:
    """`remote run` to its end, its stdout read line by line; the job's output file followed beside."""
    reads = Reads()
    cpu = hub.cpu_seconds(), agent.cpu_seconds()
    started = time.monotonic()
    client = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, env={"PATH": SERVICE_ENV["PATH"], "HOME": str(root), "LANG": "C.UTF-8"},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert client.stdout is not None and client.stderr is not None
    stdout, stderr = client.stdout, client.stderr
    hub_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read_stderr() -> None:
        async for raw in stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            reads.stderr.append(text)
            if (submitted := SUBMITTED.match(text)) is not None and not hub_id.done():
                hub_id.set_result(submitted.group(1))

    async def read_stdout() -> None:
        while line := await stdout.readline():
            reads.remote.append((time.time(), line))

    async def read_file(client_done: asyncio.Task[None]) -> None:
        either: list[asyncio.Future[Any]] = [hub_id, client_done]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        path = await output_log(work_root, hub_id.result(), client_done) if hub_id.done() else None
        if path is None:
            return
        reads.file_attached = time.time()
        assembler = LineAssembler()
        # The client ends after the job ended at the hub, which is after the agent read the whole file.
        async for _, chunk in follow(path, done=client_done.done, poll_interval=FILE_POLL_S):
            now = time.time()
            reads.file += [(now, line) for line in assembler.feed(chunk)]

    try:
        reading = asyncio.ensure_future(read_stdout())
        await asyncio.wait_for(asyncio.gather(read_stderr(), reading, read_file(reading)), JOB_TIMEOUT_S)
        reads.returncode = await asyncio.wait_for(client.wait(), JOB_TIMEOUT_S)
    except TimeoutError:
        said = "\n".join(reads.stderr[-10:])
        raise BenchError(f"remote run did not end within {JOB_TIMEOUT_S:g} s:\n{said}\n"
                         f"the agent's log:\n{agent.log_tail()}") from None
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    reads.seconds = time.monotonic() - started
    reads.hub_cpu_seconds = hub.cpu_seconds() - cpu[0]
    reads.agent_cpu_seconds = agent.cpu_seconds() - cpu[1]
    return reads


def by_line(reads: list[tuple[float, bytes]], lines: int, what: str) -> dict[int, tuple[float, float]]:
    """N -> (read at, written at) of every line of the job, each exactly once, or BenchError."""
    found: dict[int, tuple[float, float]] = {}
    for at, line in reads:
        if (timed := timestamped_line(line)) is None:
            continue
        number, written = timed
        if number in found:
            raise BenchError(f"{what} gave line {number} twice")
        found[number] = (at, written)
    if sorted(found) != list(range(1, lines + 1)):
        raise BenchError(f"{what} gave {len(found)} of the job's {lines} lines")
    return found


# -- the run -------------------------------------------------------------------------------------

async def measure_job(lines: int, hub_root: Path, agent_root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    async with OidcIssuerEmulator() as issuer, aiohttp.ClientSession() as http:
        hub = HubProcess(hub_root, oidc=oidc_table("site-idp", issuer.url, AUDIENCE, "generic"),
                         agent_token=AGENT_TOKEN)
        try:
            await hub.ready(http)
            agent = AgentProcess(agent_root, agent_config(agent_root, hub.url, issuer.url))
            try:
                await agent.ready()
                job_file = hub_root / "job.toml"
                job_file.write_text(timestamped_lines_job(lines, INTERVAL))
                # Minted just before the submission: a token lives 5 minutes, and the client shows
                # it with every request.
                token_file = root_secret(hub_root / "token",
                                         issuer.mint("generic", aud=AUDIENCE, preferred_username=USER) + "\n")
                argv = client_argv(hub.url, job_file, token_file)
                reads = await run_client(argv, hub_root, agent_root / "work", hub, agent)
                if reads.returncode != 0:
                    said = "\n".join(reads.stderr[-10:])
                    raise BenchError(f"remote run exited {reads.returncode}:\n{said}\n"
                                     f"the agent's log:\n{agent.log_tail()}")
            finally:
                await agent.stop()
        except BenchError as error:
            raise BenchError(f"{error}\nthe hub's log:\n{hub.log_tail()}") from None
        finally:
            hub.stop()
    commands = {"hub": hub.argv, "agent": agent.argv, "client": argv,
                "job": job_file.read_text()}
    return analyse(reads, lines), commands


def analyse(reads: Reads, lines: int) -> dict[str, Any]:
    remote = by_line(reads.remote, lines, "remote run's stdout")
    in_file = by_line(reads.file, lines, "the job's output file")
    attached = reads.file_attached or 0.0
    # A line in the file before the baseline followed it would be read late for no reason of its own.
    paired = [n for n in sorted(in_file) if in_file[n][1] >= attached]
    remote_lags = [at - written for at, written in remote.values()]
    file_lags = [in_file[n][0] - in_file[n][1] for n in paired]
    added = [remote[n][0] - in_file[n][0] for n in paired]
    written = [remote[n][1] for n in sorted(remote)]
    return {
        "lines": lines,
        "remote_run": {"lag_ms": latency_ms(remote_lags)},
        "output_file": {"lag_ms": latency_ms(file_lags), "lines_before_followed": lines - len(paired)},
        "added_by_hub_path": {"ms": latency_ms(added)},
        "job_printing_seconds": round(written[-1] - written[0], 1),
        "client_seconds": round(reads.seconds, 1),
        # CPU over the client's whole run (queueing and the job's start included).
        "hub_cpu_percent": round(100 * reads.hub_cpu_seconds / reads.seconds, 1),
        "agent_cpu_percent": round(100 * reads.agent_cpu_seconds / reads.seconds, 1),
        "target_met": percentile(remote_lags, 99) < TARGET_P99_S,
        "samples_ms": {"remote_run": [round(1000 * (remote[n][0] - remote[n][1]), 1) for n in sorted(remote)],
                       "output_file": [round(1000 * lag, 1) for lag in file_lags]},
    }


def report(results: dict[str, Any]) -> None:
    def row(name: str, stats: dict[str, Any], target: str) -> list[str]:
        return [name, *(f"{stats[key]:.0f}" for key in ("p50", "p90", "p99", "max")), target]

    met = "met" if results["target_met"] else "**missed**"
    print(f"Log latency through the hub, {results['lines']} lines every {INTERVAL * 1000:.0f} ms:\n")
    print(markdown_table(["variant", "p50 ms", "p90 ms", "p99 ms", "max ms", "target"], [
        row("line written -> read from `remote run`'s stdout", results["remote_run"]["lag_ms"],
            f"p99 < {TARGET_P99_S:g} s: {met}"),
        row(f"baseline: line written -> read from the job's output file ({FILE_POLL_S * 1000:.0f} ms poll)",
            results["output_file"]["lag_ms"], ""),
        row("added by agent, hub and client (per line: stdout - file)",
            results["added_by_hub_path"]["ms"], ""),
    ]))
    print(f"\nhub {results['hub_cpu_percent']}% and agent {results['agent_cpu_percent']}% of a core "
          f"over the client's {results['client_seconds']} s")


def measure(lines: int, quick: bool, output: Path) -> int:
    started = time.monotonic()
    check_environment()
    check_slurm()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="hpc-runner-remote-bench-", dir="/var/tmp") as tmp, \
            service_workdir("remote-log-latency-") as agent_root:
        results, commands = asyncio.run(measure_job(lines, Path(tmp), agent_root))
    report(results)
    document = {"benchmark": NAME, "date": now_utc(), "quick": quick,
                "settings": {"lines": lines, "interval_s": INTERVAL, "file_poll_interval_s": FILE_POLL_S,
                             "agent_log_poll_interval_s": AGENT_POLL_S, "cluster": CLUSTER,
                             "target_p99_s": TARGET_P99_S},
                "machine": machine, "commands": commands, "results": results,
                "loadavg_at_end": [round(value, 2) for value in os.getloadavg()],
                "duration_seconds": round(time.monotonic() - started, 1)}
    write_results(output, document)
    print(f"results written to {output}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--lines", type=int, default=None,
                        help=f"how many lines the job prints (default {FULL_LINES}, --quick {QUICK_LINES})")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    lines = args.lines or (QUICK_LINES if args.quick else FULL_LINES)
    return main_guard(lambda: measure(lines, args.quick, args.output))


if __name__ == "__main__":
    sys.exit(main())
