"""`mpiexec` from inside the sandbox (`[job.mpi] launch = "inside"`): the shim and the launcher.

The MPI launcher has to live outside the container (srun's PMIx server, mpirun's daemons), so a
job that runs its command once and starts ranks from it asks for them through a channel:

- the channel is a directory of the job's own (`SCRATCH/mpiexec`, bound read-write at
  `CHANNEL_TARGET` into the job's command, and into nothing else: not into its ranks, not into
  any other job). Only the launcher of that job reads it.
- `mpiexec` on the command's PATH is a POSIX sh script (`shim_script`), written by the launcher
  to `META/bin/mpiexec` and seen at `/.hpc-runner/bin/mpiexec`, which the env file puts first on
  PATH (`PREPEND_PATH`). It needs nothing of the image but `/bin/sh` and `sleep` (as the ranks
  do): it claims a request name with `set -C`, writes its request (NUL-separated words:
  `-x NAME=VALUE`..., `-n N`, `-wd DIR`, `--`, the program and its arguments), marks it complete
  with an empty `NAME.ready`, and waits for `NAME.status`, the ranks' exit status.
- the launcher (`python -m sandbox.mpiexec_launcher`, this module's `main`) runs outside the sandbox, on
  the node where the job's command runs (under Slurm: the batch script, on the first node of the
  allocation, so `srun` there starts a step of the job's own allocation). It starts the job's
  command, takes one request at a time, refuses anything but argv, N (1 to the job's tasks),
  extra variables (never a reserved name) and a working directory under /work
  (`parse_request`), runs the ranks with the job's fixed rank launch (the same launcher,
  wrapper and Apptainer argv a `launch = "ranks"` job has, its command replaced by the
  request's), and writes the status. It ends when the job's command ends, with its status.

Nothing in a request can reach the launch's options, the image or the binds: they are the
launcher's own argv, fixed when the job was planned. A request file must be a regular file of
the job's own uid with one link, in the channel itself, under `MAX_REQUEST_BYTES`.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from runner.binds import is_within
from runner.spec import ENV_NAME_PATTERN, RESERVED_ENV_NAMES, RESERVED_ENV_PREFIXES
from sandbox.envfile import render_env_file

# The launcher's entry point (`python -m`).
MODULE = "sandbox.mpiexec_launcher"
# Where the job's command finds the channel; under /opt/hpc-runner, which no job may bind onto.
CHANNEL_TARGET = "/opt/hpc-runner/mpiexec"
CHANNEL_DIR_NAME = "mpiexec"
# The shim's directory under the job's metadata directory, and where the job sees it.
SHIM_DIR_NAME = "bin"
SHIM_NAME = "mpiexec"
SHIM_PATH_DIR = "/.hpc-runner/bin"
# The per-launch env files, beside the job's own in its metadata directory (never in the
# channel, which the job can write).
LAUNCH_ENV_PREFIX = "mpiexec-"
# The number of ranks in the launch, put where the launcher's argv has it.
RANKS_PLACEHOLDER = "{n}"
# What a request may hold.
MAX_REQUEST_BYTES = 256 * 1024
MAX_REQUEST_WORDS = 8192
MAX_EXTRA_ENV = 256
MAX_CWD_CHARS = 4096
WORKSPACE = "/work"
POLL_SECONDS = 0.02
# A request's name: the shim's pid, a dash, its attempt.
REQUEST_NAME = re.compile(r"[0-9]{1,10}-[0-9]{1,4}")
_ENV_NAME = re.compile(ENV_NAME_PATTERN)
# The status written for a request that was refused rather than run.
REFUSED_STATUS = 126


class RequestRefused(ValueError):
    """A request the launcher will not run; the message says why, for the job's log."""


@dataclass(frozen=True)
class Request:
    """One `mpiexec` call, checked."""

    ranks: int
    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def reserved_env_name(name: str) -> bool:
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


