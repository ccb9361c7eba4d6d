"""GitHub requests per job and the rate-limit budget of a site, counted by the GitHub emulator.

The GitHub source runs against the emulator (`tests/fakes/github_activity.py`, every request
checked against GitHub's OpenAPI description) with a stand-in agent whose jobs write scripted
output (no Slurm: what is measured is the conversation with GitHub, not the cluster). Every
request the emulator answers is counted by operation, and so is what it takes off the
installation's rate limit: a `304 Not Modified` answer to a conditional GET costs nothing, as on
GitHub.

- idle polling: rounds of `poll_interval` in which nothing changed;
- a job triggered by a label, by a `/hpc-runner run` comment and by a push, with a log that ends
  before the first progress update (the fixed cost of a job);
- the same label-triggered job with a log lasting `k` update intervals (the cost of the live log
  tail: one check-run update per interval, 10 s in production; shortened here so the run is quick,
  which changes no count);
- the budget: a site with 200 jobs a day of 10 minutes each, one repository polled every 30 s,
  against the installation limit of 5000 requests an hour.

    /opt/hpc-runner/venv/bin/python bench/github_requests.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
    write_results,
)

NAME = "github_requests"
INSTALLATION_LIMIT = 5000        # requests an hour (GitHub's minimum for an installation)
JOBS_PER_DAY = 200
JOB_SECONDS = 600                # a typical job: 10 minutes of log
UPDATE_INTERVAL = 10.0           # production: the check run is updated at most every 10 s
POLL_INTERVAL = 30.0             # production default
TARGET_FIXED = 12                # "a handful" of requests per job, besides the log updates
TARGET_SHARE = 0.25              # of the installation's hourly limit, for the whole site


class Meter:
    """Requests by operation since `start`, and what they took off the installation's rate limit
    (the emulator's own bucket: a `304` takes nothing)."""

    def __init__(self, gh: Any) -> None:
        self._gh = gh
        self._start = len(gh.recorded)
        self._remaining = gh.rate_limit_remaining(1)

    def read(self) -> tuple[Counter[str], int]:
        records = self._gh.recorded[self._start:]
        by_operation: Counter[str] = Counter(r.operation or f"{r.method} {r.path}" for r in records)
        return by_operation, self._remaining - self._gh.rate_limit_remaining(1)


async def _scenario(kind: str, *, intervals: int, interval: float, rounds: int = 0) -> dict[str, Any]:
    from unit.github_site import COMMAND, github_site
    from unit.github_site import REPO as GH_REPO

    with tempfile.TemporaryDirectory(prefix="hpcr-bench-gh-") as tmp:
        async with github_site(Path(tmp), update_interval=interval) as site:
            await site.poll()                                  # the first round sets the cursors
            if kind == "idle":
                meter = Meter(site.gh)
                for _ in range(rounds):
                    await site.source.poll_once(GH_REPO)
                counts, charged = meter.read()
                return {"requests_per_round": sum(counts.values()) / rounds,
                        "charged_per_round": charged / rounds, "by_operation": dict(counts)}
            pieces = max(1, int(intervals * interval / 0.05))
            site.host.outputs["unit"] = [b"step %d of the test suite\n" % i for i in range(pieces)]
            site.host.piece_delay = 0.05 if intervals else 0.0
            if kind == "label":
                site.open_pull(author="alice", labelled_by="alice")
            elif kind == "comment":
                number = site.open_pull(author="alice")
                await site.poll()                              # the pull request alone starts nothing
                site.gh.add_comment(GH_REPO, number, COMMAND, user="alice")
            else:
                site.push_main({"src/main.txt": f"{time.time()}\n"}, author="alice")
            meter = Meter(site.gh)
            started = time.monotonic()
            await site.poll()
            seconds = time.monotonic() - started
            counts, charged = meter.read()
            [run] = site.check_runs("hpc-runner/unit")
            if run["conclusion"] != "success":
                raise RuntimeError(f"{kind}: the job ended {run['conclusion']}")
            updates = sum(1 for body in run["_history"][1:] if not body.get("conclusion"))
            return {"requests": sum(counts.values()), "charged": charged, "check_run_updates": updates,
                    "job_seconds": round(seconds, 2), "by_operation": dict(counts)}


async def measure_all(quick: bool) -> dict[str, Any]:
    interval = 0.2 if quick else 1.0
    intervals = 5 if quick else 12
    results: dict[str, Any] = {
        "idle": await _scenario("idle", intervals=0, interval=interval, rounds=5 if quick else 20)}
    for kind in ("label", "comment", "push"):
        results[kind] = await _scenario(kind, intervals=0, interval=interval)
    results["label_long"] = await _scenario("label", intervals=intervals, interval=interval)
    fixed = results["label"]["charged"]
    long = results["label_long"]
    per_update = (long["charged"] - fixed) / max(long["check_run_updates"], 1)
    updates_per_job = JOB_SECONDS / UPDATE_INTERVAL
    per_job = fixed + per_update * updates_per_job
    polling_per_hour = results["idle"]["charged_per_round"] * 3600 / POLL_INTERVAL
    per_hour = JOBS_PER_DAY / 24 * per_job + polling_per_hour
    results["budget"] = {
        "jobs_per_day": JOBS_PER_DAY, "job_seconds": JOB_SECONDS, "update_interval_s": UPDATE_INTERVAL,
        "fixed_requests_per_job": fixed, "requests_per_update": round(per_update, 2),
        "requests_per_job": round(per_job, 1), "polling_requests_per_hour": round(polling_per_hour, 1),
        "requests_per_hour": round(per_hour, 1), "installation_limit_per_hour": INSTALLATION_LIMIT,
        "share_of_limit": round(per_hour / INSTALLATION_LIMIT, 4),
        # The busiest plausible hour: a fifth of the day's jobs at once.
        "peak_hour_requests": round(JOBS_PER_DAY / 5 * per_job + polling_per_hour, 1)}
    return results


def measure(quick: bool, output: Path | None) -> int:
    started = time.monotonic()
    results = asyncio.run(measure_all(quick))
    budget = results["budget"]
    rows = [["idle poll round (3 conditional GETs)", f"{results['idle']['requests_per_round']:.1f} requests, "
             f"{results['idle']['charged_per_round']:.1f} charged", "0 charged"]]
    for kind in ("label", "comment", "push"):
        rows.append([f"job from a {kind}, short log", f"{results[kind]['requests']} requests, "
                     f"{results[kind]['charged']} charged", f"<= {TARGET_FIXED}"])
    long = results["label_long"]
    rows.append([f"job from a label, {long['check_run_updates']} update intervals of log",
                 f"{long['requests']} requests, {long['charged']} charged",
                 f"<= {TARGET_FIXED} + 1 per interval"])
    site = f"site: {JOBS_PER_DAY} jobs/day of {JOB_SECONDS // 60} min, polled every {POLL_INTERVAL:g} s"
    rows.append([site,
                 f"{budget['requests_per_hour']:.0f} requests/h ({100 * budget['share_of_limit']:.1f}% of "
                 f"{INSTALLATION_LIMIT}/h); busiest hour {budget['peak_hour_requests']:.0f}",
                 f"<= {100 * TARGET_SHARE:.0f}%"])
    print(markdown_table(["variant", "result", "target"], rows))
    document = {"benchmark": NAME, "date": now_utc(), "quick": quick,
                "settings": {"update_interval_in_run_s": 0.2 if quick else 1.0, "target_fixed": TARGET_FIXED,
                             "target_share": TARGET_SHARE},
                "machine": machine_info(), "commands": {}, "results": results,
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
