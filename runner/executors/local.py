"""Run a job as a local process group whose output goes straight to its log file.

The log file is the job's output: stdout and stderr share one O_APPEND descriptor, so the kernel
keeps the order of their writes and nothing passes through this process; readers follow the file
(`runner.logs.tail`).

A walltime, a cancellation or a command that exits leaving processes behind ends every process of
the job: SIGTERM, the grace period, then SIGKILL. The job's process group is not enough: Apptainer
moves a container's processes into groups of their own (and under `--sharens` its forwarding of
signals fails), a daemon starts a session of its own, and the launcher's orphans are re-parented
to this process (a child subreaper). So the job's processes are found in /proc (see
`job_processes`): its launcher's session, whatever descends from it, and whatever was once seen as
the job's. What still escapes is a process that leaves the session (setsid) and loses its parent
before the job ends: re-parented to this process, it no longer tells which job it came from, and
several jobs share this process. Only the Slurm executor, with cgroups, contains such a job.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner.errors import InfrastructureError
from runner.job import Outcome
from runner.job.prepared import PreparedJob

__all__ = ["LocalExecutor", "LocalLaunch", "Outcome"]

LOG_MODE = 0o640
POLL_SECONDS = 0.02
# After SIGKILL the job is gone as soon as its processes are reaped; this only bounds a wait
# for processes the kernel is still tearing down.
KILL_WAIT_SECONDS = 0.5
# Stopping the job's processes before SIGKILL takes one look more than the job has generations
# of processes still being started; a job that outruns this many is killed as far as it was found.
STOP_ROUNDS = 20
PR_SET_CHILD_SUBREAPER = 36
# Between SIGTERM and SIGKILL at walltime or cancel, unless the config says otherwise.
DEFAULT_GRACE_SECONDS = 10.0
# Apptainer's starter needs about 150 MiB of data of its own: a smaller limit would kill every
# job before it began, so a job asking for less memory is held to this much.
MIN_MEMORY_LIMIT_BYTES = 256 * 1024 * 1024
# Sets the limit and becomes the job (same pid, so the job still leads its session). Run in a
# process of its own rather than as a preexec_fn, which is unsafe in the agent's threaded process.
# Python starts with SIGPIPE and SIGXFSZ ignored, and an ignored signal stays ignored across
# exec: both are set back to their defaults, as the job would have them without the limit.
_LIMIT_AND_EXEC = (
    "import os, resource, signal, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))\n"
    "for number in (signal.SIGPIPE, signal.SIGXFSZ):\n"
    "    signal.signal(number, signal.SIG_DFL)\n"
    "try:\n"
    "    os.execv(sys.argv[2], sys.argv[3:])\n"
    "except OSError as exc:\n"
    "    sys.stderr.write(f'hpc-runner: cannot start {sys.argv[3]}: {exc.strerror}\\n')\n"
    "    sys.exit(127)\n"
)



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
    # What `walltime_seconds` is called in the job's log and outcome (a setup phase has its own).
    limit_name: str = "walltime"

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must name a program")


def local_launch(prepared: PreparedJob, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> LocalLaunch:
    """How this executor starts a prepared job: its argv in its workspace, its log as the output."""
    assert prepared.decision.slurm is not None
    return LocalLaunch(argv=prepared.argv, env=dict(prepared.plan.host_env), cwd=str(prepared.workspace),
                       log_path=prepared.log_path, walltime_seconds=prepared.decision.slurm.time_seconds,
                       grace_seconds=grace_seconds,
                       # the job's memory per node, held per process (see the module's docstring)
                       memory_limit_bytes=memory_limit(prepared.decision.slurm.memory_mb))


class LocalExecutor:
    """Runs jobs as child process groups of this process."""

    async def run(self, launch: LocalLaunch, cancel: asyncio.Event | None = None) -> Outcome:
        """Run `launch` to its end; setting `cancel` stops it as a walltime would.

        Raises InfrastructureError if the program cannot be started. Cancelling the task that
        awaits this kills the job's processes at once; use `cancel` for a graceful stop.
        """
        if cancel is not None and cancel.is_set():
            return Outcome("cancelled", None, "cancelled before it started")
        _become_subreaper()
        log_fd = _open_log(launch.log_path)
        try:
            process = await _spawn(launch, log_fd)
            job = JobProcesses(process.pid)
            try:
                return await _supervise(process, job, launch, log_fd, cancel)
            except asyncio.CancelledError:
                job.kill()
                with contextlib.suppress(asyncio.CancelledError):
                    await _wait_job_gone(process, job, KILL_WAIT_SECONDS)
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


async def _supervise(process: asyncio.subprocess.Process, job: JobProcesses, launch: LocalLaunch,
                     log_fd: int, cancel: asyncio.Event | None) -> Outcome:
    ending = await _wait_for_end(process, launch.walltime_seconds, cancel)
    if ending == "exited":
        code = process.returncode
        assert code is not None
        # Background children outlive the command that started them; they are part of the job.
        if job.alive():
            await _end_job(process, job, log_fd, "the job's command exited but left processes running",
                           launch.grace_seconds)
        return _exit_outcome(code)
    if ending == "timed_out":
        detail = why = f"{launch.limit_name} of {_seconds(launch.walltime_seconds)} exceeded"
    else:
        detail, why = "cancelled", "job cancelled"
    await _end_job(process, job, log_fd, why, launch.grace_seconds)
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


async def _end_job(process: asyncio.subprocess.Process, job: JobProcesses, log_fd: int, why: str,
                   grace: float) -> None:
    """SIGTERM to every process of the job, then SIGKILL to whatever is left after `grace` seconds."""
    _note(log_fd, f"hpc-runner: {why}; sent SIGTERM")
    job.terminate()
    if await _wait_job_gone(process, job, grace):
        return
    _note(log_fd, f"hpc-runner: {why}; sent SIGKILL")
    job.kill()
    await _wait_job_gone(process, job, KILL_WAIT_SECONDS)


async def _wait_job_gone(process: asyncio.subprocess.Process, job: JobProcesses, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        # Only once asyncio has reaped the launcher: reaping it here would take its exit status
        # away from asyncio's child watcher.
        finished = process.returncode is not None
        if finished and not job.alive():
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        if finished:
            await asyncio.sleep(min(remaining, POLL_SECONDS))
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), min(remaining, POLL_SECONDS))


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc/PID/stat tells about whose a process is."""

    pid: int
    ppid: int
    sid: int
    # Clock ticks after boot when it started: with the pid, this names one process for good (a
    # pid alone may have been handed out again).
    start: int
    zombie: bool


