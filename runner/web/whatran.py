"""What a job's page says of what ran, read from its provenance record (pure; no I/O).

The record is data from the job's agent: every value is taken only if it has the expected type,
and a record of another shape gives a panel with less in it, never an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.web.board import OutputEntry

GITHUB_WEB_URL = "https://github.com"
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_REPOSITORY = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")


@dataclass(frozen=True)
class WhatRan:
    """The panel's facts; None where the record does not say."""

    invocation: str | None          # the agent's own job id (what `hpc-runner replay` takes)
    image: str | None               # its path on the cluster
    image_sha256: str | None
    repository: str | None
    commit: str | None
    commit_url: str | None
    grant: str | None
    account: str | None
    slurm_job_ids: tuple[str, ...]
    nodes: str | None
    queue_wait_seconds: float | None
    run_seconds: float | None
    outputs: tuple[OutputEntry, ...]
    left_out: tuple[tuple[str, str], ...]       # (path, why)
    replay_of: str | None           # the job this one replays
    replay_of_sha256: str | None    # the sha256 of that job's record
    sha256: str                     # of the record's bytes


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _named(items: Any, name: str) -> Mapping[str, Any]:
    if isinstance(items, list):
        for item in items:
            if isinstance(item, Mapping) and item.get("name") == name:
                return item
    return {}


def commit_link(source: str | None, repository: str | None, commit: str | None) -> str | None:
    """The commit's page, for a job whose repository is on GitHub (its GitHub source says so)."""
    if source != "github" or repository is None or commit is None:
        return None
    if not _REPOSITORY.fullmatch(repository) or not _COMMIT.fullmatch(commit):
        return None
    return f"{GITHUB_WEB_URL}/{repository}/commit/{commit}"


def what_ran(record: bytes, sha256: str, outputs: Sequence[OutputEntry]) -> WhatRan | None:
    """The panel of a record (None when the bytes are no JSON object); `outputs` as the job's
    holder has them (each with whether its file can be downloaded)."""
    try:
        statement = json.loads(record)
    except (ValueError, RecursionError):
        return None
    if not isinstance(statement, Mapping):
        return None
    build = _get(statement, "predicate", "buildDefinition")
    external = _get(build, "externalParameters")
    internal = _get(build, "internalParameters")
    trigger = _get(external, "trigger")
    details = _get(statement, "predicate", "runDetails")
    image = _named(_get(build, "resolvedDependencies"), "image")
    uri = _text(image.get("uri"))
    byproducts = _get(details, "byproducts")
    run = _get(_named(byproducts, "run"), "annotations")
    left = _get(_named(byproducts, "outputs-left-out"), "annotations", "files")
    slurm_ids = _get(run, "slurm_job_ids")
    repository, commit = _text(_get(trigger, "repository")), _text(_get(trigger, "commit"))
    replay = _get(external, "replay_of")
    return WhatRan(
        invocation=_text(_get(details, "metadata", "invocationId")),
        image=uri.removeprefix("file://") if uri else None,
        image_sha256=_text(_get(image, "digest", "sha256")),
        repository=repository, commit=commit,
        commit_url=commit_link(_text(_get(trigger, "source")), repository, commit),
        grant=_text(_get(internal, "grant")), account=_text(_get(internal, "account")),
        slurm_job_ids=tuple(str(i) for i in slurm_ids if isinstance(i, (str, int)))
        if isinstance(slurm_ids, list) else (),
        nodes=_text(_get(run, "nodes")),
        queue_wait_seconds=_number(_get(run, "queue_wait_seconds")),
        run_seconds=_number(_get(run, "run_seconds")),
        outputs=tuple(outputs),
        left_out=tuple((str(item.get("path")), str(item.get("why"))) for item in left
                       if isinstance(item, Mapping)) if isinstance(left, list) else (),
        replay_of=_text(_get(replay, "job_id")), replay_of_sha256=_text(_get(replay, "provenance_sha256")),
        sha256=sha256)
