"""Collect a job's declared outputs from its workspace into its directory, digesting them on the way.

The workspace is the job's: anything in it may be a link to the agent's own files, or be swapped
for one while it is read. So the walk opens every directory and file relative to its parent's
descriptor with O_NOFOLLOW, takes regular files only, and copies from the descriptor it digests,
never by path: what is collected is what the job left, and nothing else the agent can read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from runner.job.outputs import OutputFile

CHUNK = 1024 * 1024
# More files than this are listed as left out: the record, the log and a CI's artifact list must
# stay readable.
MAX_FILES = 10_000
# Directories deeper than this are not entered (a job can nest them without end).
MAX_DEPTH = 64
# Past this many, left-out files are counted rather than named one by one: a job can match a
# million files, and each named one is a line of the record.
MAX_LEFT_OUT = 1_000
# The walk's reason for a directory it did not enter; named whether or not a pattern matches it.
TOO_DEEP = f"more than {MAX_DEPTH} directories deep: not entered"
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class Collected:
    """The files collected, in path order; those matched but left out, each with why."""

    files: tuple[OutputFile, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()
    # Patterns no file matched: a job that forgot to write one should hear of it.
    unmatched: tuple[str, ...] = ()
    total_bytes: int = field(default=0)


def matches(pattern: str, path: str) -> bool:
    """Whether a relative path matches an output pattern: `*`, `?` and `[...]` within one name,
    `**` for any number of whole directories (none included)."""
    return _match(pattern.split("/"), path.split("/"))


def _match(pattern: list[str], parts: list[str]) -> bool:
    # One pass over the path per pattern part (a set of the positions reached so far): a pattern
    # of many `**` parts against a deep path must not take time exponential in either.
    reached = {0}
    for head in pattern:
        if head == "**":
            reached = set(range(min(reached), len(parts) + 1)) if reached else set()
        else:
            reached = {at + 1 for at in reached if at < len(parts) and fnmatchcase(parts[at], head)}
        if not reached:
            return False
    return len(parts) in reached


def _could_hold(pattern: str, directory: str) -> bool:
    """Whether files under `directory` (relative, "" for the top) can match the pattern: the walk
    enters only those, so a job's large unrelated trees are not read."""
    wanted = pattern.split("/")[:-1]
    parts = directory.split("/") if directory else []
    for index, part in enumerate(parts):
        if index >= len(wanted):
            return False
        if wanted[index] == "**":
            return True
        if not fnmatchcase(part, wanted[index]):
            return False
    return True


def collect_outputs(workspace: Path, patterns: Sequence[str], destination: Path, *,
                    max_bytes: int) -> Collected:
    """Copy the workspace's regular files that match `patterns` into `destination` (made here, 0700),
    under the same relative paths, in path order until `max_bytes` is reached; a file that would
    pass it is left out and named, as is any match that is not a regular file."""
    if not patterns:
        return Collected()
    nothing = max_bytes <= 0  # the account keeps no outputs: each match is named, none copied
    found: list[str] = []
    left_out: list[tuple[str, str]] = []
    try:
        top = os.open(workspace, _DIRECTORY_FLAGS)
    except OSError as exc:
        return Collected(left_out=((str(workspace), f"the workspace cannot be read: {exc.strerror}"),),
                         unmatched=tuple(patterns))
    try:
        for relative, kind in _walk(top, "", patterns, 0):
            if kind == TOO_DEEP:
                left_out.append((relative + "/", kind))
                continue
            if not any(matches(p, relative) for p in patterns):
                continue
            if kind != "file":
                left_out.append((relative, kind))
            else:
                found.append(relative)
        found.sort()
        files: list[OutputFile] = []
        total = 0
        if not nothing:
            # Left by an earlier collection of this job (stopped before its record was stored): its
            # files may be second names of the workspace's, which must never be written through.
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            destination.mkdir(mode=0o700, parents=True, exist_ok=True)
        full: str | None = None  # the file that reached max_output_bytes: none after it is taken
        copier = _Copier(top, destination)
        try:
            for relative in found:
                if nothing:
                    left_out.append((relative, "the account's max_output_bytes is 0: it keeps no outputs"))
                    continue
                if full is not None:
                    left_out.append((relative, f"the account's max_output_bytes ({max_bytes} bytes) was "
                                               f"reached at {full}"))
                    continue
                if len(files) >= MAX_FILES:
                    left_out.append((relative, f"more than {MAX_FILES} files"))
                    continue
                copied = copier.copy(relative, room=max_bytes - total)
                if isinstance(copied, Full):
                    full = relative
                    copied = copied.why
                if isinstance(copied, str):
                    left_out.append((relative, copied))
                    continue
                files.append(copied)
                total += copied.size
        finally:
            copier.close()
    finally:
        os.close(top)
    unmatched = tuple(p for p in patterns
                      if not any(matches(p, f.path) for f in files)
                      and not any(matches(p, path) for path, _ in left_out))
    return Collected(tuple(files), _bounded(sorted(left_out)), unmatched, total)