def parse_stat(pid: int, text: bytes) -> ProcessInfo | None:
    """The contents of /proc/PID/stat as a ProcessInfo; None if they are not in the kernel's form."""
    # The command's name (the second field, in parentheses) may itself hold spaces and ")".
    fields = text.rpartition(b")")[2].split()
    try:
        return ProcessInfo(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), start=int(fields[19]),
                           zombie=fields[0] == b"Z")
    except (IndexError, ValueError):
        return None


def job_processes(table: Mapping[int, ProcessInfo], leader: int,
                  known: Mapping[int, int]) -> dict[int, ProcessInfo]:
    """The processes in `table` (pid -> info) of the job whose launcher is `leader`.

    - those in the launcher's session (it leads the session): the kernel hands a session's number
      to no new process while any process is still in the session, so no other job's and none
      of the agent's carry it. Apptainer's processes move to groups of their own but stay in it;
    - those seen as the job's before (`known`: pid -> start time): a process re-parented to the
      agent after leaving the session no longer shows whose it is;
    - and every descendant of those, whatever group or session it has moved to.
    """
    members = {pid: info for pid, info in table.items() if info.sid == leader or known.get(pid) == info.start}
    children: dict[int, list[ProcessInfo]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info)
    pending = list(members)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child.pid not in members:
                members[child.pid] = child
                pending.append(child.pid)
    return members


