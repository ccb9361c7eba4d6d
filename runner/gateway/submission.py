"""What to do with one submission to `POST /api/v1/jobs`, decided without I/O.

The body is read as strictly as a job file: JSON with no duplicate keys (two readers must never
see two different jobs in one body), no `NaN`, no lone surrogates, nested at most
`MAX_JSON_NESTING` levels; only the fields of `SUBMISSION_FIELDS`; and a `job` object that the
job spec's own parser accepts, so a submission is refused with the messages `hpc-runner policy
explain --job` gives for the same job in a file (`request body: job.resources.nodes: ...`).

Where the token names a repository or a commit, those are the job's: a body may repeat them,
never contradict them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from runner.errors import InputError
from runner.gateway.jobs_protocol import (
    CLUSTER_PATTERN,
    MAX_JSON_NESTING,
    MAX_SUBMISSION_BYTES,
    SUBMISSION_FIELDS,
    unknown_fields,
)
from runner.gateway.refusal import Refusal
from runner.spec import JobSpec, parse_job_mapping

BODY_NAME = "request body"
_SURROGATE = re.compile("[\ud800-\udfff]")
_COMMIT = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")
_REPOSITORY_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(?:/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}){1,8}")
MAX_REPOSITORY_CHARS = 512


@dataclass(frozen=True)
class Submission:
    job: dict[str, Any]             # the `job` object exactly as received
    spec: JobSpec
    cluster: str | None
    repository: str | None
    commit: str | None


def too_large(size: int | None = None) -> Refusal:
    got = f" ({size} bytes)" if size is not None else ""
    return Refusal(413, f"the body is larger than {MAX_SUBMISSION_BYTES} bytes{got}")


def decode_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a Refusal (400, 413) saying why not."""
    if len(body) > MAX_SUBMISSION_BYTES:
        raise too_large(len(body))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "the body is not UTF-8 text") from None
    try:
        data = json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise Refusal(400, f"the body is not JSON this hub reads: nested deeper than {MAX_JSON_NESTING} "
                           "levels") from None
    except _Duplicate as exc:
        raise Refusal(400, f"the body has the key {exc.key!r} twice in one object", exc.key) from None
    except ValueError as exc:   # JSONDecodeError; int() refusing thousands of digits; NaN
        raise Refusal(400, f"the body is not JSON: {exc}") from None
    problem = _shape_problem(data)
    if problem is not None:
        raise Refusal(400, problem)
    if not isinstance(data, dict):
        raise Refusal(400, "the body must be a JSON object ({\"job\": {...}})")
    return data


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Duplicate(key[:80])
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _shape_problem(data: object) -> str | None:
    """Too deep, or text that is no Unicode; walked with an explicit stack (never recursing)."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "the body holds a lone surrogate (\\ud800-\\udfff), which is no Unicode text"
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_NESTING:
                return f"the body is nested deeper than {MAX_JSON_NESTING} levels"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return None


def read_submission(data: Mapping[str, Any]) -> Submission:
    """The submission a decoded body asks for, or a Refusal (400) naming the field at fault."""
    unknown = unknown_fields(data, SUBMISSION_FIELDS)
    if unknown:
        raise Refusal(400, f"unknown field(s) {', '.join(map(repr, unknown))} "
                           f"(known: {', '.join(SUBMISSION_FIELDS)})", unknown[0])
    if "job" not in data:
        raise Refusal(400, "job: is required (the [job] table as a JSON object)", "job")
    job = data["job"]
    if not isinstance(job, dict):
        raise Refusal(400, "job: must be a JSON object (the [job] table)", "job")
    try:
        spec = parse_job_mapping(job, BODY_NAME)
    except InputError as exc:
        raise Refusal(400, str(exc), exc.field) from None
    cluster = data.get("cluster")
    if cluster is not None and (not isinstance(cluster, str) or not CLUSTER_PATTERN.fullmatch(cluster)):
        raise Refusal(400, "cluster: must be a cluster name (letters, digits, '.', '_', '-'; at most 64)",
                      "cluster")
    return Submission(job=job, spec=spec, cluster=cluster, repository=_repository(data.get("repository")),
                      commit=_commit(data.get("commit")))


def _repository(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REPOSITORY_CHARS or not (
            _REPOSITORY_PATH.fullmatch(value) or _is_https_url(value)):
        raise Refusal(400, "repository: must be a repository's https:// URL or its path (\"OWNER/NAME\")",
                      "repository")
    return value


def _is_https_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return (parts.scheme == "https" and bool(parts.hostname) and parts.username is None
            and parts.password is None and not parts.query and not parts.fragment
            and not any(ch.isspace() or ord(ch) < 0x20 for ch in text))


def _commit(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _COMMIT.fullmatch(value):
        raise Refusal(400, "commit: must be a full commit SHA (40 or 64 hexadecimal digits)", "commit")
    return value.lower()


def repository_path(text: str) -> str:
    """A repository's path, from its path or its URL: `https://github.com/O/R.git` -> `O/R`."""
    if not _is_https_url(text):
        return text
    path = urlsplit(text).path.strip("/")
    return path.removesuffix(".git")


def settle_source(submission: Submission, *, token_repository: str | None,
                  token_commit: str | None) -> tuple[str | None, str | None]:
    """The job's repository and commit: the token's where it names them (a body contradicting them
    is refused, 400), else the body's."""
    repository, commit = submission.repository, submission.commit
    if token_repository is not None:
        if repository is not None and repository_path(repository).lower() != token_repository.lower():
            raise Refusal(400, f"repository: {repository!r} contradicts the token, which was issued for "
                               f"{token_repository!r}", "repository")
        repository = token_repository
    if token_commit is not None:
        if commit is not None and commit != token_commit.lower():
            raise Refusal(400, f"commit: {commit} contradicts the token, which was issued for "
                               f"commit {token_commit}", "commit")
        commit = token_commit.lower()
    return repository, commit

