"""Slurm commands per polling cycle: what tracking 1, 10 and 100 jobs costs slurmctld.

Submits held jobs (`sbatch --hold`: they pend for ever and use no CPU) as the service account,
then lets the executor's tracker poll them: every cycle's Slurm commands are counted twice, by
the tracker and by the command layer, and timed. A last cycle after cancelling them all shows
what jobs that end cost (the same one squeue call: its row carries the exit code). The jobs are
cancelled at the end whatever happens.

    sudo /opt/hpc-runner/venv/bin/python bench/slurm_polling.py [--cycles N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

# Measure the checkout's executor, not the copy installed in the venv (which can lag behind).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    check_environment,
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    summary,
    write_results,
)
from bench._slurm import cancel_all, check_slurm, service_cli
from runner.executors.slurm.cli import SlurmCli
from runner.executors.slurm.tracker import Finished, Tracker, TrackerEvent

NAME = "slurm_polling"
SIZES = (1, 10, 100)
DEFAULT_CYCLES = 20
QUICK_CYCLES = 3
HELD_SCRIPT = "#!/bin/bash\ntrue\n"
TARGET_COMMANDS_PER_CYCLE = 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--cycles", type=int, default=None,
                        help=f"polling cycles per size (default {DEFAULT_CYCLES}, --quick {QUICK_CYCLES})")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    cycles = args.cycles or (QUICK_CYCLES if args.quick else DEFAULT_CYCLES)
    return main_guard(lambda: asyncio.run(measure(cycles, args.quick, args.output)))


async def submit_held(cli: SlurmCli, count: int) -> list[str]:
    ids = []
    for n in range(count):
        ids.append(await cli.sbatch(HELD_SCRIPT, ["--parsable", "--hold", f"--job-name=bench-poll-{n}",
                                                  "--time=1", "--output=/dev/null", "--chdir=/"]))
    return ids


async def measure(cycles: int, quick: bool, output: Path) -> int:
    check_environment()
    check_slurm()
    machine = machine_info()
    started = time.monotonic()
    cli = service_cli()
    ids: list[str] = []
    sizes: dict[str, Any] = {}
    try:
        ids = await submit_held(cli, max(SIZES))
        for size in SIZES:
            tracker = Tracker(cli)
            for slurm_id in ids[:size]:
                tracker.track(slurm_id)
            per_cycle, by_layer, seconds = [], [], []
            for _ in range(cycles):
                before = sum(cli.commands.values())
                await tracker.poll_once()
                assert tracker.last_cycle is not None
                per_cycle.append(tracker.last_cycle.commands)
                by_layer.append(sum(cli.commands.values()) - before)
                seconds.append(tracker.last_cycle.seconds)
            if tracker.failures or len(tracker.tracked) != size:
                raise RuntimeError(f"the tracker lost jobs or failed: {tracker.failures} failures")
            sizes[str(size)] = {
                "commands_per_cycle": per_cycle, "commands_per_cycle_counted_by_cli": by_layer,
                "max_commands_per_cycle": max(per_cycle), "cycle_ms": summary([s * 1000 for s in seconds]),
                "target_met": max(per_cycle) <= TARGET_COMMANDS_PER_CYCLE and per_cycle == by_layer,
            }
        final = await finishing_cycle(cli, ids)
    finally:
        cancel_all(ids)
    elapsed = time.monotonic() - started
    results = {
        "benchmark": NAME,
        "date": now_utc(),
        "quick": quick,
        "settings": {"cycles_per_size": cycles, "sizes": list(SIZES), "jobs": "sbatch --hold, as hpcrunner",
                     "target_commands_per_cycle": TARGET_COMMANDS_PER_CYCLE},
        "machine": machine,
        "commands": {"cycle": "squeue --noheader --all --states=all --jobs=ID,ID,... --Format=...",
                     "job that squeue no longer lists": "scontrol show job --oneliner ID (once)"},
        "sizes": sizes,
        "finishing_cycle": final,
        "duration_seconds": round(elapsed, 1),
    }
    write_results(output, results)
    print(f"Slurm commands per polling cycle, {cycles} cycles per size ({elapsed:.0f} s), "
          f"{machine['cores']} cores:\n")
    rows = [[f"{size} jobs", str(entry["max_commands_per_cycle"]), f"{entry['cycle_ms']['median']:.0f}",
             f"{entry['cycle_ms']['p90']:.0f}", "yes" if entry["target_met"] else "NO"]
            for size, entry in sizes.items()]
    rows.append([f"{final['jobs']} jobs ending", str(final["commands"]), f"{final['ms']:.0f}", "",
                 "yes" if final["commands"] <= TARGET_COMMANDS_PER_CYCLE else "NO"])
    header = ["variant", "commands per cycle (max)", "median ms", "p90 ms", "target ≤ 1 met"]
    print(markdown_table(header, rows))
    print(f"\nwrote {output}")
    return 0


async def finishing_cycle(cli: SlurmCli, ids: list[str]) -> dict[str, Any]:
    """Cancel every job, wait until Slurm shows them ended, then poll once with all of them tracked."""
    tracker = Tracker(cli)
    for slurm_id in ids:
        tracker.track(slurm_id)
    cancel_all(ids)
    deadline = time.monotonic() + 60
    while True:
        rows = await cli.squeue(ids)
        if all(row.state == "CANCELLED" for row in rows.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    ended: list[TrackerEvent] = []
    tracker.listen(ended.append)
    await tracker.poll_once()
    assert tracker.last_cycle is not None
    outcomes = [e.outcome.state for e in ended if isinstance(e, Finished)]
    return {"jobs": len(ids), "commands": tracker.last_cycle.commands,
            "ms": tracker.last_cycle.seconds * 1000, "finished": len(outcomes),
            "outcomes": sorted(set(outcomes))}


if __name__ == "__main__":
    sys.exit(main())
