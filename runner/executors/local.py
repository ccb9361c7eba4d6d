"""Run a job as a local process group whose output goes straight to its log file.

The log file is the job's output: stdout and stderr share one O_APPEND descriptor, so the kernel
keeps the order of their writes and nothing passes through this process; readers follow the file
(`runner.logs.tail`). The job runs in its own session, so a walltime or a cancellation can end the
whole process group, children included. A process that leaves the group (setsid) escapes it:
only the Slurm executor, with cgroups, can contain such a job.

Memory is held by RLIMIT_DATA, the one limit an unprivileged process can set that Apptainer (a
Go program that reserves far more address space than it uses, which RLIMIT_AS would count)
survives: it bounds each process's private writable memory (heap, anonymous mappings, thread
stacks), and every process of the job inherits it. It is a bound per process, not per job: a job
of N processes may hold N times the limit, and shared memory (MAP_SHARED, /dev/shm) is not
counted. Only the Slurm executor's cgroups bound a job as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner.errors import InfrastructureError

__all__ = ["LocalExecutor", "LocalLaunch", "Outcome"]

LOG_MODE = 0o640
POLL_SECONDS = 0.02
# After SIGKILL the group is gone as soon as its members are reaped; this only bounds a wait
# for processes the kernel is still tearing down.
KILL_WAIT_SECONDS = 0.5
PR_SET_CHILD_SUBREAPER = 36
# Apptainer's starter needs about 150 MiB of data of its own: a smaller limit would kill every
# job before it began, so a job asking for less memory is held to this much.
MIN_MEMORY_LIMIT_BYTES = 256 * 1024 * 1024
# Sets the limit and becomes the job (same pid, so the job still leads its session). Run in a
# process of its own rather than as a preexec_fn, which is unsafe in the agent's threaded process.
_LIMIT_AND_EXEC = (
    "import os, resource, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))\n"
    "try:\n"
    "    os.execv(sys.argv[2], sys.argv[3:])\n"
    "except OSError as exc:\n"
    "    sys.stderr.write(f'hpc-runner: cannot start {sys.argv[3]}: {exc.strerror}\\n')\n"
    "    sys.exit(127)\n"
)

# "infra_failed": the job did not fail, the cluster did (a node failure); another try may work.
# Only the Slurm executor can tell; a local job never ends so.
OutcomeState = Literal["succeeded", "failed", "timed_out", "cancelled", "infra_failed"]


@dataclass(frozen=True)
class LocalLaunch:
    """What to run and how long it may take; `env` is the job's whole environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    log_path: Path
    walltime_seconds: float
    grace_seconds: float = 10.0
    # RLIMIT_DATA of every process of the job (see the module's docstring); None: no limit.
    memory_limit_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must name a program")


@dataclass(frozen=True)
class Outcome:
    """How a job ended; `exit_status` follows the shell: 128+N when killed by signal N."""

    state: OutcomeState
    exit_status: int | None
    detail: str
    # The job did not fail by its own doing (a node failed under it): running it again may work.
    retryable: bool = False


class LocalExecutor:
    """Runs jobs as child process groups of this process."""

    async def run(self, launch: LocalLaunch, cancel: asyncio.Event | None = None) -> Outcome:
        """Run `launch` to its end; setting `cancel` stops it as a walltime would.

        Raises InfrastructureError if the program cannot be started. Cancelling the task that
        awaits this kills the job's group at once; use `cancel` for a graceful stop.
        """
        if cancel is not None and cancel.is_set():
            return Outcome("cancelled", None, "cancelled before it started")
        _become_subreaper()
        log_fd = _open_log(launch.log_path)
        try:
            process = await _spawn(launch, log_fd)
            try:
                return await _supervise(process, launch, log_fd, cancel)
            except asyncio.CancelledError:
                _killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(asyncio.CancelledError):
                    await _wait_group_gone(process, KILL_WAIT_SECONDS)
                raise
        finally:
            os.close(log_fd)


def _open_log(path: Path) -> int:
    # Read access too, so that a note can check whether the job left an unfinished line.
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_EXCL, LOG_MODE)
        except FileExistsError:
            return os.open(path, flags, LOG_MODE)
    except OSError as exc:
        raise InfrastructureError(f"cannot open the job log {path}: {exc.strerror}") from None
    # The agent's umask must not decide who may read job logs.
    os.fchmod(fd, LOG_MODE)
    return fd


def memory_limit(memory_mb: int | None) -> int | None:
    """RLIMIT_DATA for each process of a local job given `memory_mb` (per node); None: no limit."""
    if memory_mb is None:
        return None
    return max(memory_mb * 1024 * 1024, MIN_MEMORY_LIMIT_BYTES)


