"""MPI allreduce latency across the two namespace nodes: the product's sandbox against bare host MPI.

The same program, `mpi-latency BYTES ITERATIONS` (runner/bundled/mpi-latency.c, copied out of
the test image so that both sides run identical bytes), with the host's Open MPI, one rank on
each node of the two-node cluster (deploy/dev/two-nodes.sh), launched two ways in one 2-node
allocation, as the service account:

- `bare host MPI`: `srun --mpi=pmix ... ./mpi-latency ...`, the same srun options the Slurm
  executor plans, without Apptainer;
- `sandbox`: the Slurm executor's launch line for the job, as the product plans it (policy
  decision, image verification, `prepare_job`, `plan_srun_launch`): srun, the rank wrapper,
  `apptainer exec` with the host MPI bound in.

The rounds interleave the variants in rotating order inside the one allocation, so both see the
same nodes and the same neighbours; the program times its own allreduce loop, so start costs do
not enter the latency (each launch's wall time is reported apart). Target: the sandbox within 5%
of bare.

    sudo /opt/hpc-runner/venv/bin/python bench/two_node_latency.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Measure the checkout's planner, not the copy installed in the venv (which can lag behind).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    IMAGE,
    IMAGE_NAME,
    QUIET_LOAD,
    SERVICE_ENV,
    SERVICE_USER,
    BenchError,
    check_environment,
    common_arguments,
    give_to_service,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    paired_ratios,
    ratio_interval,
    rotated,
    service_argv,
    summary,
)
from bench._common import write_results as write_json
from bench._slurm import SlurmBenchSite
from bench.mpi_latency import DEFAULT_ITERATIONS, IMAGE_BINARY, OUTPUT_LINE, QUICK_ITERATIONS, copy_binary_out
from runner.config import parse_config_text
from runner.lifecycle.prepare import Site
from runner.policy import parse_policy_text
from sandbox.plan import plan_srun_launch

NAME = "two_node_latency"
TWO_NODES_CONF = Path("/etc/slurm/two-nodes/slurm.conf")
# Every node sees this directory; each node's /tmp is its own.
SHARED = Path("/srv/hpc-runner-two-nodes")
PARTITION = "nodes"
SLURM_ACCOUNT = "hpcr-test"
SIZES = (4, 1 << 20)
DEFAULT_ROUNDS = 12
QUICK_ROUNDS = 2
TARGET_RATIO = 1.05
BARE = "bare host MPI"
SANDBOX = "sandbox"
# A launch's mark: round, size, variant, then the wall clock and the machine's busy CPU ticks
# (/proc/stat: both nodes are this machine) before and after it.
MARK = re.compile(r"^=== (\d+) (\d+) (\S.*) ([0-9.]+) ([0-9.]+) (\d+) (\d+)$", re.MULTILINE)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The machine's busy ticks: user, nice, system, irq, softirq, steal.
BUSY_FUNCTION = 'busy() { read -r _ u n s _ _ q sq st _ </proc/stat; echo $((u + n + s + q + sq + st)); }'


def slurm_env() -> dict[str, str]:
    return {**SERVICE_ENV, "USER": SERVICE_USER, "LOGNAME": SERVICE_USER, "SLURM_CONF": str(TWO_NODES_CONF)}


def check_two_nodes() -> None:
    if not TWO_NODES_CONF.is_file():
        raise BenchError(f"no two-node cluster ({TWO_NODES_CONF}); run `sudo bash deploy/dev/setup.sh` first")
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env={**os.environ, "SLURM_CONF": str(
        TWO_NODES_CONF)}, capture_output=True, text=True, timeout=60, check=False)
    states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
    usable = [node for node, state in states.items() if state in ("idle", "mixed", "allocated", "completing")]
    if result.returncode != 0 or len(usable) < 2:
        raise BenchError("the two-node cluster has not two usable nodes: "
                         f"{result.stdout.strip() or result.stderr.strip()}")


def policy_text() -> str:
    sha = IMAGE.with_name(IMAGE.name + ".sha256").read_text().strip()
    return f"""version = 1

[accounts.bench]
slurm_account = "{SLURM_ACCOUNT}"
partitions = ["{PARTITION}"]
max_nodes = 2
max_time = "20m"

[images.{IMAGE_NAME}]
path = {json.dumps(str(IMAGE))}
sha256 = {json.dumps(sha)}

[[grants]]
name = "bench"
principals = ["local:user:{SERVICE_USER}"]
account = "bench"
images = ["{IMAGE_NAME}"]
mpi = true
"""


def job_text(size: int, iterations: int) -> str:
    return f"""
[job]
name = "bench-two-node-latency"
image = "{IMAGE_NAME}"
command = ["{IMAGE_BINARY}", "{size}", "{iterations}"]

