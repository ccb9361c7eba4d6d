"""What copying a submitted workspace costs, against `cp -a` of the same tree.

`hpc-runner submit` copies the submitter's directory into the job's own directory (by
descriptors, never following a link: sandbox/workspace.py), and copies what the job created or
changed back when it ends. Two trees are measured, each in interleaved rounds with `cp -a` as
the baseline of the same round:

- `source tree`: a project checkout, many small files in nested directories;
- `data`: a few large files.

Measured per round: `cp -a SRC DST` (the baseline), `copy_in` of SRC, and `copy_back` twice:
when the job changed nothing (the walk alone) and when it rewrote every file. Page cache warm
for all variants alike (untimed warm-up runs first).

    sudo /opt/hpc-runner/venv/bin/python bench/workspace_copy.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
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
from sandbox.workspace import Snapshot, copy_back, copy_in  # noqa: E402

# (directories, files per directory, bytes per file)
TREES = {
    "source tree": (100, 30, 4096),
    "data": (1, 4, 64 * 1024 * 1024),
}
QUICK_TREES = {
    "source tree": (10, 10, 4096),
    "data": (1, 2, 4 * 1024 * 1024),
}


def make_tree(root: Path, directories: int, files: int, size: int) -> int:
    """A tree of `directories` nested two levels deep, each holding `files` files; its bytes."""
    chunk = os.urandom(min(size, 1024 * 1024))
    for d in range(directories):
        folder = root / f"pkg{d % 10}" / f"mod{d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            with open(folder / f"file{f}.dat", "wb") as handle:
                left = size
                while left:
                    handle.write(chunk[:left])
                    left -= min(left, len(chunk))
    return directories * files * size


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_tree(work: Path, name: str, shape: tuple[int, int, int], rounds: int) -> dict[str, Any]:
    source = work / "source"
    source.mkdir()
    total = make_tree(source, *shape)
    uid = os.getuid()
    counter = iter(range(1_000_000))

    def fresh(prefix: str) -> Path:
        return work / f"{prefix}-{next(counter)}"

    def cp_a() -> None:
        target = fresh("cp")
        subprocess.run(["cp", "-a", str(source), str(target)], check=True)
        shutil.rmtree(target)

    def copy_in_only() -> None:
        target = fresh("in")
        copy_in(source, target, owner=uid, agent_uid=uid, max_bytes=total * 2)
        shutil.rmtree(target)

    # copy_back needs a copy and its snapshot (and writes into `source`); made untimed.
    def prepared() -> tuple[Path, Snapshot]:
        target = fresh("job")
        return target, copy_in(source, target, owner=uid, agent_uid=uid, max_bytes=total * 2)

    def touch_all(copy: Path) -> None:
        for path in copy.rglob("*.dat"):
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))

    variants = ["cp -a", "copy in", "copy back, nothing changed", "copy back, every file changed"]
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for index in range(rounds + 1):  # the first round warms the cache and is not kept
        for variant in rotated(variants, index):
            if variant == "cp -a":
                seconds = timed(cp_a)
            elif variant == "copy in":
                seconds = timed(copy_in_only)
            else:
                copy, snapshot = prepared()
                if variant.endswith("every file changed"):
                    touch_all(copy)  # a new mtime is what tells copy_back a file changed
                seconds = timed(lambda c=copy, s=snapshot: copy_back(c, s, job_id="bench"))
                shutil.rmtree(copy)
            if index:
                samples[variant].append(seconds)
    baseline = samples["cp -a"]
    result: dict[str, Any] = {"tree": name, "directories": shape[0], "files": shape[0] * shape[1],
                              "bytes": total, "variants": {}}
    for variant in variants:
        low, high = ratio_interval(samples[variant], baseline)
        result["variants"][variant] = {
            "seconds": summary(samples[variant]), "samples": samples[variant],
            "ratio_to_cp": statistics.median(samples[variant]) / statistics.median(baseline),
            "ratio_to_cp_95ci": [low, high],
            "mb_s": total / statistics.median(samples[variant]) / 1e6,
        }
    return result


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    trees = QUICK_TREES if args.quick else TREES
    rounds = 2 if args.quick else args.rounds
    WORK_PARENT.mkdir(mode=0o755, parents=True, exist_ok=True)
    results = []
    for name, shape in trees.items():
        with tempfile.TemporaryDirectory(prefix="workspace-", dir=WORK_PARENT) as work:
            results.append(measure_tree(Path(work), name, shape, rounds))
    rows = []
    for tree in results:
        for variant, data in tree["variants"].items():
            low, high = data["ratio_to_cp_95ci"]
            rows.append([tree["tree"], f"{tree['files']} files, {tree['bytes'] / 1e6:.0f} MB", variant,
                         f"{data['seconds']['median'] * 1000:.1f} ms", f"{data['mb_s']:.0f} MB/s",
                         f"{data['ratio_to_cp']:.2f} ({low:.2f}-{high:.2f})"])
    print(markdown_table(["tree", "size", "variant", "median", "throughput", "ratio to cp -a (95% CI)"],
                         rows))
    write_results(args.output, {
        "benchmark": "workspace_copy", "date": now_utc(), "quick": args.quick,
        "settings": {"rounds": rounds, "trees": {name: list(shape) for name, shape in trees.items()}},
        "machine": machine_info(), "commands": {"cp -a": "cp -a SRC DST"}, "results": results,
        "duration_seconds": round(time.monotonic() - started, 1)})
    print(f"results: {args.output}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "workspace_copy")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (default: %(default)s)")
    args = parser.parse_args()
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
