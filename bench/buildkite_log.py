"""Buildkite log streaming: throughput, line latency, and the cost of 50 jobs at once.

The agent's side (`runner.sources.buildkite.report.LogStreamer` with its durable outbox in the
Buildkite source's real state file, fed by the agent's file follower) runs in a child process, so its CPU time
and peak RSS are its own; the agent API emulator runs in this process and records when each
chunk arrives.

- throughput: a job output file of N MiB from offset 0 to the emulator, MB/s; baseline: `cat`
  of the same file to /dev/null in the same run. Targets: >= 50 MB/s, peak RSS < 150 MB.
- latency: a line every 50 ms written to a followed file; lag = chunk received - line written,
  same clock, with the default 1 s chunk interval. Target: p99 < 1.5 s.
- 50 jobs: 50 streamers, each following its own file (10 lines a second) and polling its job
  state every second; the agent side's CPU time and peak RSS.

    sudo /opt/hpc-runner/venv/bin/python bench/buildkite_log.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
# Measure the checkout's code, not the copies installed in the venv.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench._common import (  # noqa: E402
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    percentile,
    write_results,
)

NAME = "buildkite_log"
T = TypeVar("T")
STAMP = re.compile(rb"\x1b_bk;t=\d+\x07")
TARGET_MB_S = 50.0
TARGET_RSS_MB = 150.0
TARGET_P99_S = 1.5
LINE = b"%08d " + b"x" * 90 + b"\n"


# -- the agent's side, in a child process -------------------------------------------------------

async def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    from runner.logs.tail import follow
    from runner.sources.buildkite import protocol
    from runner.sources.buildkite.client import AgentSession
    from runner.sources.buildkite.report import LogSettings, LogStreamer
    from runner.sources.buildkite.state import AcceptedJob, BuildkiteState, JobMemory

    memory = JobMemory(BuildkiteState.open(Path(spec["state_dir"])))
    stop = Path(spec["stop_file"]) if spec.get("stop_file") else None
    async with aiohttp.ClientSession() as http:
        session = AgentSession(http, spec["url"], "unused")

        async def one(job: dict[str, str]) -> None:
            state = AcceptedJob(bk_id=job["id"], job={}, token=job["token"], request_headers={},
                             job_status_interval=1)
            memory.save(state)
            streamer = LogStreamer(session, job["id"], job["token"], LogSettings(100 * 1024, 1, 1 << 30),
                                   secrets=["not-in-the-log-secret"], outbox=memory.outbox(state))
            streamer.start()
            poller = asyncio.create_task(poll_state(job)) if spec.get("poll_state") else None
            done: Callable[[], bool] = (lambda: True) if stop is None else stop.exists
            async for offset, data in follow(Path(job["file"]), offset=0, done=done):
                await streamer.sink(offset, data)
            await streamer.close()
            if poller is not None:
                poller.cancel()

        async def poll_state(job: dict[str, str]) -> None:
            import random
            rng = random.Random()
            while True:
                await asyncio.sleep(protocol.jittered(1, rng))
                await session.call(protocol.job_state(job["id"]), job_token=job["token"])

        started = time.monotonic()
        await asyncio.gather(*(one(job) for job in spec["jobs"]))
        elapsed = time.monotonic() - started
    # VmHWM, not ru_maxrss: the latter also counts the parent's pages at the fork before exec.
    status = Path("/proc/self/status").read_text()
    peak_kb = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return {"elapsed": elapsed, "peak_rss_mb": peak_kb / 1024}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the agent's side; its result with its CPU seconds and peak RSS (MB)."""
    process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"the agent side failed ({process.returncode}): {out}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


# -- the emulator, on a thread of this process --------------------------------------------------

