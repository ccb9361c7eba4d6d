"""The hub's jobs API under load: submissions, followed logs, 200 followers, log throughput.

`hpc-runner hub` runs as a process of its own on 127.0.0.1 (`python -m runner hub` from this
checkout, its SQLite store on the local disk), so its CPU time and peak RSS are its own. Tokens
are GitHub Actions ID tokens minted by the OIDC issuer emulator (`tests/fakes/oidc_issuer.py`),
which runs in this process; the hub fetches its keys and verifies every token as in production.
Users make the requests `hpc-runner remote` makes (a submission, then the job's log followed
with `GET /api/v1/jobs/ID/log?offset=0&follow=1`, read as bytes arrive); the agent is the API
source's client (`runner.sources.api.client`, and `runner.sources.api.report.HubReport` for a log
file).

- submission: `POST /api/v1/jobs` with 1000 jobs already stored, interleaved with the baseline
  `GET /api/v1/status` (the HTTP path and the store, no token to verify). Target: p99 < 50 ms.
- log latency: the agent appends a line every 50 ms to a leased job's log while a user follows
  it (`GET .../log?follow=1`); lag = line read by the user - line's append started,
  same clock. Target: p99 < 1 s.
- 200 followers: the same with 200 users following one job's log at once; the hub's CPU (% of
  one core) and peak RSS (VmHWM, reset before they connect), beside one follower.
- throughput: an N MiB log file sent by the agent's publishing code (`HubReport.send_log`: the
  file follower's 64 KiB chunks, one append each) and in raw 4 MiB appends (the hub's limit),
  MB/s, beside `cat` of the same file to /dev/null, interleaved in the same run.

    /opt/hpc-runner/venv/bin/python bench/hub_api.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Measure the checkout's code, not the copies installed in the venv.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import aiohttp  # noqa: E402
from fakes.oidc_issuer import OidcIssuerEmulator  # noqa: E402

from bench._common import (  # noqa: E402
    BenchError,
    HubProcess,
    common_arguments,
    latency_ms,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    oidc_table,
    percentile,
    rotated,
    write_results,
)
from runner.gateway import jobs_protocol as protocol  # noqa: E402
from runner.gateway.protocol import STATUS_PATH  # noqa: E402
from runner.sources.api.client import HubClient as AgentClient  # noqa: E402
from runner.sources.api.report import HubReport  # noqa: E402
from runner.sources.api.state import ApiJob, ApiState  # noqa: E402

NAME = "hub_api"
AUDIENCE = "hpc-runner"
AGENT_TOKEN = "bench-agent-0123456789abcdef0123456789abcdef"
REPOSITORY = "octo-org/octo-repo"
CLUSTER = "bench"
STORED_CLUSTER = "elsewhere"   # the stored jobs are never leased by this benchmark's agent
JOB = {"name": "bench", "image": "test", "command": ["true"], "resources": {"time": "1m"}}
LINE = b"%08d " + b"x" * 90 + b"\n"
LINE_INTERVAL_S = 0.05
WARM_UP = 0   # the sequence number of the line that is not measured
RAW_APPEND_BYTES = protocol.MAX_LOG_APPEND_BYTES
TARGET_SUBMIT_P99_S = 0.05
TARGET_LOG_P99_S = 1.0
# A minted token lives 300 s; a fresh one is minted well before.
TOKEN_REFRESH_S = 120.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    stored: int
    submissions: int
    latency_seconds: float
    followers: int
    crowd_seconds: float
    file_mib: int
    throughput_rounds: int


FULL = Settings(stored=1000, submissions=300, latency_seconds=60, followers=200, crowd_seconds=30,
                file_mib=64, throughput_rounds=3)
QUICK = Settings(stored=200, submissions=40, latency_seconds=3, followers=200, crowd_seconds=3,
                 file_mib=8, throughput_rounds=1)


@dataclass
class Bench:
    hub: HubProcess
    issuer: OidcIssuerEmulator
    http: aiohttp.ClientSession
    agent: AgentClient
    state: ApiState
    _token: tuple[float, str] = field(default=(0.0, ""))

    def token(self) -> str:
        minted, token = self._token
        if time.monotonic() - minted > TOKEN_REFRESH_S:
            token = self.issuer.mint("github", aud=AUDIENCE, repository=REPOSITORY,
                                     repository_owner=REPOSITORY.split("/")[0])
            self._token = (time.monotonic(), token)
        return token

    def _user_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /api/v1/jobs` as a user: the hub's answer ({"id", "url", "state"})."""
        async with self.http.post(self.hub.url + protocol.JOBS_PATH, json=body,
                                  headers=self._user_headers()) as response:
            answer = await response.json()
            if response.status != 201:
                raise BenchError(f"a submission was answered {response.status}: {answer}")
            return dict(answer)

    async def follow_log(self, job_id: str, sink: Callable[[bytes], Awaitable[None]]) -> None:
        """A user following the job's log from its start until the hub ends the stream (the job ended)."""
        async with self.http.get(f"{self.hub.url}{protocol.job_log_path(job_id)}?offset=0&follow=1",
                                 headers=self._user_headers(),
                                 timeout=aiohttp.ClientTimeout(total=None)) as response:
            if response.status != 200:
                raise BenchError(f"following job {job_id}'s log was answered {response.status}")
            async for data in response.content.iter_any():
                await sink(data)

    async def leased_job(self) -> str:
        """A job submitted by a user, leased by the agent and running: its log is the agent's."""
        submitted = await self.submit({"job": JOB, "cluster": CLUSTER})
        lease = await self.agent.lease(CLUSTER, wait=0)
        if lease is None or lease.id != submitted["id"]:
            raise BenchError(f"the agent did not lease job {submitted['id']} (got {lease})")
        await self.agent.publish(lease.id, "running")
        return lease.id