def parse_request(data: bytes, tasks: int) -> Request:
    """A request file's bytes as a Request, or RequestRefused saying what is wrong.

    The grammar is the shim's, and nothing else: (`-x` NAME=VALUE)* `-n` N `-wd` DIR `--`
    PROGRAM ARGS..., every word ended by a NUL.
    """
    if len(data) > MAX_REQUEST_BYTES:
        raise RequestRefused(f"the request is larger than {MAX_REQUEST_BYTES} bytes")
    if not data.endswith(b"\0"):
        raise RequestRefused("the request is not complete (its last word has no NUL)")
    words = [os.fsdecode(word) for word in data[:-1].split(b"\0")]
    if len(words) > MAX_REQUEST_WORDS:
        raise RequestRefused(f"the request has more than {MAX_REQUEST_WORDS} words")
    items = iter(words)
    env: dict[str, str] = {}
    ranks: int | None = None
    cwd: str | None = None
    for word in items:
        if word == "--":
            break
        value = next(items, None)
        if value is None:
            raise RequestRefused(f"{word} has no value")
        if word == "-x":
            name, equals, text = value.partition("=")
            _check_extra_env(name, equals)
            if len(env) >= MAX_EXTRA_ENV and name not in env:
                raise RequestRefused(f"more than {MAX_EXTRA_ENV} -x variables")
            env[name] = text
        elif word == "-n" and ranks is None:
            ranks = _ranks(value, tasks)
        elif word == "-wd" and cwd is None:
            cwd = _cwd(value)
        else:
            raise RequestRefused(f"{word!r} is not something mpiexec may ask for here")
    else:
        raise RequestRefused("the request names no program")
    argv = tuple(items)
    if ranks is None or cwd is None:
        raise RequestRefused("the request lacks -n or -wd")
    if not argv or not argv[0]:
        raise RequestRefused("the request names no program")
    return Request(ranks=ranks, argv=argv, cwd=cwd, env=MappingProxyType(env))


def _check_extra_env(name: str, equals: str) -> None:
    if not equals:
        raise RequestRefused(f"-x {name}: expected NAME=VALUE")
    if not _ENV_NAME.fullmatch(name):
        raise RequestRefused(f"-x {name}: not a variable name (letters, digits and '_', at most 128)")
    if reserved_env_name(name):
        raise RequestRefused(f"-x {name}: the name is reserved for the runner and the MPI launcher")


def _ranks(text: str, tasks: int) -> int:
    if not re.fullmatch(r"[1-9][0-9]{0,8}", text):
        raise RequestRefused(f"-n {text}: expected a whole number from 1 to {tasks}")
    ranks = int(text)
    if ranks > tasks:
        raise RequestRefused(f"-n {ranks} is more than this job's {tasks} tasks")
    return ranks


def _cwd(text: str) -> str:
    if len(text) > MAX_CWD_CHARS or not text.startswith("/"):
        raise RequestRefused(f"the working directory {text[:200]!r} is not an absolute path "
                             f"under {WORKSPACE}")
    normal = posixpath.normpath(text)
    if normal.startswith("//"):
        normal = normal[1:]
    if not is_within(normal, WORKSPACE):
        raise RequestRefused(f"the working directory {normal} is outside {WORKSPACE}")
    return normal


# -- the shim ------------------------------------------------------------------------------------

def shim_script(tasks: int, channel: str = CHANNEL_TARGET) -> str:
    """The `mpiexec` the job's command finds: POSIX sh, the job's task count written in."""
    return f"""\
#!/bin/sh
# mpiexec of hpc-runner: asks the launcher outside the sandbox to start ranks of this job
# (mpiexec [-n N] [-x NAME[=VALUE]]... PROGRAM [ARGS...]), and exits with their status.
channel={channel}
tasks={tasks}
usage="usage: mpiexec [-n N] [-x NAME[=VALUE]]... PROGRAM [ARGS...]"
if [ ! -d "$channel" ]; then
    echo "mpiexec: only the job's command can start ranks (there is no launcher here)" >&2
    exit 127
fi
set -C
attempt=0
until {{ : >"$channel/$$-$attempt.req"; }} 2>/dev/null; do
    attempt=$((attempt + 1))
    if [ "$attempt" -ge 1000 ]; then
        echo "mpiexec: cannot write a request into $channel" >&2
        exit 125
    fi
done
set +C
request=$channel/$$-$attempt
ranks=
while [ "$#" -gt 0 ]; do
    case $1 in
        -n|-np|--n|--np)
            if [ "$#" -lt 2 ]; then echo "$usage" >&2; exit 2; fi
            ranks=$2; shift 2;;
        -n=*|-np=*|--n=*|--np=*)
            ranks=${{1#*=}}; shift;;
        -x)
            if [ "$#" -lt 2 ]; then echo "$usage" >&2; exit 2; fi
            case $2 in
                *=*) pair=$2;;
                ''|[0-9]*|*[!A-Za-z0-9_]*) echo "mpiexec: -x $2: not a variable name" >&2; exit 2;;
                *) eval "pair=\\"\\$2=\\${{$2-}}\\"";;
            esac
            printf '%s\\0' -x "$pair" >>"$request.req" || exit 125
            shift 2;;
        --) shift; break;;
        -*) echo "mpiexec: $1: this job's mpiexec takes only -n N and -x NAME[=VALUE]" \\
                "(how ranks start is the job's [job.mpi] and [job.resources])" >&2
            exit 2;;
        *) break;;
    esac
done
if [ "$#" -eq 0 ]; then echo "$usage" >&2; exit 2; fi
ranks=${{ranks:-$tasks}}
case $ranks in
    ''|0*|*[!0-9]*) echo "mpiexec: -n $ranks: expected a whole number from 1 to $tasks" >&2; exit 2;;
esac
if [ "${{#ranks}}" -gt 9 ] || [ "$ranks" -gt "$tasks" ]; then
    echo "mpiexec: -n $ranks is more than this job's $tasks tasks ([job.resources] tasks);" \\
        "nothing was started" >&2
    exit 2
fi
printf '%s\\0' -n "$ranks" -wd "$PWD" -- "$@" >>"$request.req" || exit 125
: >"$request.ready" || exit 125
while [ ! -e "$request.status" ]; do
    sleep 0.05 2>/dev/null || sleep 1
done
read -r status <"$request.status"
case $status in ''|*[!0-9]*) status=125;; esac
exit "$status"
"""


