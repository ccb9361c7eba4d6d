"""Log latency of a Slurm job: from a line written inside the sandbox to the agent's tailer seeing it.

A job prepared by the product's pipeline and submitted by the Slurm executor prints a line with
its wall-clock time every 100 ms (srun --unbuffered, Apptainer, the test image). The agent's
tailer (`runner.logs.tail.follow`, default poll interval) follows the job's log file and records
when it sees each line. Lag = seen - written; the target is p99 < 1 s. Same machine, same clock.

    sudo /opt/hpc-runner/venv/bin/python bench/slurm_log_latency.py [--seconds S] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

# Measure the checkout's executor and tailer, not the copies installed in the venv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    BenchError,
    check_environment,
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    percentile,
    summary,
    timestamped_line,
    timestamped_lines_job,
    write_results,
)
from bench._slurm import cancel_all, check_slurm, executor, slurm_site
from runner.logs.tail import LineAssembler, follow

NAME = "slurm_log_latency"
DEFAULT_SECONDS = 10.0
QUICK_SECONDS = 3.0
INTERVAL = 0.1
TARGET_P99_SECONDS = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"how long the job prints (default {DEFAULT_SECONDS:g}, "
                             f"--quick {QUICK_SECONDS:g})")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    seconds = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    return main_guard(lambda: asyncio.run(measure(seconds, args.quick, args.output)))


async def measure(seconds: float, quick: bool, output: Path) -> int:
    check_environment()
    check_slurm()
    machine = machine_info()
    started = time.monotonic()
    lines = max(2, round(seconds / INTERVAL))
    runner = executor(poll_interval=1.0)
    submitted: list[str] = []
    seen: list[tuple[float, bytes]] = []
    with slurm_site("log-latency-") as site:
        prepared = site.prepare(timestamped_lines_job(lines, INTERVAL))
        site.hand_over(prepared)
        try:
            job = await runner.submit(prepared, comment="bench slurm_log_latency")
            assert job.slurm_id is not None
            submitted.append(job.slurm_id)
            watching = asyncio.create_task(runner.watch(job))
            assembler = LineAssembler()
            async for _, chunk in follow(prepared.log_path, done=watching.done):
                now = time.time()
                seen += [(now, line) for line in assembler.feed(chunk)]
            outcome = await watching
            log = prepared.log_path.read_text(errors="replace")
        finally:
            await runner.close()
            cancel_all(submitted)
    if outcome.state != "succeeded":
        raise BenchError(f"the job did not succeed: {outcome}\n{log[-2000:]}")
    lags = []
    for at, line in seen:
        if (timed := timestamped_line(line)) is not None:
            lags.append(at - timed[1])
    if len(lags) != lines:
        raise BenchError(f"saw {len(lags)} of {lines} lines:\n{log[-2000:]}")
    elapsed = time.monotonic() - started
    lag_ms = [lag * 1000 for lag in lags]
    p99 = percentile(lags, 99)
    results: dict[str, Any] = {
        "benchmark": NAME,
        "date": now_utc(),
        "quick": quick,
        "settings": {"lines": lines, "interval_s": INTERVAL, "tail_poll_interval_s": 0.1,
                     "target_p99_s": TARGET_P99_SECONDS},
        "machine": machine,
        "commands": {"job": "srun --unbuffered ... apptainer exec ... /bin/sh -e SCRIPT "
                            "(echo + date per line)"},
        "lag_ms": {**summary(lag_ms), "p50": percentile(lag_ms, 50), "p99": percentile(lag_ms, 99)},
        "target_met": p99 < TARGET_P99_SECONDS,
        "samples_ms": [round(v, 1) for v in lag_ms],
        "duration_seconds": round(elapsed, 1),
    }
    write_results(output, results)
    stats = results["lag_ms"]
    print(f"Log latency of a Slurm job, {lines} lines every {INTERVAL * 1000:.0f} ms ({elapsed:.0f} s):\n")
    header = ["variant", "p50 ms", "p99 ms", "max ms", f"target p99 < {TARGET_P99_SECONDS:g} s met"]
    print(markdown_table(header,
                         [["line written -> seen by the tailer", f"{stats['p50']:.0f}", f"{stats['p99']:.0f}",
                           f"{stats['max']:.0f}", "yes" if results["target_met"] else "NO"]]))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
