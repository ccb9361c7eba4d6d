"""Bind-mount requests (`SRC[:DST[:ro|rw]]`) and the paths no bind may touch."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

# Mounting over or from these would hand the job the host itself.
FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
# Inside the sandbox these are the runner's: the workspace and Apptainer's own metadata.
RESERVED_TARGETS = ("/work", "/.hpc-runner", "/.singularity.d", "/.apptainer.d", "/opt/hpc-runner")


def is_within(path: str, root: str) -> bool:
    """True when `path` is `root` or below it (both normalised absolute paths)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_absolute_path(path: str, what: str) -> str:
    """Refuse relative paths, `..`, and odd characters; return the normalised path."""
    if not path.startswith("/"):
        raise ValueError(f"{what} {path!r} must be an absolute path")
    if any(part == ".." for part in path.split("/")):
        raise ValueError(f"{what} {path!r} must not contain '..'")
    if any(ch in ":," or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise ValueError(f"{what} {path!r} must not contain ':', ',' or control characters")
    # POSIX lets normpath keep exactly two leading slashes ("//proc"), which the kernel
    # reads as "/proc": collapse them so that no check below can be stepped around.
    return posixpath.normpath("/" + path.lstrip("/"))


@dataclass(frozen=True, order=True)
class Bind:
    source: str
    target: str
    mode: Literal["ro", "rw"] = "rw"

    def __str__(self) -> str:
        return f"{self.source}:{self.target}:{self.mode}"

    def covered_by(self, granted: Bind) -> bool:
        """A granted bind covers the same paths with the same or a wider mode."""
        return (self.source == granted.source and self.target == granted.target
                and (granted.mode == "rw" or self.mode == "ro"))


def parse_bind(text: str) -> Bind:
    """Parse `SRC[:DST[:ro|rw]]` as Apptainer reads it; DST defaults to SRC, mode to rw."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise ValueError(f"{text!r} is not a bind (use \"/host/path:/container/path:ro\")")
    source = check_absolute_path(parts[0], "bind source")
    target = check_absolute_path(parts[1] if len(parts) > 1 and parts[1] else parts[0], "bind target")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise ValueError(f"bind {text!r}: mode must be 'ro' or 'rw', got {mode!r}")
    for path, side in ((source, "source"), (target, "target")):
        if path == "/":
            raise ValueError(f"bind {text!r}: the {side} must not be '/'")
        for root in FORBIDDEN_ROOTS:
            if is_within(path, root):
                raise ValueError(f"bind {text!r}: the {side} must not be {root} or below it")
    for reserved in RESERVED_TARGETS:
        if is_within(target, reserved):
            raise ValueError(f"bind {text!r}: the target {reserved} is reserved for the runner")
    return Bind(source, target, "ro" if mode == "ro" else "rw")