# -- the launcher's command line ----------------------------------------------------------------

@dataclass(frozen=True)
class InsideLaunch:
    """What the launcher needs, fixed when the job is planned (all host paths)."""

    tasks: int
    channel: str  # the channel's host directory
    shim: str  # the shim's host path
    env_file: str  # the job's env file: each launch's is it plus the launch's variables
    workspace: str  # the host directory at /work
    # The rank launch's Apptainer argv up to and including the rank hold: the request's program
    # and arguments follow it.
    rank_argv: tuple[str, ...]


def launcher_argv(python: str, inside: InsideLaunch, launcher: Sequence[str], wrapper: Sequence[str],
                  command: Sequence[str]) -> tuple[str, ...]:
    """`python -I -m sandbox.mpiexec_launcher OPTIONS... -- COMMAND...`: the launcher that runs `command`
    (the job's, once) and starts ranks with `launcher` (RANKS_PLACEHOLDER standing for N), then
    `wrapper`, then the rank argv."""
    ranks = (*wrapper, *inside.rank_argv)
    return (python, "-I", "-m", MODULE, "--tasks", str(inside.tasks), "--channel", inside.channel,
            "--shim", inside.shim, "--env-file", inside.env_file, "--workspace", inside.workspace,
            "--launcher", str(len(launcher)), *launcher, "--ranks", str(len(ranks)), *ranks,
            "--", *command)


@dataclass(frozen=True)
class LauncherArgs:
    inside: InsideLaunch
    launcher: tuple[str, ...]
    ranks: tuple[str, ...]  # the wrapper and the rank argv
    command: tuple[str, ...]


def parse_launcher_argv(argv: Sequence[str]) -> LauncherArgs:
    """The launcher's own command line (`launcher_argv` without the interpreter); ValueError if
    it is not in that form."""
    names = ("--tasks", "--channel", "--shim", "--env-file", "--workspace")
    values: dict[str, str] = {}
    groups: dict[str, tuple[str, ...]] = {}
    index = 0
    while index < len(argv) and argv[index] != "--":
        option = argv[index]
        if option in ("--launcher", "--ranks"):
            count = int(argv[index + 1])
            groups[option] = tuple(argv[index + 2:index + 2 + count])
            if len(groups[option]) != count:
                raise ValueError(f"{option} has fewer than {count} words")
            index += 2 + count
        elif option in names and index + 1 < len(argv):
            values[option] = argv[index + 1]
            index += 2
        else:
            raise ValueError(f"unexpected {option!r}")
    command = tuple(argv[index + 1:])
    missing = set(names) - set(values)
    if missing or len(groups) != 2 or not command:
        raise ValueError("the launcher needs every option, --launcher, --ranks and a command")
    ranks = groups["--ranks"]
    inside = InsideLaunch(tasks=int(values["--tasks"]), channel=values["--channel"], shim=values["--shim"],
                          env_file=values["--env-file"], workspace=values["--workspace"], rank_argv=ranks)
    return LauncherArgs(inside=inside, launcher=groups["--launcher"], ranks=ranks, command=command)


def rank_launch(args: LauncherArgs, request: Request, env_file: str) -> tuple[str, ...]:
    """The host command for one request: the fixed launch, with N, the request's working directory
    and env file put in their places, then the request's program and arguments."""
    launcher = tuple(word.replace(RANKS_PLACEHOLDER, str(request.ranks)) for word in args.launcher)
    ranks = list(args.ranks)
    for option, value in (("--pwd", request.cwd), ("--env-file", env_file)):
        # The option of Apptainer's (the last one: the wrapper before it is a script).
        at = len(ranks) - 1 - ranks[::-1].index(option)
        ranks[at + 1] = value
    return (*launcher, *ranks, *request.argv)


def launch_env_text(job_env_text: str, request: Request) -> str:
    """The env file of one launch: the job's, then the request's variables and the launch's size
    (later lines win in an env file)."""
    return job_env_text + render_env_file({**request.env, "HPC_RUNNER_TASKS": str(request.ranks)})


# -- the launcher --------------------------------------------------------------------------------