[job.resources]
nodes = 2
tasks = 2

[job.mpi]
enabled = true
"""


@contextlib.contextmanager
def shared_site() -> Iterator[SlurmBenchSite]:
    """A config, policy and workspace under a fresh directory of the service account on the shared path."""
    if not SHARED.is_dir():
        raise BenchError(f"no {SHARED}; run `sudo bash deploy/dev/setup.sh` first")
    root = Path(tempfile.mkdtemp(prefix="bench-latency-", dir=SHARED))
    try:
        give_to_service(root, 0o755)
        policy = parse_policy_text(policy_text(), "<bench policy>")
        config = parse_config_text(f"""state_dir = {json.dumps(str(root / "state"))}
work_root = {json.dumps(str(root / "work"))}
executor = "slurm"
""")
        site = Site(config, policy)
        # Root plans, the service account runs: no root-only Apptainer flags.
        site.sandbox = replace(site.sandbox, userns=False)
        workspace = root / "workspace"
        workspace.mkdir()
        give_to_service(workspace, 0o755)
        yield SlurmBenchSite(root, site, workspace)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Launch:
    command: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str

    def lines(self, mark: str) -> list[str]:
        """Shell lines: the launch in a subshell with its environment, framed by the clock."""
        exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items()))
        return ["t0=$(date +%s.%N) b0=$(busy)",
                f"(cd {shlex.quote(self.cwd)} && export {exports} && {shlex.join(self.command)}) || exit 1",
                f'echo "=== {mark} $t0 $(date +%s.%N) $b0 $(busy)"']


def launches_for(bench: SlurmBenchSite, binary: Path, size: int, iterations: int) -> dict[str, Launch]:
    job = bench.prepare(job_text(size, iterations))
    sandbox = plan_srun_launch(job.plan, job.spec, job.decision)
    tail = (*job.plan.rank_wrapper, *job.plan.argv)
    if sandbox[-len(tail):] != tail:
        raise BenchError("the planned srun launch does not end with the rank wrapper and the sandbox")
    bare = (*sandbox[:-len(tail)], str(binary), str(size), str(iterations))
    env = dict(job.plan.host_env)
    return {BARE: Launch(bare, env, str(job.job_dir)), SANDBOX: Launch(sandbox, env, str(job.job_dir))}


def batch_script(launches: Mapping[int, Mapping[str, Launch]], rounds: int) -> str:
    lines = ["#!/bin/bash", "set -u", BUSY_FUNCTION,
             "# Untimed: the first start of a container or of a step pays for cold caches."]
    for size, by_variant in launches.items():
        for variant, launch in by_variant.items():
            lines += launch.lines(f"warmup {size} {variant}")
    for index in range(rounds):
        for size, by_variant in launches.items():
            for variant in rotated(list(by_variant), index):
                lines += by_variant[variant].lines(f"{index} {size} {variant}")
    return "\n".join(lines) + "\n"


def hand_over(root: Path) -> None:
    """Give everything the planning wrote (as root) to the service account, as the agent's own
    files would belong to it."""
    account = pwd.getpwnam(SERVICE_USER)
    for directory, _, files in os.walk(root):
        os.chown(directory, account.pw_uid, account.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), account.pw_uid, account.pw_gid)


def run_allocation(root: Path, script: str, rounds: int) -> tuple[str, str]:
    """Run the batch script in one 2-node allocation; its Slurm job id and output."""
    path = root / "bench.sh"
    path.write_text(script)
    give_to_service(path, 0o755)
    output = root / "bench.out"
    minutes = max(5, rounds * 2)
    argv = ["sbatch", "--parsable", "--wait", f"--account={SLURM_ACCOUNT}", f"--partition={PARTITION}",
            "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", f"--time={minutes}", f"--chdir={root}",
            f"--output={output}", "--export=NONE", "--job-name=hpcr-bench-two-node-latency", str(path)]
    result = subprocess.run(service_argv(argv, slurm_env()), cwd=root, capture_output=True, text=True,
                            timeout=minutes * 60 + 120, check=False)
    text = output.read_text(errors="replace") if output.exists() else ""
    if result.returncode != 0:
        raise BenchError(f"the benchmark's allocation failed ({result.returncode}): "
                         f"{result.stderr.strip()}\n{text[-3000:]}")
    return result.stdout.strip().split(";")[0], text


def cpu_seconds(text: str) -> float:
    """sacct's TotalCPU ([D-][H:]M:S.mmm) in seconds."""
    days, _, rest = text.rpartition("-")
    parts = [float(part) for part in rest.split(":")]
    seconds = sum(value * 60 ** (len(parts) - 1 - i) for i, value in enumerate(parts))
    return seconds + (float(days) * 86400 if days else 0.0)


