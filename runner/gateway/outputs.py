"""What the hub keeps of a job's end beside its state and log: its provenance record and the files
the record names as its outputs.

The record (an in-toto Statement whose `subject`s are the job's collected outputs: path, sha256,
size) comes from the job's agent as bytes and is kept as bytes in the job store, once. Each output
file comes after it, one request each, streamed to a file of its own: the hub takes only a file
the record names, of exactly the size and sha256 the record gives it. The files live under the
hub's state_dir, `outputs/<job id>/<sha256>` (directories 0700, files 0600): a file's name is its
digest, never a path from a request, so nothing a job named can lead the hub out of its
directory. Nothing removes them but an administrator.

Paths are judged here (pure) and files written here (blocking I/O: call from a thread).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from runner.job import JOB_ID_PATTERN
from runner.sqlitefile import StoreError

# A record larger than this is refused (a job's record names its spec, its outputs and its
# libraries: a few kilobytes, a few megabytes with thousands of outputs).
MAX_RECORD_BYTES = 8 * 1024 * 1024
# The outputs one record may name, and how long a path may be (the agent collects at most 10 000).
MAX_OUTPUTS = 10_000
MAX_PATH_CHARS = 1024
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
OUTPUTS_DIRNAME = "outputs"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600


class OutputRefused(ValueError):
    """A record or an output file the hub does not take; the message says what was wrong."""


@dataclass(frozen=True)
class RecordedOutput:
    """One output a record names: its path under the job's /work, sha256 and size."""

    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


def check_output_path(path: str) -> str:
    """`path` if it is a relative path of plain names (no `..`, `.`, empty part, absolute path,
    backslash or control character); OutputRefused naming what is wrong otherwise."""
    shown = path[:120]
    if not path or len(path) > MAX_PATH_CHARS:
        raise OutputRefused(f"output path {shown!r}: from 1 to {MAX_PATH_CHARS} characters")
    if path.startswith("/"):
        raise OutputRefused(f"output path {shown!r} is absolute: outputs are named relative to /work")
    if any(ord(char) < 0x20 or char in "\\\x7f" for char in path):
        raise OutputRefused(f"output path {shown!r} holds a control character or a backslash")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise OutputRefused(f"output path {shown!r} has a {part or 'empty'!r} part: only plain names "
                                "are allowed")
    return path


def parse_record(data: bytes) -> tuple[RecordedOutput, ...]:
    """The outputs a provenance record names (its `subject`s); OutputRefused when the bytes are not
    an in-toto Statement v1 whose subjects each have a safe path, a sha256 and a size."""
    if len(data) > MAX_RECORD_BYTES:
        raise OutputRefused(f"the record is larger than {MAX_RECORD_BYTES} bytes ({len(data)} bytes)")
    try:
        statement = json.loads(data)
    except (ValueError, RecursionError):
        raise OutputRefused("the record is not JSON") from None
    if not isinstance(statement, Mapping) or statement.get("_type") != STATEMENT_TYPE:
        raise OutputRefused(f"the record is not an in-toto Statement (its _type must be {STATEMENT_TYPE})")
    subjects = statement.get("subject", [])
    if not isinstance(subjects, list):
        raise OutputRefused("the record's subject is not a list")
    if len(subjects) > MAX_OUTPUTS:
        raise OutputRefused(f"the record names {len(subjects)} outputs, more than {MAX_OUTPUTS}")
    found: dict[str, RecordedOutput] = {}
    for index, subject in enumerate(subjects):
        where = f"subject[{index}]"
        if not isinstance(subject, Mapping) or not isinstance(subject.get("name"), str):
            raise OutputRefused(f"{where} has no name")
        if "uri" in subject:
            continue        # the log, which a record without outputs vouches for: no output file
        path = check_output_path(subject["name"])
        digest = subject.get("digest")
        sha256 = digest.get("sha256") if isinstance(digest, Mapping) else None
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise OutputRefused(f"{where} ({path}) has no sha256 digest of 64 lowercase hex digits")
        annotations = subject.get("annotations")
        size = annotations.get("size") if isinstance(annotations, Mapping) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OutputRefused(f"{where} ({path}) has no size")
        if path in found:
            raise OutputRefused(f"{where} names {path} a second time")
        found[path] = RecordedOutput(path, sha256, size)
    return tuple(found.values())


def find_output(outputs: Sequence[RecordedOutput], path: str) -> RecordedOutput | None:
    return next((output for output in outputs if output.path == path), None)


class OutputFiles:
    """The output files under `<state_dir>/outputs` (see the module's text); blocking calls."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / OUTPUTS_DIRNAME

    def _job_dir(self, job_id: str, *, create: bool) -> Path:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise OutputRefused(f"not a job id: {job_id[:80]!r}")
        directory = self.root / job_id
        if create:
            for path in (self.root, directory):
                _private_directory(path)
        return directory

    def has(self, job_id: str, sha256: str) -> bool:
        try:
            info = os.lstat(self._job_dir(job_id, create=False) / sha256)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(info.st_mode)

    def receive(self, job_id: str, expected: RecordedOutput) -> Incoming:
        """A file being received for `expected`: write its bytes, then `finish` (or `discard`)."""
        directory = self._job_dir(job_id, create=True)
        temporary = directory / f".incoming-{secrets.token_hex(8)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     _FILE_MODE)
        return Incoming(fd, temporary, directory / expected.sha256, expected)

    def open(self, job_id: str, sha256: str) -> BinaryIO:
        """The stored file of that digest (FileNotFoundError when there is none), never through a link."""
        if not _SHA256.fullmatch(sha256):
            raise FileNotFoundError(sha256)
        path = self._job_dir(job_id, create=False) / sha256
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return os.fdopen(fd, "rb")


class Incoming:
    """One output file on its way to disk, checked as it comes against what the record says."""

    def __init__(self, fd: int, temporary: Path, final: Path, expected: RecordedOutput) -> None:
        self._fd = fd
        self._temporary = temporary
        self._final = final
        self.expected = expected
        self.size = 0
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        """Append `data`; OutputRefused (and the file dropped) past the size the record gives."""
        if self.size + len(data) > self.expected.size:
            self.discard()
            raise OutputRefused(f"output {self.expected.path} is larger than the {self.expected.size} bytes "
                                "its record says")
        self._digest.update(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def finish(self) -> None:
        """Keep the file if it is what the record says (OutputRefused naming the difference if not)."""
        sha256 = self._digest.hexdigest()
        if self.size != self.expected.size or sha256 != self.expected.sha256:
            self.discard()
            what = (f"{self.size} bytes, its record says {self.expected.size}"
                    if self.size != self.expected.size else
                    f"sha256 {sha256}, its record says {self.expected.sha256}")
            raise OutputRefused(f"output {self.expected.path} differs from its record: {what}")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self._temporary, self._final)
        directory = os.open(self._final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temporary)


def _private_directory(path: Path) -> None:
    """`path` a directory of this user's, 0700, and no link (made if missing)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, _DIRECTORY_MODE)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise StoreError(f"{path} is not a directory of the hub's own: outputs are not kept there")
    if stat.S_IMODE(info.st_mode) != _DIRECTORY_MODE:
        os.chmod(path, _DIRECTORY_MODE)
