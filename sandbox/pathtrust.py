"""Whether anyone but root and the agent's own account could change what a path names.

Apptainer opens binds and images by path when the job starts, which for a Slurm job is on a
compute node after it waited in the queue. Checking a path before then (its realpath, its digest)
says nothing about that moment if someone else can rename one of its directories and put a link
in its place, or rewrite the file. So a granted bind's directories, and an image with its
directories, must be writable only by root or the agent's account: then what was checked is what
gets mounted.

A sticky directory (such as /tmp or a site's /scratch) lets others create entries but not rename
or remove one they do not own, so it is fine when the next component belongs to root or the agent.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from typing import Literal

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH

# Why others could change what a directory holds: an account outside the trusted ones owns it, or
# its group or everyone may write it.
Exposure = Literal["owner", "writers"]


def _who_writes(info: os.stat_result) -> str:
    writers = []
    if info.st_mode & stat.S_IWGRP:
        writers.append(f"group {info.st_gid}")
    if info.st_mode & stat.S_IWOTH:
        writers.append("everyone")
    return " and ".join(writers)


def exposure(info: os.stat_result, trusted: Collection[int], *, sticky_is_enough: bool) -> Exposure | None:
    """Whether anyone outside `trusted` could change what `info` describes: rewrite a file, or
    rename, remove or add a directory's entries.

    With `sticky_is_enough`, a sticky directory others may write is fine: the caller knows that
    what matters in it belongs to a trusted account, so nobody else can rename or remove it.
    """
    if info.st_uid not in trusted:
        return "owner"
    if info.st_mode & _OTHERS_WRITE and not (sticky_is_enough and info.st_mode & stat.S_ISVTX):
        return "writers"
    return None


def _problem(path: str, info: os.stat_result, trusted: Collection[int], *,
             sticky_is_enough: bool = False) -> str | None:
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    found = exposure(info, trusted, sticky_is_enough=sticky_is_enough)
    if found == "owner":
        return f"{path} belongs to uid {info.st_uid}"
    if found == "writers":
        return f"{path} is writable by {_who_writes(info)}"
    return None


def swappable(path: str, trusted: Collection[int], *, contents: bool = False) -> str | None:
    """Why someone outside `trusted` could change what the absolute, canonical `path` names, or None.

    The directories above `path` are always checked; with `contents`, `path` itself too, and for
    a directory everything below it (an image's bytes must stay the verified ones).
    """
    parts = [part for part in path.split("/") if part]
    current = "/"
    try:
        info = os.lstat(current)
        for index, part in enumerate(parts):
            below = os.path.join(current, part)
            below_info = os.lstat(below)
            problem = _problem(current, info, trusted, sticky_is_enough=below_info.st_uid in trusted)
            if problem:
                return problem
            if index < len(parts) - 1 and stat.S_ISLNK(below_info.st_mode):
                return f"{below} is a symbolic link"
            current, info = below, below_info
        if contents:
            return _contents_problem(current, info, trusted)
    except OSError:
        # Missing or unreadable: whoever opens it next (image verification, Apptainer) says so,
        # as an infrastructure error, not as a refusal of the grant.
        return None
    return None


def _contents_problem(path: str, info: os.stat_result, trusted: Collection[int]) -> str | None:
    problem = _problem(path, info, trusted)
    if problem:
        return problem
    if not stat.S_ISDIR(info.st_mode):
        return None
    for root, dirs, files in os.walk(path, onerror=_raise):
        for name in (*dirs, *files):
            entry = os.path.join(root, name)
            entry_info = os.lstat(entry)
            if stat.S_ISLNK(entry_info.st_mode):
                continue  # a link inside an image resolves inside the container
            problem = _problem(entry, entry_info, trusted)
            if problem:
                return problem
    return None


def _raise(error: OSError) -> None:
    raise error
