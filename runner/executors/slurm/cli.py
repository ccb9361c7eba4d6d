"""Slurm's command-line tools: the only module that runs them.

Every call has a timeout. A command that fails, times out or prints something unexpected raises
`SlurmUnavailable`, which says nothing about any job: callers keep what they knew (a busy or
restarting slurmctld must never look like a finished or vanished job). The one exception is
Slurm saying that it does not know a job id, which is an answer, not a failure.

Commands go through a `CommandRunner`: by default child processes of the agent, with an
optional prefix (`runuser -u ACCOUNT --`, `sudo -u ACCOUNT`, `ssh login-node`) for sites, tests
and benchmarks that submit as another account. sbatch reads the batch script from stdin, so
the account that runs the Slurm commands needs no access to the file the executor keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from runner.errors import InfrastructureError
from runner.job import SLURM_JOB_NAME_PREFIX
from runner.metrics import slurm_command

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "SQUEUE_FORMAT",
    "CommandResult",
    "CommandRunner",
    "SlurmCli",
    "SlurmError",
    "SlurmUnavailable",
    "SqueueRow",
    "SubmissionFailed",
    "SubprocessRunner",
    "parse_scontrol_record",
]

DEFAULT_TIMEOUT_SECONDS = 30.0
# squeue --Format: id, long state, reason, actual or expected start (the estimate `squeue
# --start` prints), time limit, exit code (a raw wait status), requeue flag, name, the nodes it
# was given (empty while it pends), comment. With
# it one squeue call tells everything about a job that ended, scontrol is not needed. A ":|"
# field has no width (nothing is cut) and ends in "|"; the comment comes last because it is the
# only field that may contain "|".
SQUEUE_FORMAT = ("JobID:|,State:|,Reason:|,StartTime:|,TimeLimit:|,exit_code:|,Requeue:|,Name:|,NodeList:|,"
                 "Comment:")
_SQUEUE_FIELDS = 10
UNKNOWN_JOB = "Invalid job id specified"
# scancel's answers for a job that has nothing left to cancel.
# (The last: `--state=PENDING` of a job that is no longer pending.)
_NOTHING_TO_CANCEL = (UNKNOWN_JOB, "already completing or completed", "Job/step already",
                      "No active jobs match")
# sbatch's messages when it never reached the controller: the job was not refused, just not sent.
_CONTROLLER_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
                           "Zero Bytes were transmitted or received", "Communication connection failure")
_JOB_ID = re.compile(r"[0-9]+")
_SCONTROL_FIELD = re.compile(r"(?:^|\s)(?=[A-Za-z][A-Za-z0-9_:/()]*=)")


class SlurmError(InfrastructureError):
    """A Slurm command did not do what was asked."""


class SlurmUnavailable(SlurmError):
    """A Slurm command failed or timed out: it tells nothing about any job; try again later."""


class SubmissionFailed(SlurmError):
    """sbatch refused the job; `slurm_message` is exactly what sbatch printed."""

    def __init__(self, slurm_message: str) -> None:
        super().__init__(f"sbatch refused the job: {slurm_message}")
        self.slurm_message = slurm_message


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       stdin: bytes | None = None) -> CommandResult:
        """Run `argv` to its end; TimeoutError after `timeout` seconds, OSError if it cannot start."""
        ...


class SubprocessRunner:
    """Runs each command as a child process, after `prefix`, with `env` (default: ours).

    SLURM_TIME_FORMAT is always `standard`: times are parsed, and a user's preference for
    relative times must not change what they mean.
    """

    def __init__(self, prefix: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self.prefix = tuple(prefix)
        self.env = dict(env) if env is not None else None

    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       stdin: bytes | None = None) -> CommandResult:
        env = {**(self.env if self.env is not None else os.environ), "SLURM_TIME_FORMAT": "standard"}
        process = await asyncio.create_subprocess_exec(
            *self.prefix, *argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
        except BaseException:
            # Timed out or cancelled: the command (and whatever the prefix started) must not linger.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise
        assert process.returncode is not None
        return CommandResult(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


@dataclass(frozen=True)
class SqueueRow:
    """One job in squeue's output."""

    slurm_id: str
    state: str  # squeue's long name: PENDING, RUNNING, COMPLETED...
    reason: str  # why it pends, or how it ended ("None" when there is nothing to say)
    start: str | None  # actual start, or for a pending job Slurm's estimate; None when unknown
    name: str
    comment: str
    time_limit: str | None = None  # as Slurm prints it: "1:00", "4:00:00", "1-00:00:00"
    exit_code: str | None = None  # as scontrol's ExitCode: "N:S" (exit status N, or signal S)
    requeue: bool | None = None  # whether Slurm would requeue the job after a node failure
    node_list: str | None = None  # the nodes it runs or ran on, as Slurm names them ("cn[01-04]")