class Emulator:
    def __init__(self) -> None:
        from fakes.buildkite_api import BuildkiteEmulator
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.bk = BuildkiteEmulator()
        self.run(self.bk.start())

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(600)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()
        return self.run(wrapped())

    def running_jobs(self, count: int) -> list[dict[str, str]]:
        """`count` jobs accepted and started by an agent, ready for chunks."""
        return self.run(self._start_jobs(count))

    async def _start_jobs(self, count: int) -> list[dict[str, str]]:
        import aiohttp
        from fakes.buildkite_api import make_job

        from runner.sources.buildkite import protocol
        from runner.sources.buildkite.client import AgentSession
        jobs = []
        async with aiohttp.ClientSession() as http:
            for _ in range(count):
                session = AgentSession(http, self.bk.url, self.bk.registration_token)
                register = protocol.register(name="bench", hostname="h", tags=(), version="1", pid=1)
                answer = await session.call(register)
                session.session_token = protocol.parse_register(answer.data).access_token
                await session.call(protocol.connect())
                job_id = self.bk.queue_job(make_job("bench"))
                await session.call(protocol.ping())
                job = (await session.call(protocol.accept(job_id))).data
                await session.call(protocol.start(job_id), job_token=job["token"])
                jobs.append({"id": job_id, "token": job["token"]})
        return jobs

    def close(self) -> None:
        self.run(self.bk.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


# -- the measurements ---------------------------------------------------------------------------

def throughput(emulator: Emulator, workdir: Path, mib: int) -> dict[str, Any]:
    path = workdir / "output.log"
    lines = mib * 1024 * 1024 // len(LINE % 0)
    with path.open("wb") as handle:
        for i in range(lines):
            handle.write(LINE % i)
    size = path.stat().st_size
    started = time.monotonic()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    cat_s = time.monotonic() - started
    (job,) = emulator.running_jobs(1)
    result = run_child({"url": emulator.bk.url, "state_dir": str(workdir / "state"),
                        "jobs": [{**job, "file": str(path)}]})
    log = emulator.call(lambda: emulator.bk.log(job["id"]))
    if STAMP.sub(b"", log) != path.read_bytes():
        raise RuntimeError("the log received differs from the file")
    mb = size / 1e6
    return {"bytes": size, "agent_mb_s": mb / result["elapsed"], "cat_mb_s": mb / cat_s,
            "ratio_to_cat": cat_s / result["elapsed"], "agent_peak_rss_mb": result["peak_rss_mb"],
            "agent_cpu_seconds": result["cpu_seconds"], "elapsed_s": result["elapsed"]}


def latency(emulator: Emulator, workdir: Path, seconds: float) -> dict[str, Any]:
    path = workdir / "latency.log"
    path.touch()
    stop = workdir / "latency.stop"
    (job,) = emulator.running_jobs(1)
    spec = {"url": emulator.bk.url, "state_dir": str(workdir / "state-latency"), "stop_file": str(stop),
            "jobs": [{**job, "file": str(path)}]}
    holder: dict[str, Any] = {}
    child = threading.Thread(target=lambda: holder.update(run_child(spec)))
    child.start()
    written: dict[int, float] = {}
    with path.open("ab") as handle:
        i = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            handle.write(b"line %d\n" % i)
            handle.flush()
            written[i] = time.monotonic()
            i += 1
            time.sleep(0.05)
    time.sleep(2.5)
    stop.touch()
    child.join()
    chunks = emulator.call(lambda: emulator.bk.chunks(job["id"]))
    lags = []
    for chunk in chunks:
        for match in re.finditer(rb"line (\d+)\n", STAMP.sub(b"", chunk.data)):
            lags.append(chunk.received_at - written[int(match.group(1))])
    if len(lags) != len(written):
        raise RuntimeError(f"{len(written)} lines written, {len(lags)} received")
    return {"lines": len(lags), "p50_s": percentile(lags, 50), "p99_s": percentile(lags, 99),
            "max_s": max(lags)}


def many_jobs(emulator: Emulator, workdir: Path, count: int, seconds: float) -> dict[str, Any]:
    jobs = emulator.running_jobs(count)
    stop = workdir / "many.stop"
    files = []
    for n, job in enumerate(jobs):
        files.append(workdir / f"job-{n}.log")
        files[-1].touch()
        job["file"] = str(files[-1])
    spec = {"url": emulator.bk.url, "state_dir": str(workdir / "state-many"), "stop_file": str(stop),
            "jobs": jobs, "poll_state": True}
    holder: dict[str, Any] = {}
    child = threading.Thread(target=lambda: holder.update(run_child(spec)))
    child.start()
    handles = [f.open("ab") for f in files]
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        for handle in handles:
            handle.write(b"line %d of this job\n" % i)
            handle.flush()
        i += 1
        time.sleep(0.1)
    for handle in handles:
        handle.close()
    stop.touch()
    child.join()
    for job, file in zip(jobs, files, strict=True):
        log = emulator.call(lambda job=job: emulator.bk.log(job["id"]))
        if STAMP.sub(b"", log) != file.read_bytes():
            raise RuntimeError(f"job {job['id']}: the log received differs from the file")
    return {"jobs": count, "seconds": holder["elapsed"], "agent_cpu_seconds": holder["cpu_seconds"],
            "agent_cpu_percent_of_one_core": 100 * holder["cpu_seconds"] / holder["elapsed"],
            "agent_peak_rss_mb": holder["peak_rss_mb"], "lines_per_job": i}


def measure(quick: bool, output: str | None) -> int:
    started = time.monotonic()
    settings = {"throughput_mib": 8 if quick else 64, "latency_seconds": 3 if quick else 20,
                "jobs": 50, "jobs_seconds": 3 if quick else 20}
    emulator = Emulator()
    try:
        with tempfile.TemporaryDirectory(prefix="hpcr-bench-bk-", dir="/var/tmp") as tmp:
            work = Path(tmp)
            results = {"throughput": throughput(emulator, work, settings["throughput_mib"]),
                       "latency": latency(emulator, work, settings["latency_seconds"]),
                       "many_jobs": many_jobs(emulator, work, settings["jobs"], settings["jobs_seconds"])}
    finally:
        emulator.close()
    t, lat, many = results["throughput"], results["latency"], results["many_jobs"]
    print(markdown_table(["variant", "result", "target"], [
        ["throughput: agent", f"{t['agent_mb_s']:.0f} MB/s ({t['ratio_to_cat']:.3f} x cat)",
         f">= {TARGET_MB_S:g} MB/s"],
        ["throughput: cat", f"{t['cat_mb_s']:.0f} MB/s", ""],
        ["throughput: agent peak RSS", f"{t['agent_peak_rss_mb']:.0f} MB", f"< {TARGET_RSS_MB:g} MB"],
        ["line latency p50 / p99", f"{lat['p50_s']:.2f} s / {lat['p99_s']:.2f} s",
         f"p99 < {TARGET_P99_S:g} s"],
        [f"{many['jobs']} jobs: agent CPU", f"{many['agent_cpu_percent_of_one_core']:.0f}% of a core", ""],
        [f"{many['jobs']} jobs: agent peak RSS", f"{many['agent_peak_rss_mb']:.0f} MB", ""],
    ]))
    document = {"benchmark": NAME, "date": now_utc(), "quick": quick, "settings": settings,
                "machine": machine_info(), "commands": {"baseline": ["cat", "FILE"]},
                "duration_seconds": time.monotonic() - started, **results,
                "targets_met": {"throughput": t["agent_mb_s"] >= TARGET_MB_S,
                                "rss": t["agent_peak_rss_mb"] < TARGET_RSS_MB,
                                "latency": lat["p99_s"] < TARGET_P99_S}}
    path = write_results(Path(output) if output else REPO / "bench" / "results" / f"{NAME}.json", document)
    print(f"results: {path}")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(asyncio.run(child_main(json.loads(sys.argv[2])))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    common_arguments(parser, NAME)
    args = parser.parse_args()
    return main_guard(lambda: measure(args.quick, args.output))


if __name__ == "__main__":
    sys.exit(main())