@contextlib.asynccontextmanager
async def started_bench(root: Path) -> AsyncIterator[Bench]:
    async with OidcIssuerEmulator() as issuer, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        hub = HubProcess(root, oidc=oidc_table("github-actions", issuer.url, AUDIENCE, "github"),
                         agent_token=AGENT_TOKEN)
        try:
            await hub.ready(http)
            state = ApiState.open(root / "api-state")
            async with AgentClient(hub.url, AGENT_TOKEN, session=http) as agent:
                yield Bench(hub, issuer, http, agent, state)
        finally:
            hub.stop()


# -- 1: submissions with jobs stored -------------------------------------------------------------

async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def submissions(bench: Bench, settings: Settings) -> dict[str, Any]:
    body = {"job": JOB, "cluster": STORED_CLUSTER}
    for first in range(0, settings.stored, 10):
        await asyncio.gather(*(bench.submit(body) for _ in range(min(10, settings.stored - first))))

    async def submit() -> None:
        await bench.submit(body)

    async def status() -> None:
        async with bench.http.get(bench.hub.url + STATUS_PATH,
                                  headers={"Authorization": f"Bearer {AGENT_TOKEN}"}) as response:
            await response.read()
            if response.status != 200:
                raise BenchError(f"{STATUS_PATH} answered {response.status}")

    variants: dict[str, Callable[[], Awaitable[None]]] = {"submit": submit, "status": status}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name in variants:     # warm-up: connections open, the issuer's keys fetched
        await variants[name]()
    cpu = bench.hub.cpu_seconds()
    for index in range(settings.submissions):
        for name in rotated(list(variants), index):
            times[name].append(await timed(variants[name]))
    p50s = {name: percentile(values, 50) for name, values in times.items()}
    return {"stored_before": settings.stored, "submit_ms": latency_ms(times["submit"]),
            "status_ms": latency_ms(times["status"]),
            "ratio_p50_to_status": round(p50s["submit"] / p50s["status"], 2),
            "hub_cpu_ms_per_submit_and_status": round(
                1000 * (bench.hub.cpu_seconds() - cpu) / settings.submissions, 2),
            "hub_rss_mb": bench.hub.rss_mb(),
            "target_met": percentile(times["submit"], 99) < TARGET_SUBMIT_P99_S}


# -- 2 and 3: followed logs ----------------------------------------------------------------------

class Follower:
    """One user following a job's log; the lag of each line it reads."""

    def __init__(self, sent: dict[int, float]) -> None:
        self._sent = sent
        self._partial = b""
        self.lags: list[float] = []
        self.reading = asyncio.Event()   # set once the first line (the warm-up line) arrived

    async def sink(self, data: bytes) -> None:
        now = time.perf_counter()
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            seq = int(line[:8])
            if seq == WARM_UP:
                self.reading.set()
            else:
                self.lags.append(now - self._sent[seq])


