"""What of a finished job's files may go (`[retention]`), and removing it safely.

`plan` is pure: given the job records, what each one's directory holds and the time now, it says
which paths have expired. A job that has not ended keeps everything; the job's record and the audit
log are never among the paths (they live in the store, in `state_dir`). `remove` does the deleting:
only below `work_root` (or `[sandbox] workdir_root`, where a job's scratch may live), never following
a symbolic link out of it. The agent runs both once an hour and at start; `hpc-runner gc` on demand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner.binds import is_within
from runner.config import AgentConfig, RetentionConfig
from runner.job import TERMINAL_STATES, JobRecord, is_job_id
from runner.store import Store

# What a job's directory holds that its own retention applies to: the log the job wrote, and the
# outputs collected from it. Everything else in it (workspace, tmp, job files) goes with job_dirs.
LOG_NAME = "output.log"
OUTPUTS_NAME = "outputs"
# How often the agent removes what expired.
INTERVAL_SECONDS = 3600.0
# The audit log's name for a removal.
AUDIT_ACTION = "retention"

Kind = Literal["job_dirs", "logs", "outputs"]


@dataclass(frozen=True)
class JobFiles:
    """A job's record and what its directory (and its scratch, with `workdir_root`) holds now."""

    job: JobRecord
    entries: frozenset[str] | None   # None: it has no directory (any more)
    scratch: bool = False


@dataclass(frozen=True)
class Expired:
    job_id: str
    path: Path
    kind: Kind
    root: Path  # the directory it must stay inside: work_root, or workdir_root for a scratch


@dataclass(frozen=True)
class Removed:
    expired: Expired
    size: int            # bytes (apparent size of everything in it)
    gone: bool           # False: a dry run, or it vanished meanwhile


class RefusedPath(Exception):
    """A path that is not where a job's files may be: nothing was removed."""


def plan(jobs: Iterable[JobFiles], *, retention: RetentionConfig, now: float, work_root: Path,
         workdir_root: Path | None = None, protected: Sequence[Path] = ()) -> list[Expired]:
    """The paths that have expired at `now`, job by job. A job's whole directory when everything in
    it has expired; else each expired entry. `protected` paths (the state dirs) are never in it,
    nor anything that holds one."""
    found: list[Expired] = []
    for files in jobs:
        job = files.job
        if not job.state.is_terminal or job.finished_at is None or not is_job_id(job.id):
            continue
        age = now - job.finished_at
        limits: dict[Kind, int] = {"job_dirs": retention.job_dirs, "logs": retention.logs,
                                   "outputs": retention.outputs}
        expired = {kind for kind, limit in limits.items() if age >= limit}
        directory = work_root / job.id
        if files.entries is not None:
            inside = [(name, _kind_of(name)) for name in sorted(files.entries) if _plain_name(name)]
            going = [(name, kind) for name, kind in inside if kind in expired]
            if len(going) == len(files.entries) and (going or "job_dirs" in expired):
                found.append(Expired(job.id, directory, "job_dirs" if "job_dirs" in expired else going[0][1],
                                     work_root))
            else:
                found += [Expired(job.id, directory / name, kind, work_root) for name, kind in going]
        if files.scratch and workdir_root is not None and "job_dirs" in expired:
            found.append(Expired(job.id, workdir_root / job.id, "job_dirs", workdir_root))
    return [item for item in found if not _touches(item.path, protected)]


def _kind_of(name: str) -> Kind:
    if name == LOG_NAME:
        return "logs"
    if name == OUTPUTS_NAME:
        return "outputs"
    return "job_dirs"


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _touches(path: Path, protected: Sequence[Path]) -> bool:
    return any(is_within(str(path), str(other)) or is_within(str(other), str(path)) for other in protected)


# --- reading what is there --------------------------------------------------------------------------


def job_files(records: Iterable[JobRecord], *, work_root: Path,
              workdir_root: Path | None = None) -> list[JobFiles]:
    """What each ended job's directory holds; jobs without a directory are left out."""
    found: list[JobFiles] = []
    for job in records:
        if not job.state.is_terminal or not is_job_id(job.id):
            continue
        entries = _entries(work_root / job.id)
        scratch = workdir_root is not None and _is_real_directory(workdir_root / job.id)
        if entries is None and not scratch:
            continue
        found.append(JobFiles(job, None if entries is None else frozenset(entries), scratch))
    return found


def _entries(directory: Path) -> list[str] | None:
    if not _is_real_directory(directory):
        return None
    try:
        return os.listdir(directory)
    except OSError:
        return None