def step_cpu(slurm_id: str, steps: int) -> list[float]:
    """CPU seconds of the allocation's steps 0..steps-1 (each launch is one srun: one step), as
    accounting recorded them: what the launch itself used, on both nodes."""
    def recorded() -> dict[int, float] | None:
        result = subprocess.run(["sacct", "-n", "-P", "-j", slurm_id, "-o", "JobID,TotalCPU"],
                                env={**os.environ, "SLURM_CONF": str(TWO_NODES_CONF)}, capture_output=True,
                                text=True, timeout=60, check=False)
        found = {}
        for line in result.stdout.splitlines():
            job, _, cpu = line.partition("|")
            step = job.rpartition(".")[2]
            if job.startswith(f"{slurm_id}.") and step.isdigit():
                found[int(step)] = cpu_seconds(cpu)
        return found if len(found) >= steps else None

    deadline = time.monotonic() + 60
    while (found := recorded()) is None:
        if time.monotonic() > deadline:
            raise BenchError(f"sacct does not list the {steps} steps of job {slurm_id}")
        time.sleep(1)
    return [found[step] for step in range(steps)]


@dataclass(frozen=True)
class Sample:
    round: int
    latency_us: float
    seconds: float
    other_load: float  # cores' worth of other processes' CPU during the launch


def parse(text: str, rounds: int, cpu: list[float], warmups: int) -> dict[int, dict[str, list[Sample]]]:
    """size -> variant -> samples in round order. `cpu` is every step's CPU seconds, warm-ups first."""
    found: dict[int, dict[str, list[Sample]]] = {}
    chunks = MARK.split(text)
    # MARK.split gives [before, round, size, variant, t0, t1, b0, b1, between, ...]: a launch's
    # output is the text before its mark.
    for launch, at in enumerate(range(1, len(chunks), 8)):
        before = chunks[at - 1]
        index, size, variant = int(chunks[at]), int(chunks[at + 1]), chunks[at + 2]
        latencies = OUTPUT_LINE.findall(before.split("=== warmup")[-1])
        if len(latencies) != 1 or int(latencies[0][0]) != size:
            raise BenchError(f"{variant}, {size} B: expected one allreduce_latency_us line from rank 0, "
                             f"got:\n{before[-2000:]}")
        seconds = float(chunks[at + 4]) - float(chunks[at + 3])
        busy = (int(chunks[at + 6]) - int(chunks[at + 5])) / CLOCK_TICKS
        other = max(busy - cpu[warmups + launch], 0.0) / seconds
        found.setdefault(size, {}).setdefault(variant, []).append(
            Sample(index, float(latencies[0][1]), seconds, other))
    for size in SIZES:
        for variant in (BARE, SANDBOX):
            if len(found.get(size, {}).get(variant, [])) != rounds:
                raise BenchError(f"{variant}, {size} B: not {rounds} results in the allocation's output")
    return found


def variant_stats(values: list[float], bare: list[float]) -> dict[str, Any]:
    stats = summary(values)
    return {"latency_us": stats, "ratio_to_bare": stats["median"] / summary(bare)["median"],
            "ratio_to_bare_95ci": ratio_interval(values, bare),
            "paired_ratio_to_bare": summary(paired_ratios(values, bare))}