def _bounded(left_out: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The first MAX_LEFT_OUT left-out files by name, and one entry that counts the rest."""
    if len(left_out) <= MAX_LEFT_OUT:
        return tuple(left_out)
    rest = left_out[MAX_LEFT_OUT:]
    return (*left_out[:MAX_LEFT_OUT],
            (rest[0][0], f"this and {len(rest) - 1} more matching files were not collected either "
                         f"(only the first {MAX_LEFT_OUT} are named)"))


def _walk(directory_fd: int, prefix: str, patterns: Sequence[str], depth: int) -> Iterator[tuple[str, str]]:
    """(relative path, "file" or why it is not one) of every entry the patterns may match."""
    with os.scandir(directory_fd) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        relative = f"{prefix}{entry.name}"
        # The entry's type as the directory listing gives it (no stat per file); a file swapped
        # after the listing is caught when it is opened, without following links.
        try:
            is_directory = entry.is_dir(follow_symlinks=False)
            is_file = not is_directory and entry.is_file(follow_symlinks=False)
            is_link = not (is_directory or is_file) and entry.is_symlink()
        except OSError:
            continue  # gone since it was listed
        if is_directory:
            if not any(_could_hold(p, relative) for p in patterns):
                continue
            if depth >= MAX_DEPTH:
                yield relative, TOO_DEEP
                continue
            try:
                child = os.open(entry.name, _DIRECTORY_FLAGS, dir_fd=directory_fd)
            except OSError:
                continue  # swapped for something else, or unreadable: nothing of it is taken
            try:
                yield from _walk(child, relative + "/", patterns, depth + 1)
            finally:
                os.close(child)
        elif is_file:
            yield relative, "file"
        elif is_link:
            yield relative, "a symbolic link (only regular files are collected)"
        else:
            yield relative, "not a regular file"


def open_under(top: int, relative: str) -> int:
    """The file at `relative` under the directory `top`, every step opened without following links."""
    *parents, name = relative.split("/")
    fd = os.dup(top)
    try:
        for parent in parents:
            child = os.open(parent, _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(name, _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def relative_of(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@dataclass(frozen=True)
class Full:
    """Why a file was left out that would have passed max_output_bytes: the files after it are too."""

    why: str


class _Copier:
    """Copies files of one workspace, in path order, into one destination.

    Files come sorted, so most share the directory of the one before: that directory's descriptor
    is kept (it was opened without following links, and stays the directory it was whatever the
    job renames meanwhile), as is the set of target directories already made, and one buffer
    serves every read. Per small file that leaves an open, an fstat, a create and a read and
    write each: what `cp` does.
    """

    def __init__(self, top: int, destination: Path) -> None:
        self._top = top
        self._destination = destination
        self._parent: tuple[str, int] | None = None
        # The target directory of the last file, open: names are made in it relative to it.
        self._target: tuple[str, int] | None = None
        self._buffer = bytearray(CHUNK)

    def close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
        if self._target is not None:
            os.close(self._target[1])
            self._target = None

    def _directory(self, relative: str) -> int:
        if self._parent is not None and self._parent[0] == relative:
            return self._parent[1]
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
        fd = os.dup(self._top)
        try:
            for part in relative.split("/") if relative else []:
                child = os.open(part, _DIRECTORY_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError:
            os.close(fd)
            raise
        self._parent = (relative, fd)
        return fd

    def _target_directory(self, relative: str) -> int:
        """The open target directory for files of the workspace's directory `relative` (made
        here; the destination is the agent's own, so its path is taken as it is)."""
        if self._target is not None and self._target[0] == relative:
            return self._target[1]
        if self._target is not None:
            os.close(self._target[1])
            self._target = None
        target = self._destination / relative if relative else self._destination
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._target = (relative, os.open(target, _DIRECTORY_FLAGS))
        return self._target[1]

    def copy(self, relative: str, *, room: int) -> OutputFile | Full | str:
        """The collected file, or why it was left out."""
        parent, _, name = relative.rpartition("/")
        try:
            source = os.open(name, _FILE_FLAGS, dir_fd=self._directory(parent))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "a symbolic link (only regular files are collected)"
            return f"cannot be read: {exc.strerror}"
        try:
            info = os.fstat(source)
            if not stat.S_ISREG(info.st_mode):
                return "not a regular file"
            if info.st_size > room:
                return Full(f"{info.st_size} bytes would pass the account's max_output_bytes "
                            f"({max(room, 0)} bytes were left)")
            target = self._target_directory(parent)
            if info.st_nlink == 1:
                linked = self._link(name, parent, target, info, source, room)
                if linked is not None:
                    return linked
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=target)
            try:
                copied = self._pump(source, out, room)
            finally:
                os.close(out)
            if copied is None:
                os.unlink(name, dir_fd=target)
                return Full(f"grew past the account's max_output_bytes while it was collected "
                            f"({room} bytes were left)")
            digest, size = copied
            return OutputFile(relative, digest, size)
        finally:
            os.close(source)

    def _link(self, name: str, parent: str, target: int, info: os.stat_result, source: int,
              room: int) -> OutputFile | Full | None:
        """The file kept under a second name of its own inode, in the open directory `target`,
        instead of a copy (None: copy it).

        The job has ended and nothing writes its workspace any more, so the inode is as good as
        a copy, costs no space and no copying: creating 20,000 small copies costs far more than
        digesting them. Only a file with no other name is linked (another name could be written
        through), on the same file system, and only if the new name is the inode that was opened
        and is digested: a name swapped meanwhile is removed again and the file copied.
        """
        try:
            os.link(name, name, src_dir_fd=self._directory(parent), dst_dir_fd=target, follow_symlinks=False)
        except OSError:
            return None  # another file system, or links refused here
        try:
            linked = os.stat(name, dir_fd=target, follow_symlinks=False)
            same = (linked.st_dev, linked.st_ino) == (info.st_dev, info.st_ino)
        except OSError:
            same = False
        if not same:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=target)
            return None
        digested = self._pump(source, None, room)
        if digested is None:
            os.unlink(name, dir_fd=target)
            return Full(f"grew past the account's max_output_bytes while it was collected "
                        f"({room} bytes were left)")
        digest, size = digested
        return OutputFile(relative_of(parent, name), digest, size)

    def _pump(self, source: int, out: int | None, room: int) -> tuple[str, int] | None:
        """Copy and digest what `source` holds; None when it holds more than `room` bytes."""
        digest = hashlib.sha256()
        view = memoryview(self._buffer)
        size = 0
        while count := os.readv(source, [self._buffer]):
            size += count
            if size > room:  # it grew while it was read
                return None
            chunk = view[:count]
            digest.update(chunk)
            while out is not None and chunk:
                chunk = chunk[os.write(out, chunk):]
        return digest.hexdigest(), size
