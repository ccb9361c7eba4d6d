"""Reading secret files, and checking that files the agent trusts are not open to tampering.

A secret (API token, private key, webhook secret) must be a regular file owned by the
service account and closed to everyone else. The checks run on the descriptor that is
read, so the file cannot be swapped between the check and the read.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from runner.errors import HpcRunnerError

MAX_SECRET_BYTES = 1024 * 1024


class SecretFileError(HpcRunnerError):
    """A secret or trusted file that is missing, unreadable, or open to other users.

    `fix` is the command or step that repairs it, for `hpc-runner doctor` to print.
    """

    def __init__(self, message: str, *, path: Path, fix: str) -> None:
        self.path = path
        self.detail = message
        self.fix = fix
        super().__init__(f"{message} (fix: {fix})")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def read_secret_file(path: str | Path, *, what: str) -> str:
    """The secret in `path`, without one trailing newline; refuse a file others could read.

    Refused: a symbolic link as the last component, anything but a regular file, a file not
    owned by the current user, one readable or writable by group or others, and an empty one.
    """
    file = Path(path)
    descriptor = _open_secret(file, what)
    try:
        check_secret_status(file, os.fstat(descriptor), what)
        data = _read_limited(descriptor, file, what)
    finally:
        os.close(descriptor)
    return _decode_secret(data, file, what)


def _open_secret(file: Path, what: str) -> int:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the
    # fstat check then refuses it like any other non-regular file.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(file, flags)
    except FileNotFoundError:
        raise SecretFileError(f"{what} {file} does not exist", path=file,
                              fix=f"create {file} holding the {what}, then run `chmod 600 {file}`") from None
    except PermissionError:
        me = user_name(os.geteuid())
        raise SecretFileError(f"{what} {file} cannot be read by {me}", path=file,
                              fix=f"run `chown {me} {file}` and `chmod 600 {file}`") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SecretFileError(f"{what} {file} is a symbolic link", path=file,
                                  fix=f"point the config at the file itself ({os.path.realpath(file)}), "
                                      "not at a link to it") from None
        raise SecretFileError(f"{what} {file} cannot be opened: {exc.strerror}", path=file,
                              fix=f"make {file} a regular file holding the {what}") from None


def check_secret_status(file: Path, st: os.stat_result, what: str) -> None:
    """Refuse what `st` (of the opened file) shows to be unsafe for a secret."""
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"{what} {file} is not a regular file", path=file,
                              fix=f"make {file} a regular file holding the {what}")
    me = os.geteuid()
    if st.st_uid != me:
        raise SecretFileError(
            f"{what} {file} is owned by {user_name(st.st_uid)}, not by {user_name(me)} "
            "(the account the agent runs as)", path=file,
            fix=f"run `chown {user_name(me)} {file}` and `chmod 600 {file}`")
    if st.st_mode & 0o077:
        raise SecretFileError(
            f"{what} {file} is open to group or others (mode {_mode(st)}); it must be mode 0600",
            path=file, fix=f"chmod 600 {file}")


def _read_limited(descriptor: int, file: Path, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(descriptor, 65536):
        size += len(chunk)
        if size > MAX_SECRET_BYTES:
            raise SecretFileError(f"{what} {file} is larger than {MAX_SECRET_BYTES} bytes", path=file,
                                  fix=f"check that {file} is the {what} and nothing else")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_secret(data: bytes, file: Path, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{what} {file} is not UTF-8 text", path=file,
                              fix=f"write the {what} into {file} as text") from None
    # Editors add one newline at the end; anything more is part of the secret.
    text = text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")
    if not text.strip():
        raise SecretFileError(f"{what} {file} is empty", path=file,
                              fix=f"write the {what} into {file}")
    return text


def check_not_writable_by_others(path: str | Path, what: str) -> None:
    """Refuse a public-but-trusted file (policy, JWKS) that someone else could change.

    Others may read it; only its owner may write it, and the owner must be us or root. Its
    directory is held to the same rule, since whoever can write there can replace the file.
    """
    file = Path(path)
    try:
        st = file.stat()
    except FileNotFoundError:
        raise SecretFileError(f"{what} {file} does not exist", path=file,
                              fix=f"create {file} or correct the path in the config") from None
    except OSError as exc:
        raise SecretFileError(f"{what} {file} cannot be examined: {exc.strerror}", path=file,
                              fix=f"make {file} readable by {user_name(os.geteuid())}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"{what} {file} is not a regular file", path=file,
                              fix=f"point the config at a regular file for the {what}")
    _check_owner_and_mode(file, st, f"{what} {file}")
    # Both the directory named and, through a symlink, the one really holding the file.
    for directory in dict.fromkeys((Path(os.path.abspath(file)).parent, file.resolve().parent)):
        _check_directory(directory, what)


def _check_owner_and_mode(file: Path, st: os.stat_result, label: str) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise SecretFileError(
            f"{label} is owned by {user_name(st.st_uid)}, who could change it", path=file,
            fix=f"run `chown {user_name(os.geteuid())} {file}` (or chown it to root)")
    if st.st_mode & 0o022:
        raise SecretFileError(f"{label} is writable by group or others (mode {_mode(st)})",
                              path=file, fix=f"chmod go-w {file}")


def _check_directory(directory: Path, what: str) -> None:
    try:
        st = directory.stat()
    except OSError:
        return  # the file itself was found, so its directory exists: nothing more to learn
    # A sticky directory (like /tmp) lets nobody replace a file they do not own.
    if st.st_mode & stat.S_ISVTX:
        return
    _check_owner_and_mode(directory, st, f"{directory}, the directory holding the {what},")
