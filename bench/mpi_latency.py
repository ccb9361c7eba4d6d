"""MPI allreduce latency inside the product's sandbox against bare host MPI.

The same program, `mpi-latency BYTES ITERATIONS` (runner/bundled/mpi-latency.c, as built
into the test image), with the same host Open MPI, 2 ranks on this node, launched as the
service account in three ways:

- `bare host MPI`: `mpirun -np 2 --oversubscribe --bind-to none ./mpi-latency ...` on the
  host, with the binary copied out of the image so that both sides run identical code;
- `sandbox`: the planner's MPI launch of `/usr/local/bin/mpi-latency` in the image
  (mpirun, the rank wrapper, `apptainer exec --sharens ...` with the host MPI bound in);
- `sandbox without --sharens`: the same command line with `--sharens` removed (and the
  rank hold that exists for it, `sandbox.plan.RANK_HOLD`), as a reference: it shows why the
  planner sets it.

The program times its own allreduce loop, so launch costs do not enter the latency. Rounds
interleave the variants (in rotating order) at each message size; the report gives medians
and the ratio of the sandbox to bare MPI measured in the same run. Target: the sandbox
within 5% of bare, since both run the same host MPI.

    sudo /opt/hpc-runner/venv/bin/python bench/mpi_latency.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Measure the checkout's planner, not the copy installed in the venv (which can lag behind).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    IMAGE,
    QUIET_LOAD,
    SERVICE_ENV,
    BenchError,
    PlannedJob,
    Run,
    check_environment,
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    other_load,
    paired_ratios,
    plan_job,
    ratio_interval,
    rotated,
    run_as_service,
    service_argv,
    service_file,
    service_workdir,
    summary,
    write_results,
)
from sandbox.hostmpi import HostMpi, HostMpiError, discover_host_mpi
from sandbox.plan import RANK_HOLD, plan_local_launch

NAME = "mpi_latency"
IMAGE_BINARY = "/usr/local/bin/mpi-latency"
RANKS = 2
SIZES = (4, 1 << 20)
# Enough calls that the timed loop lasts milliseconds at bare-MPI speed, few enough that a
# launch still ends within seconds when a busy neighbour makes each call a thousand times
# slower (seen here: 3 ms for 4 B, 25 ms for 1 MiB).
DEFAULT_ITERATIONS = {4: 3000, 1 << 20: 200}
QUICK_ITERATIONS = {4: 300, 1 << 20: 20}
DEFAULT_ROUNDS = 20
QUICK_ROUNDS = 2
MIN_ROUNDS = 3
# No round starts that would end after this many seconds of rounds, so that a loaded
# machine does not stretch the default run far beyond two minutes.
DEFAULT_BUDGET_SECONDS = 90.0
TARGET_RATIO = 1.05
BARE = "bare host MPI"
SANDBOX = "sandbox"
NO_SHARENS = "sandbox without --sharens"
OUTPUT_LINE = re.compile(r"^allreduce_latency_us (\d+) ([0-9.]+)$", re.MULTILINE)


@dataclass(frozen=True)
class Launch:
    command: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path

    def run(self) -> Run:
        return run_as_service(self.command, cwd=self.cwd, env=self.env)


def job_text(size: int, iterations: int) -> str:
    return f"""
[job]
name = "bench-mpi-latency"
image = "test"
command = ["{IMAGE_BINARY}", "{size}", "{iterations}"]

[job.resources]
tasks = {RANKS}

[job.mpi]
enabled = true
"""


def without_sharens(job: PlannedJob, host_mpi: HostMpi) -> tuple[str, ...]:
    # The rank hold waits for the other ranks of the node in the /dev/shm they share under
    # --sharens; without it each rank's is its own, and the hold would wait for ranks it
    # cannot see.
    argv = tuple(arg for arg in job.plan.argv if arg != "--sharens")
    if argv == job.plan.argv:
        raise BenchError("the planned MPI command line has no --sharens to remove")
    starts = [i for i in range(len(argv)) if argv[i:i + len(RANK_HOLD)] == RANK_HOLD]
    if len(starts) != 1:
        raise BenchError("the planned MPI command line has no rank hold to remove")
    argv = argv[:starts[0]] + argv[starts[0] + len(RANK_HOLD):]
    plan = dataclasses.replace(job.plan, argv=argv)
    return plan_local_launch(plan, job.spec, job.decision, host_mpi)


def copy_binary_out(directory: Path) -> Path:
    """The image's own mpi-latency, so that bare and sandboxed runs execute the same bytes."""
    target = directory / "mpi-latency"
    argv = service_argv(["apptainer", "--quiet", "exec", str(IMAGE), "cat", IMAGE_BINARY], SERVICE_ENV)
    result = subprocess.run(argv, cwd=directory, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=120, check=False)
    if result.returncode != 0 or not result.stdout.startswith(b"\x7fELF"):
        raise BenchError(f"cannot copy {IMAGE_BINARY} out of {IMAGE}: "
                         f"{result.stderr.decode(errors='replace').strip()}")
    service_file(target, result.stdout, 0o755)
    return target


