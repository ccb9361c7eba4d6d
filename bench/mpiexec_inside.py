"""The start cost of `mpiexec` from inside the sandbox against `srun` of the same ranks from outside.

One Slurm job of the product's (`[job.mpi] launch = "inside"`, 2 tasks, planned and prepared by
the product's pipeline) runs a batch script written from the product's own pieces, which
alternates two variants in rotating order, each round in the same allocation on the same node:

- `srun from outside`: the exact launch the mpiexec launcher would run for `mpiexec -n 2
  /bin/true` (srun --mpi=pmix, the rank wrapper, `apptainer exec` of the rank sandbox), run by the
  batch script itself and timed there;
- `mpiexec from inside`: the product's launcher with the job's command (its sandbox), whose script
  times `mpiexec -n 2 /bin/true`: the shim's request, the launcher's checks and env file, the same
  srun launch, and the answer. The command's own sandbox start is outside the timed span.

Both clocks are the node's (`date +%s%N`, inside and outside the container). The difference of
each round's pair is the price of asking from inside. The launcher is the venv's installed copy
(`python -I -m sandbox.mpiexec_launcher`), as on a compute node.

    sudo /opt/hpc-runner/venv/bin/python bench/mpiexec_inside.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Measure the checkout's planner, not the copy installed in the venv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    BenchError,
    check_environment,
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    paired_ratios,
    service_file,
    summary,
    write_results,
)
from bench._slurm import RUNUSER, SlurmBenchSite, cancel_all, check_slurm, slurm_site
from runner.executors.slurm.plan import plan_batch
from sandbox.mpiexec import Request, launch_env_text, parse_launcher_argv, rank_launch
from sandbox.plan import plan_srun_launch

NAME = "mpiexec_inside"
DEFAULT_ROUNDS = 20
QUICK_ROUNDS = 2
WARMUP_ROUNDS = 1
RANKS = 2
PROGRAM = "/bin/true"
INSIDE = "mpiexec from inside"
OUTSIDE = "srun from outside"
JOB_TIMEOUT_S = 600.0
JOB = f"""[job]
name = "mpiexec-inside"
image = "test"
script = '''
t0=$(date +%s%N)
mpiexec -n {RANKS} {PROGRAM} && status=0 || status=$?
t1=$(date +%s%N)
echo "bench inside $((t1 - t0)) $status"
'''

[job.resources]
tasks = {RANKS}
time = "10m"