class JobProcesses:
    """The processes of one running job, followed through /proc: found, signalled and reaped."""

    def __init__(self, leader: int) -> None:
        self._leader = leader
        # Every process found as the job's, by pid and start time: it stays the job's after it
        # has left the session and been re-parented to the agent.
        self._known: dict[int, int] = {}
        # The filesystem servers terminate() spared until the rest of the job has ended.
        self._spared: set[tuple[int, int]] = set()

    def find(self) -> dict[int, ProcessInfo]:
        """The job's processes now (a look at every process on the machine), but for the zombies
        among them that were ours to reap."""
        members = job_processes(_process_table(None), self._leader, self._known)
        members.pop(os.getpid(), None)
        # A known process missing from this look has ended: only those found are kept.
        self._known = {pid: info.start for pid, info in members.items()}
        return {pid: info for pid, info in members.items() if not self._reaped(info)}

    def alive(self) -> bool:
        """Whether any process of the job is left (other than the launcher's zombie, which asyncio
        reaps). Cheap while a process seen before still runs; a full look only once none does.

        The filesystem servers that terminate() spared get their SIGTERM once they are all that
        is left.
        """
        seen = _process_table(self._known)
        if any(not info.zombie and info.start == self._known[pid] and (pid, info.start) not in self._spared
               for pid, info in seen.items()):
            return True
        left = [info for info in self.find().values() if info.pid != self._leader or not info.zombie]
        if self._spared and all((info.pid, info.start) in self._spared for info in left if not info.zombie):
            for info in left:
                if (info.pid, info.start) in self._spared:
                    _send(info.pid, signal.SIGTERM)
            self._spared.clear()
        return bool(left)

    def terminate(self) -> None:
        """SIGTERM to every process of the job but its filesystem servers (see `_serves_fuse`),
        which `alive` ends once the rest has: until then, the rest may still need their files."""
        for info in self.find().values():
            if _serves_fuse(info.pid):
                self._spared.add((info.pid, info.start))
            else:
                _send(info.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to every process of the job.

        They are stopped first, and looked for again until no new one appears: a stopped process
        starts no other, so none is born between the last look and the SIGKILL, to be re-parented
        to the agent out of the job's sight.
        """
        stopped: set[tuple[int, int]] = set()
        for _ in range(STOP_ROUNDS):
            fresh = [info for info in self.find().values()
                     if not info.zombie and (info.pid, info.start) not in stopped]
            if not fresh:
                break
            for info in fresh:
                _send(info.pid, signal.SIGSTOP)
                stopped.add((info.pid, info.start))
        for pid in self.find():
            _send(pid, signal.SIGKILL)

    def _reaped(self, info: ProcessInfo) -> bool:
        """Reap `info` if it is a zombie child of ours: the job's orphans are re-parented to us
        (see _become_subreaper), and as zombies they would keep the job's session alive."""
        if not info.zombie or info.ppid != os.getpid() or info.pid == self._leader:
            return False
        try:
            pid, _ = os.waitpid(info.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == info.pid


def _process_table(pids: Iterable[int] | None) -> dict[int, ProcessInfo]:
    """/proc/PID/stat of `pids`, or of every process when None; processes gone meanwhile are left out."""
    if pids is None:
        pids = (int(name) for name in os.listdir("/proc") if name.isdigit())
    table = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        info = parse_stat(pid, text)
        if info is not None:
            table[pid] = info
    return table


def _serves_fuse(pid: int) -> bool:
    """Whether the process holds /dev/fuse open: it serves a filesystem. Apptainer's squashfuse
    serves the container's image: ended with the rest, it would leave a job cleaning up after a
    SIGTERM with no files ("Transport endpoint is not connected")."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False


def _send(pid: int, signum: signal.Signals) -> None:
    # A process may be gone meanwhile; one the agent may not signal (a setuid helper) is left to
    # its own launcher.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


@functools.cache
def _become_subreaper() -> bool:
    """Make orphaned job processes our children instead of PID 1's.

    As their subreaper we reap them ourselves (a PID 1 that does not reap, common in containers,
    would leave them as zombies that keep the job's session in existence).
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