async def followed(bench: Bench, followers: int, seconds: float) -> dict[str, Any]:
    job_id = await bench.leased_job()
    sent: dict[int, float] = {}
    crowd = [Follower(sent) for _ in range(followers)]
    bench.hub.reset_peak_rss()
    reading = [asyncio.create_task(bench.follow_log(job_id, follower.sink)) for follower in crowd]
    # A first line that every follower reads before the clock starts: all of them are connected.
    offset = await bench.agent.append_log(job_id, 0, LINE % WARM_UP)
    await asyncio.wait_for(asyncio.gather(*(follower.reading.wait() for follower in crowd)), 60)
    cpu, own, start = bench.hub.cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    lines, due = int(seconds / LINE_INTERVAL_S), start
    appends: list[float] = []   # the agent's append requests, answered
    for seq in range(1, lines + 1):
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        due += LINE_INTERVAL_S
        sent[seq] = time.perf_counter()
        offset = await bench.agent.append_log(job_id, offset, LINE % seq)
        appends.append(time.perf_counter() - sent[seq])
    elapsed, cpu = time.perf_counter() - start, bench.hub.cpu_seconds() - cpu
    own = _own_cpu_seconds() - own
    await bench.agent.publish(job_id, "succeeded", exit_status=0)
    await asyncio.wait_for(asyncio.gather(*reading), 60)
    lags = [lag for follower in crowd for lag in follower.lags]
    if len(lags) != lines * followers:
        raise BenchError(f"the followers read {len(lags)} lines of {lines * followers}")
    return {"followers": followers, "lines": lines, "seconds": round(elapsed, 1), "lag_ms": latency_ms(lags),
            "append_ms": latency_ms(appends),
            "hub_cpu_percent": round(100 * cpu / elapsed, 1), "hub_peak_rss_mb": bench.hub.peak_rss_mb(),
            # The users and the agent share the machine's 2 cores with the hub.
            "bench_process_cpu_percent": round(100 * own / elapsed, 1),
            "target_met": percentile(lags, 99) < TARGET_LOG_P99_S}


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- 4: throughput -------------------------------------------------------------------------------

