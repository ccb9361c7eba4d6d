"""What collecting a job's outputs costs, against `sha256sum` of the same files.

When a job ends, the agent keeps the files its `outputs` globs match in the job's directory (a
second name of each file's inode, or a copy of a file with other names) and digests them
(runner/provenance/outputs.py: a walk by descriptors, O_NOFOLLOW). What it cannot beat is reading
every byte once, which is what `sha256sum` does. Two sets of files, each in interleaved rounds with
the baselines of the same round:

- `large`: 2 GiB in 8 files;
- `small`: 20,000 files of 4 KiB in 100 directories.

Measured per round: `sha256sum FILES` (the target: collecting should cost at most 1.2 times
this), the same digests in-process with `hashlib` (OpenSSL's SHA-256, the one collecting uses:
reading every byte once), `cp -r` then `sha256sum` of the copies (what collecting does, as two
commands), and `collect_outputs` in-process. Page cache warm for all (an untimed round first); each copy is
removed, untimed, before the next variant.

    sudo /opt/hpc-runner/venv/bin/python bench/outputs.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Measure the checkout's code, not the copy installed in the venv.
sys.path.insert(0, str(REPO))

import runner.provenance.outputs as outputs_module  # noqa: E402
from bench._common import (  # noqa: E402
    WORK_PARENT,
    common_arguments,
    machine_info,
    main_guard,
    markdown_table,
    now_utc,
    ratio_interval,
    rotated,
    summary,
    write_results,
)
from runner.provenance.outputs import collect_outputs  # noqa: E402

# (directories, files per directory, bytes per file)
SETS = {
    "large": (1, 8, 256 * 1024 * 1024),
    "small": (100, 200, 4096),
}
QUICK_SETS = {
    "large": (1, 8, 4 * 1024 * 1024),
    "small": (10, 50, 4096),
}
PATTERN = "results/**/*.dat"
TARGET_RATIO = 1.2
VARIANTS = ("sha256sum", "hashlib, read only", "cp -r + sha256sum", "collect_outputs")


def make_files(root: Path, directories: int, files: int, size: int) -> list[Path]:
    """`directories` under root/results, each with `files` files of `size` random bytes."""
    chunk = os.urandom(min(size, 1024 * 1024))
    made = []
    for d in range(directories):
        folder = root / "results" / f"part{d:03}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            path = folder / f"file{f:04}.dat"
            with open(path, "wb") as handle:
                left = size
                while left:
                    handle.write(chunk[:left])
                    left -= min(left, len(chunk))
            made.append(path)
    return made


def sha256sum(paths: list[Path], cwd: Path) -> dict[str, str]:
    """`sha256sum` of the files (relative names, fed on stdin to xargs so that any count fits)."""
    listing = b"\0".join(str(p.relative_to(cwd)).encode() for p in paths) + b"\0"
    result = subprocess.run(["xargs", "-0", "sha256sum", "--"], input=listing, cwd=cwd, capture_output=True,
                            check=True)
    digests = {}
    for line in result.stdout.decode().splitlines():
        digest, name = line.split("  ", 1)
        digests[name] = digest
    return digests


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_set(work: Path, name: str, shape: tuple[int, int, int], rounds: int) -> dict[str, Any]:
    workspace = work / "workspace"
    files = make_files(workspace, *shape)
    total = shape[0] * shape[1] * shape[2]
    counter = iter(range(1_000_000))
    expected = sha256sum(files, workspace)

    def fresh(prefix: str) -> Path:
        return work / f"{prefix}-{next(counter)}"

    def plain() -> None:
        sha256sum(files, workspace)

    def digest_only() -> None:
        # The floor for the same hash implementation as collect_outputs: every byte read once.
        for path in files:
            with open(path, "rb") as handle:
                hashlib.file_digest(handle, "sha256")

    def copy_then_digest() -> Path:
        target = fresh("cp")
        target.mkdir()
        subprocess.run(["cp", "-r", str(workspace / "results"), str(target)], check=True)
        copies = [target / p.relative_to(workspace) for p in files]
        digests = sha256sum(copies, target)
        assert digests == expected, "cp + sha256sum digested something else"
        return target

    # A job's collection stops at MAX_FILES; the per-file cost is what is measured here.
    outputs_module.MAX_FILES = max(outputs_module.MAX_FILES, len(files))

    def collect() -> Path:
        target = fresh("collected")
        collected = collect_outputs(workspace, [PATTERN], target, max_bytes=total)
        digests = {f.path: f.sha256 for f in collected.files}
        assert digests == expected, "collect_outputs digested something else"
        return target

    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for index in range(rounds + 1):  # the first round warms the cache and is not kept
        for variant in rotated(list(VARIANTS), index):
            made: list[Path] = []
            if variant == "sha256sum":
                seconds = timed(plain)
            elif variant == "hashlib, read only":
                seconds = timed(digest_only)
            elif variant == "cp -r + sha256sum":
                seconds = timed(lambda made=made: made.append(copy_then_digest()))
            else:
                seconds = timed(lambda made=made: made.append(collect()))
            for path in made:
                shutil.rmtree(path)
            if index:
                samples[variant].append(seconds)
    baseline = samples["sha256sum"]
    result: dict[str, Any] = {"set": name, "files": len(files), "bytes": total, "variants": {}}
    for variant in VARIANTS:
        low, high = ratio_interval(samples[variant], baseline)
        copy_low, copy_high = ratio_interval(samples[variant], samples["cp -r + sha256sum"])
        result["variants"][variant] = {
            "seconds": summary(samples[variant]), "samples": samples[variant],
            "ratio_to_sha256sum": statistics.median(samples[variant]) / statistics.median(baseline),
            "ratio_to_sha256sum_95ci": [low, high],
            "ratio_to_cp_and_sha256sum": (statistics.median(samples[variant])
                                          / statistics.median(samples["cp -r + sha256sum"])),
            "ratio_to_cp_and_sha256sum_95ci": [copy_low, copy_high],
            "mb_s": total / statistics.median(samples[variant]) / 1e6,
        }
    ratio = result["variants"]["collect_outputs"]["ratio_to_sha256sum"]
    result["target_ratio"] = TARGET_RATIO
    result["target_met"] = ratio <= TARGET_RATIO
    return result


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    sets = QUICK_SETS if args.quick else SETS
    rounds = 2 if args.quick else args.rounds
    WORK_PARENT.mkdir(mode=0o755, parents=True, exist_ok=True)
    results = []
    for name, shape in sets.items():
        with tempfile.TemporaryDirectory(prefix="outputs-", dir=WORK_PARENT) as work:
            results.append(measure_set(Path(work), name, shape, rounds))
        print(f"{name}: " + ", ".join(f"{variant} {data['seconds']['median']:.3f} s"
                                      for variant, data in results[-1]["variants"].items()), flush=True)
    rows = []
    for entry in results:
        for variant, data in entry["variants"].items():
            low, high = data["ratio_to_sha256sum_95ci"]
            rows.append([entry["set"], f"{entry['files']} files, {entry['bytes'] / 2 ** 20:.0f} MiB", variant,
                         f"{data['seconds']['median'] * 1000:.0f} ms", f"{data['mb_s']:.0f} MB/s",
                         f"{data['ratio_to_sha256sum']:.2f} ({low:.2f}-{high:.2f})",
                         f"{data['ratio_to_cp_and_sha256sum']:.2f}"])
    print(markdown_table(["set", "size", "variant", "median", "throughput", "ratio to sha256sum (95% CI)",
                          "ratio to cp + sha256sum"], rows))
    write_results(args.output, {
        "benchmark": "outputs", "date": now_utc(), "quick": args.quick,
        "settings": {"rounds": rounds, "pattern": PATTERN, "sets": {n: list(s) for n, s in sets.items()}},
        "machine": machine_info(),
        "commands": {"sha256sum": "xargs -0 sha256sum -- FILES",
                     "hashlib, read only": "hashlib.file_digest(open(FILE, 'rb'), 'sha256') for each FILE",
                     "cp -r + sha256sum": "cp -r WORKSPACE/results DST; xargs -0 sha256sum -- COPIES",
                     "collect_outputs": "runner.provenance.outputs.collect_outputs("
                                        f"WORKSPACE, [{PATTERN!r}], DST)"},
        "results": results, "duration_seconds": round(time.monotonic() - started, 1)})
    print(f"results: {args.output}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "outputs")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default: %(default)s)")
    args = parser.parse_args()
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