def size_results(iterations: int, by_variant: Mapping[str, list[Sample]]) -> dict[str, Any]:
    latencies = {v: [sample.latency_us for sample in samples] for v, samples in by_variant.items()}
    # Slurm's own work for a launch (slurmd, slurmstepd and its PMIx server on both nodes) is
    # busy CPU that sacct does not charge to the step: the least "other load" any launch of a
    # variant saw stands for it, and only what a launch saw beyond that counts as disturbance.
    # A round is quiet only if both of its launches were undisturbed, so that quiet rounds still
    # compare like with like: two ranks that poll for messages on this machine's two cores lose a
    # core to any third busy process.
    floor = {v: min(sample.other_load for sample in samples) for v, samples in by_variant.items()}
    rounds = range(len(latencies[BARE]))
    quiet = [i for i in rounds
             if all(samples[i].other_load - floor[v] <= QUIET_LOAD for v, samples in by_variant.items())]
    variants: dict[str, Any] = {}
    for variant, values in latencies.items():
        samples = by_variant[variant]
        entry = variant_stats(values, latencies[BARE])
        if quiet:
            entry["quiet_rounds"] = variant_stats([values[i] for i in quiet],
                                                  [latencies[BARE][i] for i in quiet])
        entry.update({
            "other_load": statistics.median(sample.other_load for sample in samples),
            "other_load_floor": floor[variant],
            "launch_seconds": summary([sample.seconds for sample in samples]),
            "samples_us": values,
            "samples_other_load": [round(sample.other_load, 3) for sample in samples],
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved rounds (default {DEFAULT_ROUNDS}, --quick {QUICK_ROUNDS})")
    common_arguments(parser, NAME)
    args = parser.parse_args()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    iterations = QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS
    return main_guard(lambda: measure(rounds, iterations, args.quick, args.output))


def measure(rounds: int, iterations: Mapping[int, int], quick: bool, output: Path) -> int:
    check_environment()
    check_two_nodes()
    machine = machine_info()
    started = time.monotonic()
    with shared_site() as bench:
        binary = copy_binary_out(bench.root)
        launches = {size: launches_for(bench, binary, size, iterations[size]) for size in SIZES}
        hand_over(bench.root)
        slurm_id, text = run_allocation(bench.root, batch_script(launches, rounds), rounds)
        binary_sha256 = hashlib.sha256(binary.read_bytes()).hexdigest()
    elapsed = time.monotonic() - started
    warmups = sum(len(by_variant) for by_variant in launches.values())
    cpu = step_cpu(slurm_id, warmups + rounds * warmups)
    samples = parse(text, rounds, cpu, warmups)
    sizes = {str(size): size_results(iterations[size], samples[size]) for size in SIZES}
    results = {
        "benchmark": NAME,
        "date": now_utc(),
        "quick": quick,
        "settings": {"ranks": 2, "nodes": 2, "rounds": rounds, "order": "interleaved, rotating per round",
                     "target_ratio": TARGET_RATIO, "image": str(IMAGE), "binary_sha256": binary_sha256,
                     "quiet_load": QUIET_LOAD, "slurm_conf": str(TWO_NODES_CONF), "slurm_job": slurm_id,
                     "run_as": "hpcrunner, sbatch --export=NONE"},
        "machine": machine,
        "commands": {str(size): {v: list(launch.command) for v, launch in by_variant.items()}
                     for size, by_variant in launches.items()},
        "sizes": sizes,
        "duration_seconds": round(elapsed, 1),
    }
    write_json(output, results)
    print_report(results, machine, rounds, elapsed)
    print(f"\nwrote {output}")
    return 0


def print_report(results: Mapping[str, Any], machine: Mapping[str, Any], rounds: int, elapsed: float) -> None:
    print(f"MPI allreduce latency, 1 rank on each of 2 namespace nodes, {rounds} interleaved rounds in one "
          f"allocation ({elapsed:.0f} s), Open MPI {machine['openmpi']}, Apptainer {machine['apptainer']}:\n")
    rows = []
    quiet_rows = []
    for size, entry in results["sizes"].items():
        for variant, stats in entry["variants"].items():
            low, high = stats["ratio_to_bare_95ci"]
            target = ("met" if entry["sandbox_target_met"] else "not met") if variant == SANDBOX else ""
            lat = stats["latency_us"]
            rows.append([f"{size} B", variant, f"{lat['median']:.2f}", f"{lat['p10']:.2f}",
                         f"{lat['p90']:.2f}", f"{stats['ratio_to_bare']:.3f} ({low:.2f}–{high:.2f})",
                         f"{stats['launch_seconds']['median']:.2f}", f"{stats['other_load']:.2f}", target])
            if "quiet_rounds" in stats:
                q = stats["quiet_rounds"]
                low, high = q["ratio_to_bare_95ci"]
                quiet_target = ""
                if variant == SANDBOX:
                    quiet_target = "met" if entry["sandbox_target_met_in_quiet_rounds"] else "not met"
                quiet_rows.append([f"{size} B ({entry['quiet_rounds']} of {rounds})", variant,
                                   f"{q['latency_us']['median']:.2f}", f"{q['latency_us']['p10']:.2f}",
                                   f"{q['latency_us']['p90']:.2f}",
                                   f"{q['ratio_to_bare']:.3f} ({low:.2f}–{high:.2f})",
                                   quiet_target])
    print(markdown_table(["size", "variant", "median us", "p10 us", "p90 us", "× bare (95% CI)",
                          "launch s (median)", "other load (cores)", f"target ≤ {TARGET_RATIO}×"], rows))
    if quiet_rows:
        print(f"\nQuiet rounds only (each launch saw at most {QUIET_LOAD} core more other load than the "
              "least disturbed launch of its variant):\n")
        print(markdown_table(["size (rounds)", "variant", "median us", "p10 us", "p90 us", "× bare (95% CI)",
                              f"target ≤ {TARGET_RATIO}×"], quiet_rows))
    else:
        print(f"\nno quiet round: in every round a launch saw more than {QUIET_LOAD} core above the least "
              "disturbed launch of its variant")


if __name__ == "__main__":
    sys.exit(main())
