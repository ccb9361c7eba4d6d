"""Dispatch overhead: the product's submit path against a bare sbatch of the same batch job.

- `product submit`: from the start of the product's path to sbatch's return: prepare the job
  (decision in hand: verify the image against the digest cache, plan the sandbox, write the env
  file) then the Slurm executor's submit (plan the batch job, write the script, sbatch).
- `bare sbatch`: the same arguments and script, given to sbatch directly.

Both submit as the service account through the same runuser prefix, held (`--hold`: the jobs
never run and never load the machine), in interleaved rounds (rotating order), and all are
cancelled at the end. Handing the job's files to the service account, which only this
root-run benchmark needs, is not timed.

    sudo /opt/hpc-runner/venv/bin/python bench/slurm_dispatch.py [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Measure the checkout's pipeline and executor, not the copies installed in the venv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    check_environment,
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    paired_ratios,
    rotated,
    summary,
    write_results,
)
from bench._slurm import SlurmBenchSite, cancel_all, check_slurm, executor, slurm_site
from runner.executors.slurm.executor import SlurmExecutor
from runner.executors.slurm.plan import SubmitOptions, plan_batch

NAME = "slurm_dispatch"
DEFAULT_RUNS = 30
QUICK_RUNS = 4
WARMUP = 2
PRODUCT = "product submit"
BARE = "bare sbatch"
JOB = """[job]
name = "dispatch"
image = "test"
command = ["/usr/local/bin/mpi-hello"]

[job.resources]
tasks = 2
time = "5m"

[job.mpi]
enabled = true
"""
HELD = SubmitOptions(hold=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=None,
                        help=f"timed submissions of each variant (default {DEFAULT_RUNS}, "
                             f"--quick {QUICK_RUNS})")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    if runs < 2:
        parser.error("--runs must be at least 2")
    return main_guard(lambda: asyncio.run(measure(runs, args.quick, args.output)))


async def product_submit(site: SlurmBenchSite, runner: SlurmExecutor, submitted: list[str]) -> float:
    start = time.perf_counter()
    prepared = site.prepare(JOB)
    prepare_s = time.perf_counter() - start
    site.hand_over(prepared)  # root-only step, not timed
    start = time.perf_counter()
    job = await runner.submit(prepared, comment="bench slurm_dispatch", options=HELD)
    submit_s = time.perf_counter() - start
    assert job.slurm_id is not None
    submitted.append(job.slurm_id)
    return prepare_s + submit_s


async def bare_sbatch(script: str, args: tuple[str, ...], runner: SlurmExecutor,
                      submitted: list[str]) -> float:
    start = time.perf_counter()
    slurm_id = await runner.cli.sbatch(script, args)
    seconds = time.perf_counter() - start
    submitted.append(slurm_id)
    return seconds


async def measure(runs: int, quick: bool, output: Path) -> int:
    check_environment()
    check_slurm()
    machine = machine_info()
    started = time.monotonic()
    runner = executor(poll_interval=5.0)
    submitted: list[str] = []
    samples: dict[str, list[float]] = {PRODUCT: [], BARE: []}
    try:
        with slurm_site("dispatch-") as site:
            # The bare variant submits exactly what the product would: one planned batch job.
            reference = site.prepare(JOB)
            site.hand_over(reference)
            batch = plan_batch(reference, comment="bench slurm_dispatch", options=HELD)
            # The first submission hashes the image into the digest cache; warm-up rounds are not timed.
            for _ in range(WARMUP):
                await product_submit(site, runner, submitted)
                await bare_sbatch(batch.script, batch.args, runner, submitted)
            for index in range(runs):
                for name in rotated([PRODUCT, BARE], index):
                    if name == PRODUCT:
                        samples[name].append(await product_submit(site, runner, submitted))
                    else:
                        samples[name].append(await bare_sbatch(batch.script, batch.args, runner, submitted))
    finally:
        await runner.close()
        cancel_all(submitted)
    elapsed = time.monotonic() - started
    ms = {name: [s * 1000 for s in values] for name, values in samples.items()}
    ratios = paired_ratios(ms[PRODUCT], ms[BARE])
    variants: dict[str, Any] = {name: {"ms": summary(values), "samples_ms": [round(v, 2) for v in values]}
                                for name, values in ms.items()}
    variants[PRODUCT]["paired_ratio_to_bare"] = summary(ratios)
    variants[PRODUCT]["added_ms_over_bare"] = statistics.median(ms[PRODUCT]) - statistics.median(ms[BARE])
    results = {
        "benchmark": NAME,
        "date": now_utc(),
        "quick": quick,
        "settings": {"runs": runs, "warmup_rounds": WARMUP, "order": "interleaved, rotating per round",
                     "run_as": "hpcrunner via runuser", "jobs": "held (--hold), cancelled at the end"},
        "machine": machine,
        "commands": {BARE: ["sbatch", *batch.args], PRODUCT: ["prepare_job", "SlurmExecutor.submit"]},
        "variants": variants,
        "duration_seconds": round(elapsed, 1),
    }
    write_results(output, results)
    print(f"Dispatch overhead, {runs} interleaved submissions each ({elapsed:.0f} s), "
          f"{machine['cores']} cores:\n")
    rows = []
    for name in (BARE, PRODUCT):
        stats = variants[name]["ms"]
        ratio = f"{statistics.median(ratios):.2f}×" if name == PRODUCT else "1×"
        rows.append([name, f"{stats['median']:.1f}", f"{stats['p10']:.1f}", f"{stats['p90']:.1f}", ratio])
    print(markdown_table(["variant", "median ms", "p10 ms", "p90 ms", "paired ratio to bare"], rows))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
