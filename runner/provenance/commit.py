"""The commit a workspace is checked out at, read from its `.git` files without running git: the
workspace is the job's and its submitter's, and git would obey its config (hooks, fsmonitor)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from runner.provenance.outputs import open_under

_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_REF = re.compile(r"refs/[A-Za-z0-9._/-]{1,200}")
MAX_READ = 1024 * 1024


def _read(top: int, relative: str) -> str | None:
    try:
        fd = open_under(top, relative)
    except OSError:
        return None
    try:
        return os.read(fd, MAX_READ).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def head_commit(workspace: Path) -> str | None:
    """The commit HEAD names (a detached HEAD, a loose ref or a packed one); None when the workspace
    is no git checkout or its HEAD cannot be read."""
    try:
        top = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = (_read(top, ".git/HEAD") or "").strip()
        if _COMMIT.fullmatch(head):
            return head
        if not head.startswith("ref: "):
            return None
        ref = head[5:].strip()
        if not _REF.fullmatch(ref) or ".." in ref:
            return None
        loose = (_read(top, f".git/{ref}") or "").strip()
        if _COMMIT.fullmatch(loose):
            return loose
        for line in (_read(top, ".git/packed-refs") or "").splitlines():
            commit, _, name = line.partition(" ")
            if name == ref and _COMMIT.fullmatch(commit):
                return commit
        return None
    finally:
        os.close(top)
