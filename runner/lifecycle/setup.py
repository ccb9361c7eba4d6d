"""A job's setup phase: one process on the agent's node, before the main phase.

Compute nodes have no internet, so what a job needs from it (packages, a Julia depot) is fetched
here first, into the job's named caches (bound read-write at /cache/NAME now, read-only in the
main phase) or its workspace. The setup runs in the job's image and workspace through the local
executor, whichever executor runs the main phase, with its own time limit (`[job.setup] time`,
capped by the account's `max_setup_time`) and the job's cancellation. Its output goes into the
job's log under a `--- setup` group; the size of each cache follows it, then the main phase's
output under `--- main`. A setup that fails, outlives its time or is cancelled ends the job, and
nothing is submitted to Slurm.

A job submitted again after a node failure does not run its setup again: the setup ran here,
not on the node that failed, and what it left in the caches and the workspace is still there.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from runner.errors import InfrastructureError
from runner.executors.local import DEFAULT_GRACE_SECONDS, LocalLaunch, memory_limit
from runner.job import Outcome
from runner.job.prepared import PreparedJob
from runner.lifecycle.notes import append_to_log
from runner.lifecycle.prepare import Site
from runner.policy import Decision
from sandbox.pathtrust import swappable
from sandbox.plan import SETUP_ENV_FILE_NAME, SETUP_SCRIPT_NAME, JobPaths, SandboxRefused, plan_setup

SETUP_GROUP = "--- setup"
MAIN_GROUP = "--- main"
# Counting a cache's size must not hold the job up for long: a depot of a million files is
# reported as "at least" what was counted by then.
CACHE_SIZE_SECONDS = 10.0
# The setup's own /tmp (and HOME): what it leaves there is not the main phase's.
SETUP_SCRATCH = "setup-tmp"

RunLocal = Callable[[LocalLaunch, asyncio.Event | None], Awaitable[Outcome]]


@dataclass(frozen=True)
class PreparedSetup:
    job_id: str
    launch: LocalLaunch
    caches: tuple[tuple[str, str], ...]   # (name, host directory)


def check_caches(decision: Decision) -> None:
    """Each of the job's caches must be a directory the service account owns and no one else may
    write: a job of another account (or anyone on the machine) must not be able to plant what the
    next job runs, nor swap the directory for a link. SandboxRefused says which and why."""
    trusted = {0, os.geteuid()}
    for name, path in decision.caches:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise SandboxRefused(f"cache {name}: {path} does not exist; create it as the service account "
                                 "(mode 755 or stricter)") from None
        except OSError as exc:
            raise SandboxRefused(f"cache {name}: cannot look at {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise SandboxRefused(f"cache {name}: {path} is not a directory")
        if info.st_uid != os.geteuid():
            raise SandboxRefused(f"cache {name}: {path} belongs to uid {info.st_uid}, not to the service "
                                 f"account (uid {os.geteuid()})")
        if info.st_mode & 0o022:
            raise SandboxRefused(f"cache {name}: {path} can be written by others (mode "
                                 f"{stat.S_IMODE(info.st_mode):o}); make it writable by its owner only")
        problem = swappable(os.path.realpath(path), trusted)
        if problem:
            raise SandboxRefused(f"cache {name}: {path} refused: {problem}, so it could be swapped for "
                                 "another directory")


def prepare_setup(site: Site, prepared: PreparedJob,
                  grace_seconds: float = DEFAULT_GRACE_SECONDS) -> PreparedSetup | None:
    """Plan the setup phase of a prepared job and write its files; None when it has none."""
    setup = prepared.spec.setup
    decision = prepared.decision
    if setup is None:
        return None
    assert decision.slurm is not None
    meta = prepared.job_dir / "meta"
    scratch = prepared.job_dir / SETUP_SCRATCH
    scratch.mkdir(mode=0o700, exist_ok=True)
    paths = JobPaths(job_id=prepared.job_id, workspace=str(prepared.workspace), scratch=str(scratch),
                     meta=str(meta))
    plan = plan_setup(prepared.spec, decision, prepared.image.path, paths, site.sandbox)
    _write_private(meta / SETUP_ENV_FILE_NAME, plan.env_file)
    if plan.script is not None:
        _write_private(meta / SETUP_SCRIPT_NAME, plan.script)
    launch = LocalLaunch(argv=plan.argv, env=dict(plan.host_env), cwd=str(prepared.workspace),
                         log_path=prepared.log_path, walltime_seconds=setup.time_seconds,
                         grace_seconds=grace_seconds,
                         memory_limit_bytes=memory_limit(decision.slurm.memory_mb),
                         limit_name="setup time")
    return PreparedSetup(prepared.job_id, launch, decision.caches)


async def run_setup(setup: PreparedSetup, run: RunLocal, cancel: asyncio.Event) -> Outcome | None:
    """Run the setup phase into the job's log; None when it succeeded and the main phase may start,
    else how the job ended."""
    log_path = setup.launch.log_path
    append_to_log(log_path, _fresh_line(log_path) + SETUP_GROUP + "\n")
    try:
        outcome = await run(setup.launch, cancel)
    except InfrastructureError as exc:  # Apptainer could not be started
        append_to_log(log_path, f"hpc-runner: {exc}\n")
        return Outcome("infra_failed", None, f"the setup phase could not start: {exc}")
    for name, path in setup.caches:
        size, complete = await asyncio.to_thread(cache_size, Path(path), CACHE_SIZE_SECONDS)
        counted = "" if complete else f" at least (counting stopped after {CACHE_SIZE_SECONDS:g} s)"
        append_to_log(log_path, _fresh_line(log_path) + f"cache {name}: {human_size(size)}{counted}\n")
    if outcome.state == "succeeded":
        append_to_log(log_path, MAIN_GROUP + "\n")
        return None
    if outcome.state == "cancelled":
        return Outcome("cancelled", outcome.exit_status, "cancelled during the setup phase")
    append_to_log(log_path, _fresh_line(log_path)
                  + f"hpc-runner: the setup phase failed ({outcome.detail}); the main phase does not run\n")
    return Outcome("failed", outcome.exit_status, f"the setup phase failed: {outcome.detail}")


def cache_size(root: Path, seconds: float) -> tuple[int, bool]:
    """Bytes of the files under `root`, links not followed and hard links counted once; and whether
    the count is complete (False: `seconds` ran out first, or a directory could not be read)."""
    deadline = time.monotonic() + seconds
    seen: set[tuple[int, int]] = set()
    total = 0
    complete = True
    pending = [str(root)]
    while pending:
        if time.monotonic() > deadline:
            return total, False
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(entry.path)
                    elif stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                        seen.add((info.st_dev, info.st_ino))
                        total += info.st_size
        except OSError:
            complete = False
    return total, complete


def human_size(size: int) -> str:
    """`1.2 GiB`, `340 KiB`, `12 bytes`."""
    if size < 1024:
        return f"{size} bytes"
    amount = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        amount /= 1024
        if amount < 1024 or unit == "TiB":
            return f"{amount:.1f} {unit}" if amount < 10 else f"{amount:.0f} {unit}"
    raise AssertionError("unreachable")


def _fresh_line(log_path: Path) -> str:
    """A newline when the log's last write left its line unfinished."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return ""
            handle.seek(-1, os.SEEK_END)
            return "" if handle.read(1) == b"\n" else "\n"
    except OSError:
        return ""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
