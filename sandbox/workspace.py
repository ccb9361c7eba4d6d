"""A submitted workspace becomes the agent's own copy; what the job made goes back when it ends.

Apptainer binds a workspace by its path, and it does so late: on a compute node, after the job
waited in Slurm's queue. A path its submitter controls can be renamed and replaced by a link to
anything the service account can read (its state directory, its home) at any moment between a
check and that bind. No check of a path closes that window, so the agent never mounts a path a
submitter controls: at submission it copies the submitter's directory into a directory only it can
write, and the job binds the copy.

Both copies walk by descriptors (`openat` with `O_NOFOLLOW`), so no rename or link made during
the walk can lead them out of the tree they started in:
- copy in: the directory must belong to the submitter; an entry is copied when the submitter owns
  it or anyone may read it (or it is a single-linked file of the service account, as the results
  of an earlier job are). Symbolic links are copied as links: inside the sandbox they resolve among
  the sandbox's own mounts. Sockets, pipes and devices are left out and named. Size and entry count
  are bounded.
- copy back: only into the very directory that was copied (same device, inode and owner: a
  directory put in its place gets nothing), only what the job created or changed (a file the job
  left alone never overwrites a newer edit of its submitter), each file written under a temporary
  name and renamed into place, so no link in the submitter's tree is written through.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# What a submitted workspace may hold; a source tree with its data fits, a disk image does not
# (large inputs belong in a granted bind). Both bound the work done at submission.
DEFAULT_MAX_WORKSPACE_BYTES = 1024 ** 3
MAX_WORKSPACE_ENTRIES = 100_000
MAX_WORKSPACE_DEPTH = 128
_COPY_CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a pipe put where a file was must not hang the copy; fstat then refuses it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_PREFIX = ".hpc-runner-return-"


class WorkspaceError(Exception):
    """The workspace cannot be copied in, or the results cannot go back; the message says why."""


@dataclass(frozen=True)
class Origin:
    """The submitted directory, as the object it was when it was copied."""

    path: str
    device: int
    inode: int
    owner: int

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "device": self.device, "inode": self.inode, "owner": self.owner}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Origin:
        values = (data.get("path"), data.get("device"), data.get("inode"), data.get("owner"))
        path, device, inode, owner = values
        if not isinstance(path, str) or not all(isinstance(v, int) for v in (device, inode, owner)):
            raise WorkspaceError(f"malformed workspace origin {dict(data)!r}")
        assert isinstance(device, int) and isinstance(inode, int) and isinstance(owner, int)
        return cls(path, device, inode, owner)


@dataclass
class Snapshot:
    """What copy_in made: where it came from and what each entry was, to tell later what changed."""

    origin: Origin
    entries: dict[str, list[object]] = field(default_factory=dict)  # relative path -> signature
    bytes: int = 0
    left_out: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"origin": self.origin.to_json(), "entries": self.entries}, handle)

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkspaceError(f"cannot read the workspace record {path}: {exc}") from None
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise WorkspaceError(f"malformed workspace record {path}")
        return cls(Origin.from_json(data.get("origin") or {}), entries)


@dataclass
class Returned:
    """What copy_back did."""

    files: int = 0
    bytes: int = 0
    not_returned: list[str] = field(default_factory=list)


def _signature(info: os.stat_result, link_target: str | None = None) -> list[object]:
    if link_target is not None:
        return ["link", link_target]
    if stat.S_ISDIR(info.st_mode):
        return ["dir"]
    return ["file", info.st_size, info.st_mtime_ns]


def _describe(relative: str) -> str:
    return relative or "."


def _may_copy(info: os.stat_result, owner: int, agent_uid: int) -> bool:
    if info.st_uid == owner:
        return True
    if stat.S_ISDIR(info.st_mode):
        world = stat.S_IROTH | stat.S_IXOTH
        return info.st_uid == agent_uid or info.st_mode & world == world
    # A file of the service account with one link was written here by the service account (an
    # earlier job's results); one with more links may be a hard link to one of its private files.
    return bool(info.st_mode & stat.S_IROTH) or (info.st_uid == agent_uid and info.st_nlink == 1)


@dataclass(frozen=True)
class _Entry:
    relative: str          # the directory it is in, relative to the root ("" for the root)
    dir_fd: int            # that directory, open; the entry is opened relative to it
    name: str
    info: os.stat_result   # lstat

    @property
    def path(self) -> str:
        return f"{self.relative}/{self.name}" if self.relative else self.name


def _walk(root_fd: int) -> Iterator[_Entry | str]:
    """Every entry below root_fd, parents before children; after the last entry of a directory,
    its relative path (a str), so the caller can let go of what it holds for it.

    Only the directories on the current path are open, each opened relative to its parent with
    O_NOFOLLOW and checked to be the one listed; depth is bounded, so is the number of them.
    """
    frames: list[tuple[str, int, Iterator[str]]] = []

    def enter(relative: str, fd: int) -> None:
        with os.scandir(fd) as listing:
            names = sorted(entry.name for entry in listing)
        frames.append((relative, fd, iter(names)))

    enter("", os.dup(root_fd))
    try:
        while frames:
            relative, fd, names = frames[-1]
            name = next(names, None)
            if name is None:
                frames.pop()
                os.close(fd)
                if relative:
                    yield relative
                continue
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the listing: nothing to copy
            entry = _Entry(relative, fd, name, info)
            yield entry
            if stat.S_ISDIR(info.st_mode):
                if len(frames) >= MAX_WORKSPACE_DEPTH:
                    raise WorkspaceError(f"{entry.path} is nested deeper than {MAX_WORKSPACE_DEPTH} "
                                         "directories")
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if os.fstat(child).st_ino != info.st_ino:
                    os.close(child)
                    raise WorkspaceError(f"{entry.path} was replaced while it was read")
                enter(entry.path, child)
    finally:
        for _, fd, _ in frames:
            os.close(fd)


def _open_origin(path: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WorkspaceError(f"workspace {path} is not a directory (a link is not followed)") from None
        raise WorkspaceError(f"workspace {path}: {exc.strerror}") from None
    return fd, os.fstat(fd)


def copy_in(source: Path, destination: Path, *, owner: int, agent_uid: int,
            max_bytes: int = DEFAULT_MAX_WORKSPACE_BYTES,
            max_entries: int = MAX_WORKSPACE_ENTRIES) -> Snapshot:
    """Copy the submitter's directory `source` into the new directory `destination`.

    `source` is taken as it resolves now, and then only through descriptors. Raises
    WorkspaceError naming what is wrong; `destination` is then left for the caller to remove.
    """
    if not source.is_absolute():
        raise WorkspaceError(f"workspace {source} must be an absolute path")
    real = os.path.realpath(source)
    src_fd, info = _open_origin(real)
    try:
        if info.st_uid != owner:
            raise WorkspaceError(f"workspace {source} is owned by uid {info.st_uid}, not by you "
                                 f"(uid {owner})")
        snapshot = Snapshot(Origin(real, info.st_dev, info.st_ino, owner))
        destination.mkdir(mode=0o700)
        dst_root = os.open(destination, _DIR_FLAGS)
        # Destination directory descriptors by relative path; parents always come first.
        targets: dict[str, int] = {"": dst_root}
        try:
            for item in _walk(src_fd):
                if isinstance(item, str):
                    os.close(targets.pop(item))
                    continue
                entry, path, name = item.info, item.path, item.name
                if len(snapshot.entries) >= max_entries:
                    raise WorkspaceError(f"workspace {source} holds more than {max_entries} entries; "
                                         "put large inputs in a granted bind")
                if not _may_copy(entry, owner, agent_uid):
                    raise WorkspaceError(
                        f"workspace {source}: {path} belongs to uid {entry.st_uid} and is not readable "
                        "by others; only what you could read yourself is copied")
                parent = targets[item.relative]
                if stat.S_ISDIR(entry.st_mode):
                    os.mkdir(name, 0o700, dir_fd=parent)
                    targets[path] = os.open(name, _DIR_FLAGS, dir_fd=parent)
                    os.chmod(targets[path], stat.S_IMODE(entry.st_mode) | 0o700)
                    snapshot.entries[path] = _signature(entry)
                elif stat.S_ISLNK(entry.st_mode):
                    target = os.readlink(name, dir_fd=item.dir_fd)
                    os.symlink(target, name, dir_fd=parent)
                    snapshot.entries[path] = _signature(entry, target)
                elif stat.S_ISREG(entry.st_mode):
                    room = max_bytes - snapshot.bytes
                    copied = _copy_file(item.dir_fd, name, parent, name, limit=room, what=path)
                    if copied is None:
                        raise WorkspaceError(f"workspace {source} is larger than {max_bytes} bytes "
                                             "(max_workspace_size); put large inputs in a granted bind")
                    snapshot.bytes += copied.st_size
                    snapshot.entries[path] = _signature(copied)
                else:
                    snapshot.left_out.append(path)
        finally:
            for fd in targets.values():
                os.close(fd)
        return snapshot
    finally:
        os.close(src_fd)


def _copy_file(src_dir: int, src_name: str, dst_dir: int, dst_name: str, *, limit: int | None,
               what: str) -> os.stat_result | None:
    """Copy one regular file (mode and times kept); the stat of the copy, or None past `limit`."""
    try:
        src = os.open(src_name, _FILE_FLAGS, dir_fd=src_dir)
    except OSError as exc:
        raise WorkspaceError(f"{what}: {exc.strerror}") from None
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            raise WorkspaceError(f"{what} was replaced while it was read")
        mode = stat.S_IMODE(info.st_mode) & 0o777 | 0o600
        dst = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      mode, dir_fd=dst_dir)
        try:
            copied = 0
            while chunk := os.read(src, _COPY_CHUNK):
                copied += len(chunk)
                if limit is not None and copied > limit:
                    return None
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view):]
            os.fchmod(dst, mode)
            os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns))
            return os.fstat(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def copy_back(copy: Path, snapshot: Snapshot, *, job_id: str) -> Returned:
    """Return what the job created or changed in `copy` to the directory it was copied from.

    Raises WorkspaceError when that directory is gone or is not the one that was copied; single
    entries that cannot go back are listed in the result.
    """
    origin = snapshot.origin
    target_fd, info = _open_origin(origin.path)
    returned = Returned()
    try:
        if (info.st_dev, info.st_ino) != (origin.device, origin.inode) or info.st_uid != origin.owner:
            raise WorkspaceError(f"{origin.path} is no longer the directory that was submitted (it was "
                                 "moved or replaced)")
        copy_fd = os.open(copy, _DIR_FLAGS)
        # Target directories by relative path; None: that directory could not go back.
        targets: dict[str, int | None] = {"": os.dup(target_fd)}
        try:
            for item in _walk(copy_fd):
                if isinstance(item, str):
                    done = targets.pop(item, None)
                    if done is not None:
                        os.close(done)
                    continue
                parent = targets.get(item.relative)
                is_dir = stat.S_ISDIR(item.info.st_mode)
                if parent is None:
                    if is_dir:
                        targets[item.path] = None
                    continue
                try:
                    if is_dir:
                        targets[item.path] = _return_directory(parent, item)
                    else:
                        _return_entry(parent, item, snapshot, returned, job_id)
                except (OSError, WorkspaceError) as exc:
                    returned.not_returned.append(
                        f"{item.path} ({exc.strerror if isinstance(exc, OSError) else exc})")
                    if is_dir:
                        targets[item.path] = None
        finally:
            for fd in targets.values():
                if fd is not None:
                    os.close(fd)
            os.close(copy_fd)
    finally:
        os.close(target_fd)
    return returned


def _return_entry(parent: int, item: _Entry, snapshot: Snapshot, returned: Returned, job_id: str) -> None:
    """One file or link of the copy into the directory `parent`, if the job created or changed it."""
    if stat.S_ISLNK(item.info.st_mode):
        link = os.readlink(item.name, dir_fd=item.dir_fd)
        if snapshot.entries.get(item.path) == _signature(item.info, link):
            return

        def write(temp: str) -> None:
            os.symlink(link, temp, dir_fd=parent)
    elif stat.S_ISREG(item.info.st_mode):
        if snapshot.entries.get(item.path) == _signature(item.info):
            return

        def write(temp: str) -> None:
            _copy_file(item.dir_fd, item.name, parent, temp, limit=None, what=item.path)
    else:
        raise WorkspaceError("not a file, directory or link")
    _replace(parent, item.name, write, job_id)
    returned.files += 1
    returned.bytes += item.info.st_size if stat.S_ISREG(item.info.st_mode) else 0


def _return_directory(parent: int, item: _Entry) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(item.name, stat.S_IMODE(item.info.st_mode) | 0o700, dir_fd=parent)
    try:
        return os.open(item.name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WorkspaceError("not a directory in the submitted workspace") from None
        raise


def _replace(parent: int, name: str, write: Callable[[str], object], job_id: str) -> None:
    """Write an entry under a fresh name beside `name`, then rename it into place: a rename
    replaces the name itself, so a link someone put there is replaced, never written through."""
    temp = f"{_TEMP_PREFIX}{job_id}-{secrets.token_hex(4)}"
    try:
        write(temp)
        os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise
