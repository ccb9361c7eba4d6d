"""A leased API job as the agent runs it: the job spec, the identity, the repository and commit. Pure.

The job object is read exactly as the hub read it when it was submitted, with the same parser and
messages as a job file (`hpc-runner policy explain --job`): `request body: job.resources.nodes:
...`. The identity is the one the token proved (`confirm`), never anything the hub says. Where the
token names a repository (GitHub's `repository`, GitLab's `project_path`) or a commit, those are the
job's, and a lease that says otherwise is refused; where it names none, the submitter's are taken,
as the hub took them. A repository needs a commit: what runs is always one known commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.errors import InputError
from runner.gateway.jobs_protocol import JobLease
from runner.gateway.refusal import Refusal as HubRefusal
from runner.gateway.submission import BODY_NAME, read_submission, settle_source
from runner.identity import Identity
from runner.sources.refusal import Refusal
from runner.spec import JobSpec, parse_job_mapping

SOURCE = "api"


class JobRefused(Refusal):
    """The job cannot run as leased (its job object, cluster, repository or commit)."""


@dataclass(frozen=True)
class Translated:
    spec: JobSpec
    identity: Identity
    repository: str | None          # a path ("OWNER/NAME") or an https:// URL; None: no checkout
    commit: str | None


def translate(lease: JobLease, identity: Identity, *, cluster: str) -> Translated:
    """The job of `lease` as submitted by `identity` (verified), for this agent's `cluster`."""
    if lease.cluster is not None and lease.cluster != cluster:
        raise JobRefused(f"the job is for cluster {lease.cluster}, and this agent serves cluster {cluster}")
    try:
        submission = read_submission({"job": lease.job, "cluster": lease.cluster,
                                      "repository": lease.repository, "commit": lease.commit})
        repository, commit = settle_source(submission,
                                           token_repository=identity.repository or identity.project,
                                           token_commit=identity.commit)
    except HubRefusal as refusal:
        raise JobRefused(refusal.message) from None
    if repository is not None and commit is None:
        raise JobRefused(f"the job names repository {repository} but no commit to check out: give \"commit\" "
                         "in the request, or submit with a token that names one")
    return Translated(submission.spec, identity, repository, commit)


def job_spec(job: Mapping[str, Any]) -> JobSpec:
    """The spec of a job object this agent took before (read again after a restart)."""
    try:
        return parse_job_mapping(job, BODY_NAME)
    except InputError as exc:
        raise JobRefused(str(exc)) from None