def _is_real_directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def expired_now(config: AgentConfig, store: Store, now: float) -> list[Expired]:
    """What has expired of the ended jobs in `store`, by `config`'s `[retention]`."""
    records = store.list_jobs(states=TERMINAL_STATES)
    files = job_files(records, work_root=config.work_root, workdir_root=config.sandbox.workdir_root)
    return plan(files, retention=config.retention, now=now, work_root=config.work_root,
                workdir_root=config.sandbox.workdir_root,
                protected=[path for path, _ in config.named_protected_paths()])


# --- removing -----------------------------------------------------------------------------------------


def remove(item: Expired, *, dry_run: bool = False) -> Removed:
    """Remove one expired path (or, with `dry_run`, measure it). Raises RefusedPath when it is not a
    job's own entry below its root, as it really is on disk (no link on the way out of it)."""
    root = os.path.realpath(item.root)
    relative = os.path.relpath(item.path, item.root)
    parts = relative.split(os.sep)
    if relative.startswith("..") or not parts or not is_job_id(parts[0]) or len(parts) > 2:
        raise RefusedPath(f"{item.path} is not a job's directory or an entry of one below {item.root}")
    # The job's directory must be a real directory right below the root: a link in its place
    # would lead the removal elsewhere.
    job_directory = os.path.join(root, parts[0])
    if os.path.realpath(os.path.join(item.root, parts[0])) != job_directory:
        raise RefusedPath(f"{item.root / parts[0]} leads out of {item.root}")
    target = os.path.join(job_directory, *parts[1:])
    try:
        info = os.lstat(target)
        if len(parts) == 1 and not stat.S_ISDIR(info.st_mode):
            raise RefusedPath(f"{target} is not a directory")
    except FileNotFoundError:
        return Removed(item, 0, False)
    if not stat.S_ISDIR(info.st_mode):
        size = info.st_size
        if not dry_run:
            _unlink(target)
        return Removed(item, size, not dry_run)
    size = _tree_size_and_open(target, writable=not dry_run)
    if not dry_run:
        # rmtree's fd-based walk on Linux never follows a link: a link inside goes, not its target.
        shutil.rmtree(target, ignore_errors=False, onerror=_gone_is_fine)
    return Removed(item, size, not dry_run)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _gone_is_fine(function: object, path: str, exc_info: object) -> None:
    error = exc_info[1] if isinstance(exc_info, tuple) else None
    if isinstance(error, FileNotFoundError):
        return
    if isinstance(error, BaseException):
        raise error
    raise OSError(f"cannot remove {path}")


def _tree_size_and_open(top: str, *, writable: bool) -> int:
    """The bytes below `top`, links not followed; with `writable`, each directory is made writable by
    its owner, so a read-only copy of a workspace can be removed."""
    total = 0
    for directory, dirs, files in os.walk(top, followlinks=False):
        if writable:
            _make_writable(directory)
        for name in (*dirs, *files):
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                total += info.st_size
    return total


def _make_writable(directory: str) -> None:
    try:
        info = os.lstat(directory)
        if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_IRWXU != stat.S_IRWXU \
                and info.st_uid == os.geteuid():
            os.chmod(directory, stat.S_IMODE(info.st_mode) | stat.S_IRWXU)
    except OSError:
        pass


def remove_all(items: Iterable[Expired], *, dry_run: bool = False) -> tuple[list[Removed], list[str]]:
    """Each expired path removed (or measured); the removals and why any others failed."""
    done: list[Removed] = []
    failed: list[str] = []
    for item in items:
        try:
            done.append(remove(item, dry_run=dry_run))
        except (OSError, RefusedPath) as exc:
            failed.append(f"{item.path}: {exc}")
    return done, failed


def by_job(removed: Iterable[Removed]) -> Mapping[str, list[Removed]]:
    grouped: dict[str, list[Removed]] = {}
    for item in removed:
        grouped.setdefault(item.expired.job_id, []).append(item)
    return grouped


def audit_removals(store: Store, removed: Iterable[Removed], *, actor: str) -> None:
    """One audit entry per job whose files went: what went and how many bytes."""
    for job_id, items in by_job(item for item in removed if item.gone).items():
        store.append_audit(actor=actor, action=AUDIT_ACTION, job_id=job_id, detail={
            "removed": [str(item.expired.path) for item in items],
            "kinds": sorted({item.expired.kind for item in items}),
            "bytes": sum(item.size for item in items)})


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