[job.mpi]
enabled = true
launch = "inside"
"""
SAMPLE = re.compile(r"^bench (inside|outside) (\d+) (\d+)$", re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds (default {DEFAULT_ROUNDS}, --quick {QUICK_ROUNDS})")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    return main_guard(lambda: measure(rounds, args.quick, args.output))


def batch_script(site: SlurmBenchSite, rounds: int) -> tuple[str, tuple[str, ...], dict[str, list[str]]]:
    """The job's sbatch arguments and a batch script of rounds of both variants, from the product's
    plan: its exports, its launcher line, and the launch that launcher makes of the request."""
    prepared = site.prepare(JOB)
    site.hand_over(prepared)
    batch = plan_batch(prepared, comment="bench mpiexec_inside")
    launcher = plan_srun_launch(prepared.plan, prepared.spec, prepared.decision, python=sys.executable)
    args = parse_launcher_argv(launcher[4:])
    request = Request(ranks=RANKS, argv=(PROGRAM,), cwd="/work")
    env_file = Path(args.inside.env_file).with_name("bench-outside.env")
    job_env = Path(args.inside.env_file).read_text()
    service_file(env_file, launch_env_text(job_env, request), 0o600)
    outside = rank_launch(args, request, str(env_file))
    exports = [line for line in batch.script.splitlines() if line.startswith("export ")]
    total = WARMUP_ROUNDS + rounds
    script = "\n".join([
        "#!/bin/bash",
        "set -u",
        *exports,
        f"for round in $(seq 1 {total}); do",
        '    if [ $((round % 2)) -eq 1 ]; then order="outside inside"; else order="inside outside"; fi',
        "    for variant in $order; do",
        '        if [ "$variant" = outside ]; then',
        "            t0=$(date +%s%N)",
        f"            {shlex.join(outside)} && status=0 || status=$?",
        "            t1=$(date +%s%N)",
        '            echo "bench outside $((t1 - t0)) $status"',
        "        else",
        f"            {shlex.join(launcher)}",
        "        fi",
        "    done",
        "done",
        "echo bench done",
        "",
    ])
    return script, batch.args, {OUTSIDE: list(outside), INSIDE: list(launcher)}


def run_job(script: str, args: tuple[str, ...], log: Path, submitted: list[str]) -> str:
    result = subprocess.run([RUNUSER, "-u", "hpcrunner", "--", "sbatch", *args], input=script, text=True,
                            capture_output=True, timeout=60, check=False)
    if result.returncode != 0:
        raise BenchError(f"sbatch failed: {result.stderr.strip()}")
    slurm_id = result.stdout.strip().split(";")[0]
    submitted.append(slurm_id)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", slurm_id, "-o", "%T"], capture_output=True, text=True,
                               timeout=30, check=False).stdout.strip()
        if not state:
            break
        time.sleep(0.5)
    text = log.read_text(errors="replace") if log.exists() else ""
    if "bench done" not in text:
        raise BenchError(f"the job (Slurm {slurm_id}) did not finish its rounds:\n{text[-3000:]}")
    return text


def measure(rounds: int, quick: bool, output: Path) -> int:
    check_environment()
    check_slurm()
    machine = machine_info()
    started = time.monotonic()
    submitted: list[str] = []
    try:
        with slurm_site("mpiexec-") as site:
            script, args, commands = batch_script(site, rounds)
            log = Path(next(arg for arg in args if arg.startswith("--output=")).split("=", 1)[1])
            text = run_job(script, args, log, submitted)
    finally:
        cancel_all(submitted)
    elapsed = time.monotonic() - started
    samples: dict[str, list[float]] = {INSIDE: [], OUTSIDE: []}
    for variant, nanoseconds, status in SAMPLE.findall(text):
        if status != "0":
            raise BenchError(f"a launch ({variant}) failed with status {status}:\n{text[-3000:]}")
        samples[INSIDE if variant == "inside" else OUTSIDE].append(int(nanoseconds) / 1e6)
    if any(len(values) != WARMUP_ROUNDS + rounds for values in samples.values()):
        raise BenchError(f"expected {WARMUP_ROUNDS + rounds} samples of each variant:\n{text[-3000:]}")
    ms = {name: values[WARMUP_ROUNDS:] for name, values in samples.items()}
    added = [inside - outside for inside, outside in zip(ms[INSIDE], ms[OUTSIDE], strict=True)]
    variants: dict[str, Any] = {name: {"ms": summary(values), "samples_ms": [round(v, 1) for v in values]}
                                for name, values in ms.items()}
    variants[INSIDE]["paired_ratio_to_outside"] = summary(paired_ratios(ms[INSIDE], ms[OUTSIDE]))
    variants[INSIDE]["added_ms_over_outside"] = summary(added)
    results = {
        "benchmark": NAME,
        "date": now_utc(),
        "quick": quick,
        "settings": {"rounds": rounds, "warmup_rounds": WARMUP_ROUNDS, "ranks": RANKS, "program": PROGRAM,
                     "order": "interleaved, rotating per round, in one Slurm allocation",
                     "run_as": "hpcrunner via runuser"},
        "machine": machine,
        "commands": commands,
        "variants": variants,
        "duration_seconds": round(elapsed, 1),
    }
    write_results(output, results)
    print(f"mpiexec from inside against srun from outside, {RANKS} ranks of {PROGRAM}, {rounds} rounds "
          f"({elapsed:.0f} s), {machine['cores']} cores:\n")
    rows = []
    for name in (OUTSIDE, INSIDE):
        stats = variants[name]["ms"]
        extra = f"+{statistics.median(added):.0f} ms" if name == INSIDE else ""
        rows.append([name, f"{stats['median']:.0f}", f"{stats['p10']:.0f}", f"{stats['p90']:.0f}", extra])
    print(markdown_table(["variant", "median ms", "p10 ms", "p90 ms", "added (paired median)"], rows))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