def _say(text: str) -> None:
    # The launcher's stderr is the job's log.
    sys.stderr.write(f"hpc-runner: mpiexec: {text}\n")
    sys.stderr.flush()


def _prepare(inside: InsideLaunch) -> None:
    """A fresh channel (only this uid's) and the shim."""
    try:
        os.mkdir(inside.channel, 0o700)
    except FileExistsError:
        info = os.lstat(inside.channel)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise RuntimeError(f"{inside.channel} is not a directory of this user") from None
        for name in os.listdir(inside.channel):  # a run before this one's, whatever it left
            path = os.path.join(inside.channel, name)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    os.makedirs(os.path.dirname(inside.shim), mode=0o700, exist_ok=True)
    temporary = f"{inside.shim}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o500)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(shim_script(inside.tasks))
    os.chmod(temporary, 0o500)
    os.replace(temporary, inside.shim)


def _read_own_file(path: str, limit: int) -> bytes:
    """The bytes of a regular file of this uid with one link, not followed through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RequestRefused(f"{os.path.basename(path)} is not a regular file")
        if info.st_uid != os.getuid():
            raise RequestRefused(f"{os.path.basename(path)} was written by uid {info.st_uid}, "
                                 "not by this job")
        if info.st_nlink != 1:
            raise RequestRefused(f"{os.path.basename(path)} has {info.st_nlink} links")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def pending_requests(channel: str) -> Iterator[str]:
    """The names of the complete requests in the channel, oldest name first."""
    names = sorted(os.listdir(channel))
    for name in names:
        stem, dot, suffix = name.partition(".")
        if dot and suffix == "ready" and REQUEST_NAME.fullmatch(stem):
            yield stem


def _answer(channel: str, stem: str, status: int) -> None:
    temporary = os.path.join(channel, f"{stem}.status.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{status}\n")
    os.replace(temporary, os.path.join(channel, f"{stem}.status"))


def _shell_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _within_workspace(workspace: str, cwd: str) -> bool:
    """Whether the request's directory, resolved on the host, is still in the workspace (a link
    under /work may point anywhere)."""
    real = os.path.realpath(workspace)
    return is_within(os.path.realpath(os.path.join(real, os.path.relpath(cwd, WORKSPACE))), real)


def serve_request(args: LauncherArgs, stem: str, job_env_text: str) -> int:
    """Take request `stem` out of the channel, run it if it is sound, answer it: its status."""
    inside = args.inside
    base = os.path.join(inside.channel, stem)
    try:
        _read_own_file(f"{base}.ready", 0)
        os.unlink(f"{base}.ready")
        request = parse_request(_read_own_file(f"{base}.req", MAX_REQUEST_BYTES), inside.tasks)
        if not _within_workspace(inside.workspace, request.cwd):
            raise RequestRefused(f"the working directory {request.cwd} leads outside {WORKSPACE}")
    except (RequestRefused, OSError) as exc:
        why = exc if isinstance(exc, RequestRefused) else exc.strerror
        _say(f"refused request {stem}: {why}")
        status = REFUSED_STATUS
    else:
        env_file = os.path.join(os.path.dirname(inside.env_file), f"{LAUNCH_ENV_PREFIX}{stem}.env")
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(launch_env_text(job_env_text, request))
        argv = rank_launch(args, request, env_file)
        try:
            status = _shell_status(subprocess.run(argv, stdin=subprocess.DEVNULL, check=False).returncode)
        except OSError as exc:
            _say(f"cannot start {argv[0]}: {exc.strerror}")
            status = 127
    try:
        _answer(inside.channel, stem, status)
    except OSError as exc:
        _say(f"cannot answer request {stem}: {exc.strerror}")
    return status


def run(args: LauncherArgs) -> int:
    """Start the job's command, serve its requests until it ends: its exit status."""
    _prepare(args.inside)
    with open(args.inside.env_file, encoding="utf-8") as handle:
        job_env_text = handle.read()
    try:
        command = subprocess.Popen(args.command, stdin=subprocess.DEVNULL)
    except OSError as exc:
        _say(f"cannot start {args.command[0]}: {exc.strerror}")
        return 127
    # A stop (walltime, cancel) reaches the whole job; the launcher ends with its command.
    signal.signal(signal.SIGTERM, lambda *_: command.terminate())
    while command.poll() is None:
        served = False
        for stem in pending_requests(args.inside.channel):
            serve_request(args, stem, job_env_text)
            served = True
        if not served:
            time.sleep(POLL_SECONDS)
    assert command.returncode is not None
    return _shell_status(command.returncode)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_launcher_argv(sys.argv[1:] if argv is None else argv)
    except (ValueError, IndexError) as exc:
        _say(f"bad launcher command line: {exc}")
        return 125
    try:
        return run(args)
    except (OSError, RuntimeError) as exc:
        _say(f"cannot serve the job: {exc}")
        return 125