class SlurmCli:
    """Slurm's commands, each with a timeout; `commands` counts the commands run, by name."""

    def __init__(self, run: CommandRunner | None = None, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.run: CommandRunner = run if run is not None else SubprocessRunner()
        self.timeout = timeout
        self.commands: Counter[str] = Counter()

    async def sbatch(self, script: str, args: Sequence[str]) -> str:
        """Submit `script` (given on stdin) with `args`, which must include --parsable; the job id.

        SubmissionFailed carries sbatch's message when Slurm refused the job; SlurmUnavailable
        when sbatch could not reach the controller or timed out. After a timeout the job may or
        may not exist: look for it by name before submitting again.
        """
        if "--parsable" not in args:
            raise ValueError("sbatch needs --parsable to print the job id alone")
        result = await self._call("sbatch", [*args], stdin=script.encode(), check=False)
        message = result.stderr.strip()
        if result.returncode != 0:
            if any(text in message for text in _CONTROLLER_UNREACHABLE):
                raise SlurmUnavailable(f"sbatch could not reach slurmctld: {message}")
            raise SubmissionFailed(message or f"sbatch exited {result.returncode} and said nothing")
        # --parsable prints "ID" or "ID;CLUSTER".
        slurm_id = result.stdout.strip().split(";", 1)[0]
        if not _JOB_ID.fullmatch(slurm_id):
            raise SlurmUnavailable(f"sbatch printed no job id: {result.stdout.strip()!r} {message}")
        return slurm_id

    async def squeue(self, ids: Collection[str]) -> dict[str, SqueueRow]:
        """The jobs among `ids` that Slurm knows, in any state, with ONE squeue call."""
        wanted = _checked_ids(ids)
        if not wanted:
            return {}
        result = await self._call("squeue", ["--noheader", "--all", "--states=all",
                                             f"--jobs={','.join(wanted)}", f"--Format={SQUEUE_FORMAT}"],
                                  check=False)
        if result.returncode != 0:
            # For a single id squeue asks for that job alone and exits 1 when it is unknown; for
            # several it lists the known ones and exits 0.
            if len(wanted) == 1 and UNKNOWN_JOB in result.stderr:
                return {}
            raise _unavailable("squeue", result)
        rows = _parse_squeue(result.stdout)
        return {row.slurm_id: row for row in rows if row.slurm_id in wanted}

    async def squeue_start(self, ids: Collection[str]) -> dict[str, str | None]:
        """`squeue --start`: the expected start of each pending job among `ids`, in one call.

        The rows of `squeue()` already carry the same estimate (their `start`), which is what
        the tracker uses; this is for callers that want nothing else.
        """
        wanted = _checked_ids(ids)
        if not wanted:
            return {}
        result = await self._call("squeue", ["--start", "--noheader", "--all", f"--jobs={','.join(wanted)}",
                                             "--format=%i|%S"], check=False)
        if result.returncode != 0:
            if len(wanted) == 1 and UNKNOWN_JOB in result.stderr:
                return {}
            raise _unavailable("squeue --start", result)
        starts: dict[str, str | None] = {}
        for line in result.stdout.splitlines():
            slurm_id, sep, start = line.strip().partition("|")
            if not sep or not _JOB_ID.fullmatch(slurm_id):
                raise SlurmUnavailable(f"squeue --start printed an unexpected line: {line!r}")
            if slurm_id in wanted:
                starts[slurm_id] = _time_or_none(start)
        return starts

    async def show_job(self, slurm_id: str) -> dict[str, str] | None:
        """`scontrol show job --oneliner ID` as a dict (JobState, ExitCode, Requeue...); None when
        Slurm does not know the job (any more)."""
        (wanted,) = _checked_ids([slurm_id])
        result = await self._call("scontrol", ["show", "job", "--oneliner", wanted], check=False)
        if result.returncode != 0:
            if UNKNOWN_JOB in result.stderr:
                return None
            raise _unavailable("scontrol show job", result)
        record = parse_scontrol_record(result.stdout.strip().splitlines()[0] if result.stdout.strip() else "")
        if record.get("JobId") != wanted:
            raise SlurmUnavailable(f"scontrol show job {wanted} printed no record of it: {result.stdout!r}")
        return record

    async def scancel(self, slurm_id: str, *, signal: str | None = None, full: bool = False,
                      pending_only: bool = False) -> bool:
        """Cancel the job, or with `signal` only signal it (its steps; with `full` also the batch
        script); `pending_only`: only while it still pends (Slurm checks, so a job that has just
        started is left alone). False when there was nothing left to cancel."""
        (wanted,) = _checked_ids([slurm_id])
        if signal is not None and not re.fullmatch(r"[A-Z0-9]+", signal):
            raise ValueError(f"signal {signal!r} is not a signal name")
        # --verbose: without it scancel says nothing, and exits 0, when the job is unknown.
        args = ["--verbose", *([f"--signal={signal}"] if signal else []), *(["--full"] if full else []),
                *(["--state=PENDING"] if pending_only else []), wanted]
        result = await self._call("scancel", args, check=False)
        if result.returncode != 0 or result.stderr.strip():
            if any(text in result.stderr for text in _NOTHING_TO_CANCEL):
                return False
            if result.returncode != 0:
                raise _unavailable("scancel", result)
        return True

    async def list_hpcr_jobs(self, user: str) -> list[SqueueRow]:
        """Every job of `user` named like ours (hpcr-*) that Slurm still knows, in any state."""
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", user):
            raise ValueError(f"{user!r} is not a user name")
        result = await self._call("squeue", ["--noheader", "--all", "--states=all", f"--user={user}",
                                             f"--Format={SQUEUE_FORMAT}"])
        return [row for row in _parse_squeue(result.stdout) if row.name.startswith(SLURM_JOB_NAME_PREFIX)]

    async def _call(self, command: str, args: Sequence[str], *, stdin: bytes | None = None,
                    check: bool = True) -> CommandResult:
        self.commands[command] += 1
        began = time.monotonic()
        try:
            result = await self.run([command, *args], timeout=self.timeout, stdin=stdin)
        except TimeoutError:
            slurm_command(command, "timeout", time.monotonic() - began)
            raise SlurmUnavailable(f"{command} did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            slurm_command(command, "not_run", time.monotonic() - began)
            # The culprit may be the runner's prefix (runuser, ssh...) rather than the command.
            culprit = exc.filename if exc.filename is not None else command
            raise SlurmUnavailable(f"cannot run {command}: {culprit}: {exc.strerror or exc}") from None
        # A nonzero exit is not always trouble (squeue of one job Slurm forgot): "exit_nonzero".
        slurm_command(command, "ok" if result.returncode == 0 else "exit_nonzero", time.monotonic() - began)
        if check and result.returncode != 0:
            raise _unavailable(command, result)
        return result


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... --oneliner` record as a dict. Values may contain spaces (Comment,
    Command): a field ends where the next `Key=` begins."""
    fields: dict[str, str] = {}
    for part in _SCONTROL_FIELD.split(line.strip()):
        key, sep, value = part.strip().partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _checked_ids(ids: Collection[str]) -> list[str]:
    wanted = list(dict.fromkeys(ids))
    for slurm_id in wanted:
        if not _JOB_ID.fullmatch(slurm_id):
            raise ValueError(f"{slurm_id!r} is not a Slurm job id")
    return wanted


def _parse_squeue(output: str) -> list[SqueueRow]:
    rows = []
    for line in output.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", _SQUEUE_FIELDS - 1)
        if len(fields) != _SQUEUE_FIELDS or not _JOB_ID.fullmatch(fields[0].strip()):
            # Array tasks ("12_3") are not ours; anything else means the output is not what we asked for.
            if re.fullmatch(r"[0-9]+_.*", fields[0].strip()):
                continue
            raise SlurmUnavailable(f"squeue printed an unexpected line: {line!r}")
        slurm_id, state, reason, start, limit, code, requeue, name, nodes, comment = (
            f.strip() for f in fields)
        rows.append(SqueueRow(slurm_id, state, reason, _time_or_none(start), name, comment,
                              time_limit=_time_or_none(limit), exit_code=_wait_status(code),
                              requeue={"1": True, "0": False}.get(requeue),
                              node_list=nodes if nodes not in ("", "(null)", "N/A") else None))
    return rows


def _wait_status(text: str) -> str | None:
    """squeue's exit_code, a raw wait status (768), as scontrol's ExitCode ("3:0")."""
    if not text.isdigit():
        return None
    raw = int(text)
    return f"{(raw >> 8) & 0xFF}:{raw & 0x7F}"


def _time_or_none(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "N/A", "Unknown", "None") else text


def _unavailable(command: str, result: CommandResult) -> SlurmUnavailable:
    detail = (result.stderr or result.stdout).strip() or "no output"
    return SlurmUnavailable(f"{command} exited {result.returncode}: {detail}")