def _argv(launch: LocalLaunch, log_fd: int) -> tuple[str, ...]:
    if launch.memory_limit_bytes is None:
        return launch.argv
    # Found here, with the job's PATH, as an unlimited launch would find it: a program that is
    # missing stays an error of the agent, not an exit status of the job.
    name = launch.argv[0]
    program = shutil.which(os.path.join(launch.cwd, name) if os.sep in name else name,
                           path=launch.env.get("PATH", os.defpath))
    if program is None:
        message = f"cannot start {launch.argv[0]}: no such program"
        _note(log_fd, f"hpc-runner: {message}")
        raise InfrastructureError(message)
    return (sys.executable, "-I", "-S", "-c", _LIMIT_AND_EXEC, str(launch.memory_limit_bytes),
            os.path.abspath(program), *launch.argv)


async def _spawn(launch: LocalLaunch, log_fd: int) -> asyncio.subprocess.Process:
    argv = _argv(launch, log_fd)
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            env=dict(launch.env), cwd=launch.cwd, start_new_session=True)
    except OSError as exc:
        culprit = exc.filename if exc.filename is not None else launch.argv[0]
        message = f"cannot start {launch.argv[0]}: {culprit}: {exc.strerror}"
        _note(log_fd, f"hpc-runner: {message}")
        raise InfrastructureError(message) from None


async def _supervise(process: asyncio.subprocess.Process, launch: LocalLaunch, log_fd: int,
                     cancel: asyncio.Event | None) -> Outcome:
    ending = await _wait_for_end(process, launch.walltime_seconds, cancel)
    if ending == "exited":
        code = process.returncode
        assert code is not None
        # Background children outlive the command that started them; they are part of the job.
        if _group_alive(process.pid, reap=True):
            await _end_group(process, log_fd, "the job's command exited but left processes running",
                             launch.grace_seconds)
        return _exit_outcome(code)
    if ending == "timed_out":
        detail = why = f"walltime of {_seconds(launch.walltime_seconds)} exceeded"
    else:
        detail, why = "cancelled", "job cancelled"
    await _end_group(process, log_fd, why, launch.grace_seconds)
    return Outcome(ending, _shell_status(process.returncode), detail)


async def _wait_for_end(process: asyncio.subprocess.Process, walltime: float,
                        cancel: asyncio.Event | None) -> Literal["exited", "timed_out", "cancelled"]:
    exited = asyncio.ensure_future(process.wait())
    cancelled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    waiting = {exited} if cancelled is None else {exited, cancelled}
    try:
        done, _ = await asyncio.wait(waiting, timeout=max(walltime, 0.0),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiting:
            task.cancel()
    # A command that finished as the deadline or the cancellation arrived is not held against it.
    if exited in done:
        return "exited"
    return "cancelled" if cancelled in done else "timed_out"


async def _end_group(process: asyncio.subprocess.Process, log_fd: int, why: str, grace: float) -> None:
    """SIGTERM to the whole group, then SIGKILL to whatever is left after `grace` seconds."""
    _note(log_fd, f"hpc-runner: {why}; sent SIGTERM")
    _killpg(process.pid, signal.SIGTERM)
    if await _wait_group_gone(process, grace):
        return
    _note(log_fd, f"hpc-runner: {why}; sent SIGKILL")
    _killpg(process.pid, signal.SIGKILL)
    await _wait_group_gone(process, KILL_WAIT_SECONDS)


async def _wait_group_gone(process: asyncio.subprocess.Process, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        finished = process.returncode is not None
        if finished and not _group_alive(process.pid, reap=True):
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        if finished:
            await asyncio.sleep(min(remaining, POLL_SECONDS))
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), min(remaining, POLL_SECONDS))


def _group_alive(pgid: int, *, reap: bool) -> bool:
    """Whether any process of the group exists, after reaping those that are our zombies.

    Only call with reap=True once the leader has been reaped by asyncio: reaping it here would
    take its exit status away from asyncio's child watcher.
    """
    if reap:
        _reap_group(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_group(pgid: int) -> None:
    # The job's orphans are re-parented to us (see _become_subreaper); as zombies they would keep
    # the group, and its id, alive.
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _killpg(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


@functools.cache
def _become_subreaper() -> bool:
    """Make orphaned job processes our children instead of PID 1's.

    A PID 1 that does not reap (common in containers) leaves killed strays as zombies that keep
    their process group in existence; as their subreaper we reap them ourselves.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _note(log_fd: int, text: str) -> None:
    """Append a line of our own to the job's log, on a line of its own.

    Best effort: a job that filled the disk must still be stopped, note or no note.
    """
    with contextlib.suppress(OSError):
        size = os.fstat(log_fd).st_size
        unfinished = size > 0 and os.pread(log_fd, 1, size - 1) != b"\n"
        os.write(log_fd, (b"\n" if unfinished else b"") + text.encode() + b"\n")


def _seconds(value: float) -> str:
    return f"{int(value)}s" if float(value).is_integer() else f"{value:g}s"


def _shell_status(code: int | None) -> int | None:
    if code is None:
        return None
    return 128 - code if code < 0 else code


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_outcome(code: int) -> Outcome:
    if code == 0:
        return Outcome("succeeded", 0, "exit status 0")
    if code < 0:
        return Outcome("failed", 128 - code, f"killed by signal {_signal_name(-code)} ({-code})")
    return Outcome("failed", code, f"exit status {code}")
