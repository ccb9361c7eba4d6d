"""Where the agent's sockets (the local queue's, the dashboard's) live for a given config, and
making them there safely."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from runner.config import AgentConfig
from runner.errors import InfrastructureError, InputError
from runner.secrets import user_name
from sandbox.pathtrust import exposure

# sockaddr_un holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107


def socket_mode(config: AgentConfig) -> int:
    """Inside the private state dir only the agent's user can reach the socket anyway; a socket
    the admin placed elsewhere is for every local user (the policy decides what each may do)."""
    return 0o600 if config.socket is None else 0o666


def web_socket_mode(config: AgentConfig) -> int:
    """The dashboard's socket, by the same rule: private inside the state dir, else for every
    local user (each sees the jobs the policy lets them see)."""
    assert config.web_socket is not None
    inside = config.web_socket.resolve().is_relative_to(config.state_dir.resolve())
    return 0o600 if inside else 0o666


def directory_problem(st: os.stat_result, *, sticky_is_enough: bool) -> str | None:
    """Why someone other than us (or root) could replace what a directory holds; None if nobody can."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    found = exposure(st, (0, os.geteuid()), sticky_is_enough=sticky_is_enough)
    if found == "owner":
        return f"is owned by {user_name(st.st_uid)}, who could replace what it holds"
    if found == "writers":
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_socket_directory(directory: Path, *, key: str = "socket",
                           what: str = "the local queue socket") -> None:
    """Refuse a socket directory in which anyone but us or root could put something else in the
    socket's place (a link to the agent's state, their own socket).

    The directory itself must be ours or root's and writable by nobody else: a sticky one (like
    /tmp) is not enough, since its sticky bit does not stop anyone from taking a name that is free
    (the socket's, after a restart). The directories above it may be sticky: nobody can rename
    our directory out of a sticky one.
    """
    real = Path(os.path.realpath(directory))
    shown = str(directory) if real == directory else f"{directory} (resolves to {real})"
    fix = (f"make it a directory of its own that only {user_name(os.geteuid())} (or root) can write, "
           f"e.g. `install -d -m 755 -o {user_name(os.geteuid())} {real}`, or set `{key}` in the config "
           "to a path in such a directory")
    for index, place in enumerate((real, *real.parents)):
        problem = directory_problem(os.stat(place), sticky_is_enough=index > 0)
        if problem:
            if index == 0:
                raise InputError(f"{shown}, {what}'s directory, {problem}: {fix}", field=key)
            raise InputError(f"{place}, a directory above {what}, {problem}: {fix}", field=key)


def bind_socket(path: Path, mode: int) -> socket.socket:
    """A Unix socket bound at `path` with `mode`; its directory must pass check_socket_directory.

    Linux has no lchmod, and chmod on a path follows a link: a socket bound at its final path and
    then chmod-ed could be swapped for a link in between, and the mode would go to the link's
    target. fchmod on the socket's descriptor does not help either (it changes the socket, not
    the file bind creates). So the socket is bound in a fresh directory of ours (mode 0700, which
    nobody else can enter or write), given its mode there, where nothing can have replaced it,
    and then renamed into place: rename replaces whatever stood at `path` (a stale socket, a
    link) and never follows a link. The socket is never reachable at `path` with another mode.
    """
    private = tempfile.mkdtemp(prefix=".hpc-runner-", dir=path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        directory = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Bound through the directory's descriptor: the path stays short whatever the
            # directory's name (a socket path holds at most 107 bytes).
            sock.bind(f"/proc/self/fd/{directory}/{path.name}")
            os.chmod(path.name, mode, dir_fd=directory)
            os.rename(path.name, path.name, src_dir_fd=directory, dst_dir_fd=parent)
        finally:
            os.close(directory)
            os.close(parent)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(private)
    return sock


def check_socket_path(path: Path, *, key: str = "socket", what: str = "the local queue socket") -> None:
    """Refuse a path the kernel cannot bind or connect a Unix socket to, saying why."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise InputError(f"{what} {path} is {size} bytes long; a Unix socket path has at "
                         f"most {MAX_SOCKET_PATH_BYTES}: set a shorter `{key}` in the config",
                         field=key)


def listen_at(path: Path, mode: int, *, key: str = "socket",
              what: str = "the local queue socket") -> socket.socket:
    """A non-blocking listening Unix socket at `path` with `mode` (the config's `key` names it in
    messages): its directory made if missing and checked (check_socket_directory), a stale socket
    (or anything else) at the path replaced, a live one refused."""
    check_socket_path(path, key=key, what=what)
    # a socket for every local user needs a directory they can traverse
    path.parent.mkdir(mode=0o755 if mode & 0o066 else 0o700, parents=True, exist_ok=True)
    # Before anything is done at the path: nobody else may be able to change what stands there.
    check_socket_directory(path.parent, key=key, what=what)
    # A stale socket (or anything else) is replaced by binding (see bind_socket), a live one not.
    if (path.exists() or path.is_symlink()) and socket_alive(path):
        raise InputError(f"another agent is already listening on {path}")
    try:
        sock = bind_socket(path, mode)
    except OSError as exc:
        raise InfrastructureError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    try:
        sock.listen(socket.SOMAXCONN)  # a burst of connections waits here, not in the clients' errors
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise InfrastructureError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
