"""The requests `hpc-runner remote` makes of the hub, and what their answers mean, as plain data (no I/O).

Paths and limits are the hub's own (`runner.gateway.jobs_protocol`), so client and hub agree by
construction. Where the token comes from is decided here from the command line and the
environment; fetching it is `runner.remote.ci_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from runner import exitcodes
from runner.gateway import jobs_protocol as protocol
from runner.oidc.binding import bound_audience
from runner.spec import JobSpec, job_from_document
from runner.tomlsource import load_toml

# The hub's configured audience when neither --audience nor this variable names one.
AUDIENCE_ENV = "HPC_RUNNER_AUDIENCE"
DEFAULT_AUDIENCE = "hpc-runner"
HUB_ENV = "HPC_RUNNER_HUB"
# (repository, commit) variables of GitHub Actions, GitLab CI and Buildkite.
_CI_SOURCES = (("GITHUB_REPOSITORY", "GITHUB_SHA"), ("CI_PROJECT_URL", "CI_COMMIT_SHA"),
               ("BUILDKITE_REPO", "BUILDKITE_COMMIT"))
_COMMIT = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class JobFile:
    spec: JobSpec
    table: dict[str, Any]            # the file's [job] table, sent as the `job` object


def load_job_file(path: str | Path) -> JobFile:
    """The job file read by the parser (and with the messages) of `hpc-runner run`; InputError."""
    document = load_toml(path)
    spec = job_from_document(document)
    return JobFile(spec=spec, table=dict(document.data["job"]))


def ci_source(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The repository and commit a CI system says the step runs for, in a form the hub reads (a
    repository's path or https URL, a full commit SHA); (None, None) outside CI. The hub takes
    both from the token where its claims carry them and refuses a body that contradicts them."""
    for repository_key, commit_key in _CI_SOURCES:
        if repository_key in env:
            return _repository(env[repository_key]), _commit(env.get(commit_key))
    return None, None


def _repository(value: str) -> str | None:
    # A Buildkite pipeline may name an ssh remote (git@host:org/repo.git), which the hub does not
    # take: the token's claims or the agent's checkout_url then settle where the source is.
    if value.startswith("https://"):
        parts = urlsplit(value)
        if parts.username is None and parts.password is None and not parts.query and not parts.fragment:
            return value
        return None
    return value if re.fullmatch(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+", value) else None


def _commit(value: str | None) -> str | None:
    return value.lower() if value is not None and _COMMIT.fullmatch(value) else None


def submission_body(job: Mapping[str, Any], *, cluster: str | None, repository: str | None,
                    commit: str | None) -> dict[str, Any]:
    """The body of `POST /api/v1/jobs`: only the fields given."""
    body: dict[str, Any] = {"job": dict(job)}
    for key, value in (("cluster", cluster), ("repository", repository), ("commit", commit)):
        if value is not None:
            body[key] = value
    return body


# --- where the token comes from ---

TokenKind = Literal["file", "env", "github", "buildkite"]


@dataclass(frozen=True)
class TokenSource:
    kind: TokenKind
    where: str                       # the file, the variable, or the URL asked


def token_source(env: Mapping[str, str], *, token_file: str | None,
                 token_env: str | None) -> TokenSource | None:
    """The first of: a token file, a variable holding the token (GitLab's id_tokens), GitHub
    Actions' token endpoint, the Buildkite agent; None where there is none."""
    if token_file is not None:
        return TokenSource("file", token_file)
    if token_env is not None:
        return TokenSource("env", token_env)
    if env.get("ACTIONS_ID_TOKEN_REQUEST_URL") and env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
        return TokenSource("github", env["ACTIONS_ID_TOKEN_REQUEST_URL"])
    if env.get("BUILDKITE"):
        return TokenSource("buildkite", "buildkite-agent")
    return None


NO_TOKEN_SOURCE = ("no token: give --token-file or --token-env, or run inside GitHub Actions (with "
                   "`permissions: id-token: write`) or a Buildkite job")


def requested_audience(configured: str, job: Mapping[str, Any]) -> str:
    """What a CI system is asked to put in `aud`: the hub's audience bound to this one job."""
    return bound_audience(configured, job)


def github_token_url(request_url: str, audience: str) -> str:
    """GitHub Actions' token endpoint, asked for `audience` (the URL already has a query)."""
    joiner = "&" if urlsplit(request_url).query else "?"
    return f"{request_url}{joiner}audience={quote(audience, safe='')}"


def buildkite_command(audience: str) -> list[str]:
    return ["buildkite-agent", "oidc", "request-token", "--audience", audience]


# --- paths ---

def log_path(job_id: str, offset: int, *, follow: bool) -> str:
    return f"{protocol.job_log_path(job_id)}?offset={offset}" + ("&follow=1" if follow else "")


# --- answers ---

def is_ended(view: Mapping[str, Any]) -> bool:
    return view.get("state") in protocol.TERMINAL


def exit_status(view: Mapping[str, Any]) -> int:
    """The exit status of `hpc-runner remote run` for an ended job: as `hpc-runner run`'s."""
    state = str(view.get("state"))
    if state == "denied":
        return exitcodes.DENIED
    status = view.get("exit_status")
    return exitcodes.for_outcome(state, status if isinstance(status, int) else None)


def ending_lines(view: Mapping[str, Any]) -> list[str]:
    """What stderr says of an ended job other than a success: each reason of a denial, or the state."""
    state = view.get("state")
    reasons = [str(reason) for reason in view.get("reasons") or []]
    if state == "succeeded":
        return []
    if state == "denied":
        return [f"denied: {reason}" for reason in reasons] or ["denied"]
    status = view.get("exit_status")
    ended = f"job {view.get('id')} {state}" + (f" (exit status {status})" if status is not None else "")
    return [ended + (f": {'; '.join(reasons)}" if reasons else "")]