def latency_us(run: Run, size: int, variant: str) -> float:
    """Rank 0's figure; exactly one line, or the ranks did not form one world of RANKS."""
    found = OUTPUT_LINE.findall(run.stdout)
    if len(found) != 1 or int(found[0][0]) != size:
        raise BenchError(f"{variant}, {size} B: expected one allreduce_latency_us line from rank 0 "
                         f"(several mean the ranks started as singletons), got:\n{run.stdout}{run.stderr}")
    return float(found[0][1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved rounds (default {DEFAULT_ROUNDS}, --quick {QUICK_ROUNDS})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_SECONDS,
                        help=f"once {MIN_ROUNDS} rounds are done, start none that would end after this "
                             "many seconds of rounds (default %(default)s)")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    iterations = QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS
    return main_guard(lambda: measure(rounds, args.budget, iterations, args.quick, args.output))


def measure(rounds: int, budget: float, iterations: Mapping[int, int], quick: bool, output: Path) -> int:
    check_environment()
    try:
        host_mpi = discover_host_mpi()
    except HostMpiError as exc:
        raise BenchError(f"no usable host Open MPI: {exc}") from None
    machine = machine_info()
    started = time.monotonic()
    with service_workdir("mpi-") as root:
        binary = copy_binary_out(root)
        launches: dict[int, dict[str, Launch]] = {}
        for size in SIZES:
            job = plan_job(job_text(size, iterations[size]), root / f"job-{size}", host_mpi)
            bare = (host_mpi.mpirun, "-np", str(RANKS), "--oversubscribe", "--bind-to", "none",
                    str(binary), str(size), str(iterations[size]))
            launches[size] = {
                BARE: Launch(bare, SERVICE_ENV, root),
                SANDBOX: Launch(job.launch, job.env, job.workspace),
                NO_SHARENS: Launch(without_sharens(job, host_mpi), job.env, job.workspace),
            }
        # One untimed launch of each: the first start of a container or of mpirun pays for
        # cold caches that later rounds do not.
        for by_variant in launches.values():
            for launch in by_variant.values():
                launch.run()
        samples: dict[int, dict[str, list[Run]]] = {size: {v: [] for v in launches[size]} for size in SIZES}
        rounds_started = time.monotonic()
        durations: list[float] = []
        for index in range(rounds):
            spent = time.monotonic() - rounds_started
            # Only whole rounds count (they pair the variants): stop before one that would
            # probably overrun, judged by a typical round, not by one a neighbour slowed down.
            if index >= MIN_ROUNDS and spent + statistics.median(durations) > budget:
                break
            for size in SIZES:
                for variant in rotated(list(launches[size]), index):
                    samples[size][variant].append(launches[size][variant].run())
            durations.append(time.monotonic() - rounds_started - spent)
        binary_sha256 = hashlib.sha256(binary.read_bytes()).hexdigest()
    elapsed = time.monotonic() - started

    sizes = {str(size): size_results(size, iterations[size], samples[size]) for size in SIZES}
    done = len(samples[SIZES[0]][BARE])
    results = {
        "benchmark": NAME,
        "date": now_utc(),
        "quick": quick,
        "settings": {"ranks": RANKS, "rounds": done, "rounds_asked": rounds, "budget_seconds": budget,
                     "order": "interleaved, rotating per round", "target_ratio": TARGET_RATIO,
                     "quiet_load": QUIET_LOAD, "image": str(IMAGE), "binary_sha256": binary_sha256,
                     "run_as": "hpcrunner via runuser, env -i"},
        "machine": {**machine, "host_mpi": {"version": host_mpi.version, "mpirun": host_mpi.mpirun,
                                            "libmpi": host_mpi.libmpi}},
        "commands": {str(size): {v: list(launch.command) for v, launch in by_variant.items()}
                     for size, by_variant in launches.items()},
        "sizes": sizes,
        "duration_seconds": round(elapsed, 1),
    }
    write_results(output, results)
    print_report(results, machine, host_mpi, done, elapsed)
    print(f"\nwrote {output}")
    return 0


def variant_stats(values: Sequence[float], bare: Sequence[float]) -> dict[str, Any]:
    stats = summary(values)
    return {"latency_us": stats, "ratio_to_bare": stats["median"] / statistics.median(bare),
            "ratio_to_bare_95ci": ratio_interval(values, bare),
            "paired_ratio_to_bare": summary(paired_ratios(values, bare))}


def ratio_cell(stats: Mapping[str, Any]) -> str:
    low, high = stats["ratio_to_bare_95ci"]
    return f"{stats['ratio_to_bare']:.3f} ({low:.2f}–{high:.2f})"


def size_results(size: int, iterations: int, by_variant: Mapping[str, Sequence[Run]]) -> dict[str, Any]:
    latencies = {v: [latency_us(run, size, v) for run in runs] for v, runs in by_variant.items()}
    # A round counts as quiet only if every variant in it was undisturbed, so that quiet
    # rounds still compare like with like.
    rounds = range(len(latencies[BARE]))
    quiet = [i for i in rounds if all(runs[i].other_load <= QUIET_LOAD for runs in by_variant.values())]
    variants: dict[str, Any] = {}
    for variant, values in latencies.items():
        runs = by_variant[variant]
        entry = variant_stats(values, latencies[BARE])
        if quiet:
            entry["quiet_rounds"] = variant_stats([values[i] for i in quiet],
                                                  [latencies[BARE][i] for i in quiet])
        entry.update({
            "other_load": other_load(runs),
            "launch_seconds": summary([run.seconds for run in runs]),
            "stderr_first_lines": runs[-1].stderr.strip().splitlines()[:3],
            "samples_us": values,
            "samples_other_load": [round(run.other_load, 3) for run in runs],
        })
        variants[variant] = entry
    sandbox = variants[SANDBOX]
    return {
        "iterations": iterations,
        "quiet_rounds": len(quiet),
        "sandbox_target_met": sandbox["ratio_to_bare"] <= TARGET_RATIO,
        "sandbox_target_met_in_quiet_rounds":
            sandbox["quiet_rounds"]["ratio_to_bare"] <= TARGET_RATIO if quiet else None,
        "variants": variants,
    }


def print_report(results: Mapping[str, Any], machine: Mapping[str, Any], host_mpi: HostMpi,
                 rounds: int, elapsed: float) -> None:
    print(f"MPI allreduce latency, {RANKS} ranks, {rounds} interleaved rounds ({elapsed:.0f} s), "
          f"{machine['cores']} cores, Open MPI {host_mpi.version}, Apptainer {machine['apptainer']}:\n")
    rows = []
    quiet_rows = []
    for size, entry in results["sizes"].items():
        for variant, stats in entry["variants"].items():
            target = ""
            if variant == SANDBOX:
                target = "met" if entry["sandbox_target_met"] else "not met"
            lat = stats["latency_us"]
            rows.append([f"{size} B", variant, f"{lat['median']:.2f}", f"{lat['p10']:.2f}",
                         f"{lat['p90']:.2f}", ratio_cell(stats), f"{stats['other_load']:.2f}",
                         target])
            if "quiet_rounds" in stats:
                q = stats["quiet_rounds"]
                quiet_target = ""
                if variant == SANDBOX:
                    quiet_target = "met" if entry["sandbox_target_met_in_quiet_rounds"] else "not met"
                quiet_rows.append([f"{size} B ({entry['quiet_rounds']} of {rounds})", variant,
                                   f"{q['latency_us']['median']:.2f}", f"{q['latency_us']['p10']:.2f}",
                                   f"{q['latency_us']['p90']:.2f}", ratio_cell(q),
                                   quiet_target])
    print(markdown_table(["size", "variant", "median us", "p10 us", "p90 us", "× bare (95% CI)",
                          "other load (cores)", f"target ≤ {TARGET_RATIO}×"], rows))
    if quiet_rows:
        print(f"\nQuiet rounds only (other processes used at most {QUIET_LOAD} core during each launch):\n")
        print(markdown_table(["size (rounds)", "variant", "median us", "p10 us", "p90 us", "× bare (95% CI)",
                              f"target ≤ {TARGET_RATIO}×"], quiet_rows))
    loads = [stats["other_load"] for entry in results["sizes"].values()
             for stats in entry["variants"].values()]
    if max(loads) > QUIET_LOAD:
        print(f"\nwarning: other processes kept up to {max(loads):.2f} of {machine['cores']} cores busy; "
              "ranks that poll for messages then share cores, and disturbed launches say more about "
              "the scheduler than about the sandbox: compare the quiet rounds")


if __name__ == "__main__":
    sys.exit(main())
