"""Sandbox start overhead: what wrapping a job in the product's Apptainer sandbox costs.

Three variants of a job that does nothing, each run as the service account:

- `bare true`: the baseline, `true` on the host (runuser and env included, as in all three);
- `apptainer exec IMAGE true`: Apptainer's own start cost, with its default flags;
- `product sandbox`: the full command line the planner builds for a job whose command is
  `true` (--contain --cleanenv --no-eval --no-home, --net --network none, the job's
  workdir, binds and env file), launched as the local executor launches it.

The difference between the last two is the cost of the product's flags. Rounds interleave
the variants (in rotating order) so that a noisy neighbour slows all of them alike, and the
report gives medians and ratios to the baseline measured in the same run.

    sudo /opt/hpc-runner/venv/bin/python bench/sandbox_overhead.py [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Measure the checkout's planner, not the copy installed in the venv (which can lag behind).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    IMAGE,
    SERVICE_ENV,
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
    service_workdir,
    summary,
    write_results,
)

NAME = "sandbox_overhead"
JOB = """
[job]
name = "bench-true"
image = "test"
command = ["true"]
"""
DEFAULT_RUNS = 30
DEFAULT_WARMUP = 3
QUICK_RUNS = 4
QUICK_WARMUP = 1
BASELINE = "bare true"
PLAIN = "apptainer exec IMAGE true"
PRODUCT = "product sandbox"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=None,
                        help=f"timed runs of each variant (default {DEFAULT_RUNS}, --quick {QUICK_RUNS})")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if runs < 2:
        parser.error("--runs must be at least 2")
    return main_guard(lambda: measure(runs, warmup, args.quick, args.output))


def measure(runs: int, warmup: int, quick: bool, output: Path) -> int:
    check_environment()
    machine = machine_info()
    started = time.monotonic()
    with service_workdir("overhead-") as root:
        job = plan_job(JOB, root / "job", None)
        variants: dict[str, tuple[Sequence[str], Mapping[str, str]]] = {
            BASELINE: (("true",), SERVICE_ENV),
            PLAIN: (("apptainer", "exec", str(IMAGE), "true"), SERVICE_ENV),
            PRODUCT: (job.launch, job.env),
        }
        # The first runs fill the page cache and Apptainer's own caches; they are not timed.
        for _ in range(warmup):
            for command, env in variants.values():
                run_as_service(command, cwd=job.workspace, env=env)
        samples: dict[str, list[Run]] = {name: [] for name in variants}
        for index in range(runs):
            for name in rotated(list(variants), index):
                command, env = variants[name]
                samples[name].append(run_as_service(command, cwd=job.workspace, env=env))
    elapsed = time.monotonic() - started

    ms = {name: [run.seconds * 1000.0 for run in values] for name, values in samples.items()}
    base = statistics.median(ms[BASELINE])
    plain = statistics.median(ms[PLAIN])
    results_by_variant: dict[str, dict[str, Any]] = {}
    for name, values in ms.items():
        stats = summary(values)
        results_by_variant[name] = {
            "ms": stats,
            "ratio_to_bare": stats["median"] / base,
            "ratio_to_bare_95ci": ratio_interval(values, ms[BASELINE]),
            "paired_ratio_to_bare": summary(paired_ratios(values, ms[BASELINE])),
            "added_ms_over_bare": stats["median"] - base,
            "ratio_to_plain_apptainer": stats["median"] / plain,
            "ratio_to_plain_apptainer_95ci": ratio_interval(values, ms[PLAIN]),
            "samples_ms": [round(v, 3) for v in values],
        }
    load = other_load(run for values in samples.values() for run in values)
    results = {
        "benchmark": NAME,
        "date": now_utc(),
        "quick": quick,
        "settings": {"runs": runs, "warmup_rounds": warmup, "order": "interleaved, rotating per round",
                     "image": str(IMAGE), "run_as": "hpcrunner via runuser, env -i"},
        "machine": machine,
        "other_load": load,
        "commands": {name: list(command) for name, (command, _env) in variants.items()},
        "variants": results_by_variant,
        "duration_seconds": round(elapsed, 1),
    }
    write_results(output, results)

    print(f"Sandbox start overhead, {runs} interleaved runs each ({elapsed:.0f} s), "
          f"{machine['cores']} cores, kernel {machine['kernel']}, Apptainer {machine['apptainer']}; "
          f"other processes kept {load:.2f} cores busy meanwhile:\n")
    rows = []
    for name, entry in results_by_variant.items():
        stats = entry["ms"]
        low, high = entry["ratio_to_plain_apptainer_95ci"]
        rows.append([name, f"{stats['median']:.1f}", f"{stats['p10']:.1f}", f"{stats['p90']:.1f}",
                     f"{entry['ratio_to_bare']:.1f}×", f"{entry['added_ms_over_bare']:+.1f}",
                     f"{entry['ratio_to_plain_apptainer']:.2f}× ({low:.2f}–{high:.2f})"])
    print(markdown_table(["variant", "median ms", "p10 ms", "p90 ms", "× bare true", "+ms over bare",
                          "× plain apptainer (95% CI)"], rows))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
