"""A job's provenance record: an in-toto Statement v1 whose predicate is SLSA provenance v1 (pure).

docs/provenance.md maps each field to what hpc-runner knows of the run. The record is stored as
its RFC 8785 canonical JSON, so that its bytes, and their digest, are the same wherever it is read.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785

from runner.job.outputs import OutputFile

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:hpc-runner:job:v1"
BUILDER_PREFIX = "urn:hpc-runner:agent:"


@dataclass(frozen=True)
class RunEnd:
    """How the run went, as the agent saw it end."""

    state: str
    exit_status: int | None
    detail: str | None
    slurm_ids: tuple[str, ...]
    node_list: str | None
    queued_at: float
    started_at: float | None
    finished_at: float
    log_sha256: str
    log_size: int
    left_out: tuple[tuple[str, str], ...] = ()


def log_uri(job_id: str) -> str:
    return f"urn:hpc-runner:job:{job_id}:log"


def rfc3339(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_statement(*, job_id: str, agent: str, spec: Mapping[str, Any], trigger: Mapping[str, Any],
                    facts: Mapping[str, Any], decision: Mapping[str, Any], outputs: Sequence[OutputFile],
                    end: RunEnd, replay_of: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The statement of one run. `facts` is what preparation recorded (`facts.RunFacts.to_json`):
    the image, the resolved environment (secrets already replaced), the host MPI and the versions."""
    external: dict[str, Any] = {"job": dict(spec), "trigger": dict(trigger)}
    if replay_of is not None:
        external["replay_of"] = dict(replay_of)
    slurm = decision.get("slurm") or {}
    internal = {
        "environment": dict(facts.get("environment") or {}),
        "grant": decision.get("grant"),
        "account": decision.get("account"),
        "slurm_account": slurm.get("account"),
        "partition": slurm.get("partition"),
        "principals": list(decision.get("principals") or []),
        "executor": facts.get("executor"),
    }
    queue_wait = None if end.started_at is None else round(max(end.started_at - end.queued_at, 0.0), 3)
    run_seconds = None if end.started_at is None else round(max(end.finished_at - end.started_at, 0.0), 3)
    byproducts: list[dict[str, Any]] = [
        {"name": "log", "uri": log_uri(job_id), "digest": {"sha256": end.log_sha256},
         "annotations": {"size": end.log_size}},
        {"name": "run", "uri": f"urn:hpc-runner:job:{job_id}:run",
         "annotations": {"state": end.state, "exit_status": end.exit_status, "detail": end.detail,
                         "slurm_job_ids": list(end.slurm_ids), "nodes": end.node_list,
                         "queue_wait_seconds": queue_wait, "run_seconds": run_seconds}},
    ]
    if end.left_out:
        left_out = [{"path": path, "why": why} for path, why in end.left_out]
        byproducts.append({"name": "outputs-left-out", "uri": f"urn:hpc-runner:job:{job_id}:outputs-left-out",
                           "annotations": {"files": left_out}})
    versions = facts.get("versions") or {}
    subject: list[dict[str, Any]] = [
        {"name": f.path, "digest": {"sha256": f.sha256}, "annotations": {"size": f.size}} for f in outputs]
    if not subject:
        # in-toto requires at least one subject: a run that kept no outputs vouches for its log.
        # Its uri tells it from an output, which never has one.
        subject.append({"name": "log", "uri": log_uri(job_id), "digest": {"sha256": end.log_sha256},
                        "annotations": {"size": end.log_size}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": _dependencies(trigger, facts),
            },
            "runDetails": {
                "builder": {"id": BUILDER_PREFIX + agent,
                            "version": {name: str(value) for name, value in versions.items() if value}},
                "metadata": {"invocationId": job_id, "startedOn": rfc3339(end.started_at or end.queued_at),
                             "finishedOn": rfc3339(end.finished_at)},
                "byproducts": byproducts,
            },
        },
    }


def _dependencies(trigger: Mapping[str, Any], facts: Mapping[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    image = facts.get("image") or {}
    annotations = {key: image[key] for key in ("name", "signer") if image.get(key)}
    found.append({"name": "image", "uri": "file://" + str(image.get("path", "")),
                  **({"digest": {"sha256": image["sha256"]}} if image.get("sha256") else {}),
                  "annotations": annotations})
    commit = trigger.get("commit")
    if commit:
        found.append({"name": "source", **_source_uri(trigger), "digest": {"gitCommit": commit}})
    mpi = facts.get("host_mpi")
    if mpi:
        for library in mpi.get("libraries", []):
            found.append({"name": "host-mpi", "uri": "file://" + library["path"],
                          "digest": {"sha256": library["sha256"]},
                          "annotations": {"family": mpi.get("family"), "version": mpi.get("version")}})
    for tool, version in (facts.get("versions") or {}).items():
        if version:
            found.append({"name": tool, "uri": f"pkg:generic/{tool}@{version}"})
    return found


def _source_uri(trigger: Mapping[str, Any]) -> dict[str, Any]:
    """The source's `uri` when it is known as one (a GitHub repository's, or a URL the trigger
    gives), else its name as an annotation: a repository's bare name is no URI."""
    repository = trigger.get("repository")
    url = trigger.get("repository_url")
    if not url and isinstance(repository, str) and trigger.get("source") == "github":
        url = f"https://github.com/{repository}"
    if isinstance(url, str) and "://" in url:
        return {"uri": f"git+{url}"}
    return {"annotations": {"repository": repository}} if repository else {}


def canonical(statement: Mapping[str, Any]) -> bytes:
    """The statement's stored form: RFC 8785 JSON (sorted keys, no spaces, one number form)."""
    return rfc8785.dumps(statement)


def left_out(statement: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The files a statement says were matched and not collected, each with why."""
    found: list[tuple[str, str]] = []
    byproducts = ((statement.get("predicate") or {}).get("runDetails") or {}).get("byproducts") or []
    for byproduct in byproducts:
        if isinstance(byproduct, dict) and byproduct.get("name") == "outputs-left-out":
            for item in (byproduct.get("annotations") or {}).get("files") or []:
                path, why = (item.get("path"), item.get("why")) if isinstance(item, dict) else (None, None)
                if isinstance(path, str) and isinstance(why, str):
                    found.append((path, why))
    return found


def subjects(statement: Mapping[str, Any]) -> list[OutputFile]:
    """The outputs a statement names, back as OutputFile (a record from any agent version)."""
    files: list[OutputFile] = []
    for subject in statement.get("subject") or []:
        if "uri" in subject:
            continue  # the log of a run that kept no outputs
        digest = (subject.get("digest") or {}).get("sha256")
        if isinstance(subject.get("name"), str) and isinstance(digest, str):
            size = (subject.get("annotations") or {}).get("size")
            files.append(OutputFile(subject["name"], digest, size if isinstance(size, int) else -1))
    return files