def write_log_file(path: Path, mib: int) -> Path:
    block = b"".join(LINE % n for n in range(MIB // len(LINE) + 1))[:MIB]
    with open(path, "wb") as out:
        for _ in range(mib):
            out.write(block)
    return path


async def throughput(bench: Bench, settings: Settings, path: Path) -> dict[str, Any]:
    size = path.stat().st_size

    async def cat() -> None:
        result = await asyncio.to_thread(subprocess.run, ["cat", str(path)], stdout=subprocess.DEVNULL,
                                         check=False)
        if result.returncode != 0:
            raise BenchError(f"cat {path} exited {result.returncode}")

    def refuse_policy() -> Any:
        raise BenchError("the log's publication needs no policy")

    async def publishing_code(job_id: str) -> None:
        job = ApiJob(hub_id=job_id, job={}, identity={}, issuer="github-actions", repository=None,
                     commit=None)
        report = HubReport(bench.agent, job, state=bench.state, log_path=path, policy=refuse_policy)
        await report.send_log()
        if report.broken is not None or report.acknowledged != size:
            raise BenchError(f"the hub took {report.acknowledged} of {size} bytes: {report.broken}")

    async def raw_appends(job_id: str) -> None:
        offset = 0
        with open(path, "rb") as log_file:
            while data := await asyncio.to_thread(log_file.read, RAW_APPEND_BYTES):
                offset = await bench.agent.append_log(job_id, offset, data)
        if offset != size:
            raise BenchError(f"the hub took {offset} of {size} bytes")

    agents: dict[str, Callable[[str], Awaitable[None]]] = {
        "agent's publishing code (64 KiB appends)": publishing_code, "raw 4 MiB appends": raw_appends}
    seconds: dict[str, list[float]] = {"cat": [], **{name: [] for name in agents}}
    hub_cpu: dict[str, float] = {name: 0.0 for name in agents}
    await cat()   # warm-up: the file in the page cache for every variant
    for index in range(settings.throughput_rounds):
        for name in rotated(list(seconds), index):
            if name == "cat":
                seconds[name].append(await timed(cat))
                continue
            job_id = await bench.leased_job()
            cpu = bench.hub.cpu_seconds()
            seconds[name].append(await timed(lambda: agents[name](job_id)))   # noqa: B023
            hub_cpu[name] += bench.hub.cpu_seconds() - cpu
            await bench.agent.publish(job_id, "succeeded", exit_status=0)
    cat_mb_s = size / 1e6 / percentile(seconds["cat"], 50)
    variants: dict[str, Any] = {}
    for name, values in seconds.items():
        mb_s = size / 1e6 / percentile(values, 50)
        variants[name] = {"mb_s": round(mb_s, 1), "seconds": [round(value, 3) for value in values],
                          "ratio_to_cat": round(mb_s / cat_mb_s, 4)}
        if name in hub_cpu:
            variants[name]["hub_cpu_s_per_mib"] = round(hub_cpu[name] / len(values) / (size / MIB), 4)
    return {"file_bytes": size, "rounds": settings.throughput_rounds, "variants": variants,
            "hub_peak_rss_mb": bench.hub.peak_rss_mb()}


# -- the run -------------------------------------------------------------------------------------

async def measure_all(settings: Settings, root: Path) -> tuple[dict[str, Any], list[str]]:
    async with started_bench(root) as bench:
        results: dict[str, Any] = {"submission": await submissions(bench, settings)}
        results["log_latency"] = await followed(bench, 1, settings.latency_seconds)
        results["followers"] = await followed(bench, settings.followers, settings.crowd_seconds)
        log_file = write_log_file(root / "job.log", settings.file_mib)
        results["throughput"] = await throughput(bench, settings, log_file)
        return results, bench.hub.argv


def report(results: dict[str, Any]) -> None:
    def met(flag: bool) -> str:
        return "met" if flag else "**missed**"

    sub, lat, crowd, put = (results[key] for key in ("submission", "log_latency", "followers", "throughput"))

    def ms(stats: dict[str, Any]) -> str:
        return f"{stats['p50']} / {stats['p99']} ms"

    rows = [
        [f"submit (`POST /api/v1/jobs`), {sub['stored_before']}+ jobs stored", ms(sub["submit_ms"]),
         f"{sub['ratio_p50_to_status']}× status", f"p99 < 50 ms: {met(sub['target_met'])}"],
        ["baseline: `GET /api/v1/status`", ms(sub["status_ms"]), "1×", ""],
        [f"log lag, 1 follower ({lat['lines']} lines)", ms(lat["lag_ms"]),
         f"hub {lat['hub_cpu_percent']}% CPU, {lat['hub_peak_rss_mb']} MB",
         f"p99 < 1 s: {met(lat['target_met'])}"],
        [f"log lag, {crowd['followers']} followers", ms(crowd["lag_ms"]),
         f"hub {crowd['hub_cpu_percent']}% CPU, {crowd['hub_peak_rss_mb']} MB", "CPU, RSS reported"],
    ]
    mib = put["file_bytes"] // MIB
    for name, entry in put["variants"].items():
        rows.append([f"{mib} MiB log: {name}", f"{entry['mb_s']} MB/s", f"{entry['ratio_to_cat']:.3f}× cat",
                     "" if name == "cat" else "reported beside cat"])
    print(markdown_table(["variant", "p50 / p99 (or rate)", "ratio, hub cost", "target"], rows))


def measure(quick: bool, output: Path | None) -> int:
    started = time.monotonic()
    settings = QUICK if quick else FULL
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="hpc-runner-hub-bench-", dir="/var/tmp") as tmp:
        results, argv = asyncio.run(measure_all(settings, Path(tmp)))
    report(results)
    document = {"benchmark": NAME, "date": now_utc(), "quick": quick,
                "settings": {**dataclasses.asdict(settings), "line_interval_s": LINE_INTERVAL_S,
                             "target_submit_p99_s": TARGET_SUBMIT_P99_S,
                             "target_log_p99_s": TARGET_LOG_P99_S},
                "machine": machine, "commands": {"hub": argv}, "results": results,
                "loadavg_at_end": [round(value, 2) for value in os.getloadavg()],
                "duration_seconds": round(time.monotonic() - started, 1)}
    path = write_results(output or REPO / "bench" / "results" / f"{NAME}.json", document)
    print(f"results written to {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    common_arguments(parser, NAME)
    args = parser.parse_args()
    return main_guard(lambda: measure(args.quick, args.output))


if __name__ == "__main__":
    sys.exit(main())
