"""A repository's jobs: the `[[jobs]]` tables of `.hpc-runner.toml` at the commit under test.

Each `[[jobs]]` entry is a job spec exactly as in a `[job]` file (README, "Job spec"), read by the same
strict parser, so an error names the file, its line and the dotted field
(`.hpc-runner.toml:7: jobs[1].resources.time: ...`). The file is read through the contents API at
the head SHA (never from a checkout: nothing of the commit runs before the policy has decided), and
a file that cannot be read or parsed becomes a failed check run that quotes the error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from runner.errors import InputError
from runner.fields import Table
from runner.spec import JobSpec, parse_job_table
from runner.tomlsource import MAX_FILE_BYTES, parse_toml

JOBS_FILE = ".hpc-runner.toml"
# Each job is a check run and a Slurm job; a file asking for more is more likely a mistake.
MAX_JOBS = 50


def parse_jobs_file(text: str, name: str = JOBS_FILE) -> tuple[JobSpec, ...]:
    """The jobs of a `.hpc-runner.toml`; an InputError names `name`, the line and the field."""
    doc = parse_toml(text, name)
    root = Table(doc, doc.data)
    tables = root.tables("jobs")
    root.finish()
    if not tables:
        raise doc.error("jobs", "no jobs: add at least one [[jobs]] table (name, image, command or script)")
    if len(tables) > MAX_JOBS:
        raise tables[MAX_JOBS].error(None, f"more than {MAX_JOBS} jobs in one file")
    jobs: list[JobSpec] = []
    first: dict[str, str] = {}
    for table in tables:
        spec = parse_job_table(table)
        if spec.name in first:
            raise table.error("name", f"job name {spec.name!r} is already used by {first[spec.name]}: "
                                      "each job is its own check run and needs its own name")
        first[spec.name] = table.path
        jobs.append(spec)
    return tuple(jobs)


def decode_contents(answer: Any, name: str = JOBS_FILE) -> str:
    """The text of a file from `GET /repos/{owner}/{repo}/contents/{path}` (base64, UTF-8)."""
    if not isinstance(answer, Mapping) or answer.get("type") != "file":
        kind = answer.get("type") if isinstance(answer, Mapping) else type(answer).__name__
        raise InputError(f"is a {kind}, not a file", file=name)
    if answer.get("encoding") != "base64" or not isinstance(answer.get("content"), str):
        # GitHub answers "none" for files over 1 MB, which are too large for a jobs file anyway.
        size = answer.get("size")
        raise InputError(f"is too large to read through the API ({size} bytes; at most "
                         f"{MAX_FILE_BYTES} bytes)", file=name)
    try:
        raw = base64.b64decode(answer["content"], validate=False)
    except (binascii.Error, ValueError):
        raise InputError("GitHub sent content that is not base64", file=name) from None
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(f"file is larger than {MAX_FILE_BYTES} bytes", file=name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError("not UTF-8 text", file=name, line=line) from None
