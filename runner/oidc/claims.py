"""A verified token's claims as the policy's identity, by the kind of its issuer. Pure.

Only claims that name things are read (`repository`, `project_path`, `organization_slug`...),
never the layout of `sub`: issuers change that layout (GitHub lets an organisation customise it,
and names new repositories by id there), while the named claims keep their meaning. A claim that
a principal could not spell refuses the token, but for a user's name or a group (a bot such as
`dependabot[bot]`, a group name with spaces): those are left out, so the token holds fewer
principals, never others.

How each CI system's event becomes one of the policy's `events` is in the tables below (and in
the README's "Tokens from CI systems (OIDC)").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from runner.errors import InputError
from runner.identity import BUILDKITE_EVENTS, Identity, Source, fits, identity_from_json
from runner.oidc.errors import TokenRejected
from runner.oidc.issuers import OidcIssuer

# GitHub Actions' `event_name` -> the policy's event. `pull_request_target` runs with the base
# repository's token for pull requests from forks too, so it counts as a pull request from a fork.
GITHUB_EVENTS = {
    "push": "push", "pull_request": "pull_request", "pull_request_target": "pull_request",
    "merge_group": "merge_group", "schedule": "schedule", "workflow_dispatch": "api",
    "repository_dispatch": "api", "workflow_run": "trigger",
}
GITHUB_FORK_EVENTS = frozenset({"pull_request_target"})
# GitLab CI's `pipeline_source` -> the policy's event.
GITLAB_EVENTS = {
    "push": "push", "merge_request_event": "pull_request", "external_pull_request_event": "pull_request",
    "schedule": "schedule", "api": "api", "web": "ui", "trigger": "trigger", "pipeline": "trigger",
    "parent_pipeline": "trigger",
}
# Buildkite's `build_source`: the same as the Buildkite source's BUILDKITE_SOURCE.
BUILDKITE_TOKEN_EVENTS = BUILDKITE_EVENTS
# A token from a site's identity provider is a person (or a workflow engine) calling the API.
GENERIC_EVENT = "api"

_MAX_CLAIM = 256


class _Claims:
    """Reading one token's claims; `fields` maps each identity field to the claim it came from."""

    def __init__(self, issuer: OidcIssuer, source: Source, claims: Mapping[str, Any]) -> None:
        self.issuer = issuer
        self.source = source
        self.claims = claims
        self.fields: dict[str, str] = {}

    def required(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise TokenRejected(f"the token has no {name} claim, which a {self.issuer.kind} token carries")
        return value

    def text(self, name: str) -> str | None:
        """The claim's string value; None when absent or empty."""
        value = self.claims.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise TokenRejected(f"claim {name} must be a string, got {type(value).__name__}")
        if len(value) > _MAX_CLAIM:
            raise TokenRejected(f"claim {name} is longer than {_MAX_CLAIM} characters")
        return value

    def event(self, name: str, events: Mapping[str, str]) -> str | None:
        """The policy's event for the claim's value; an event not in `events` keeps its own name,
        which only grants that list no `events` cover."""
        value = self.text(name)
        return None if value is None else events.get(value, value)

    def commit(self, name: str) -> str | None:
        """A full commit id, lower case; None for anything else (Buildkite may say `HEAD`)."""
        value = self.text(name)
        if value is None:
            return None
        value = value.lower()
        return value if fits(self.source, "commit", value) else None

    def name_or_none(self, field: str, claim: str) -> str | None:
        """A user's name, left out when a principal could not spell it."""
        value = self.text(claim)
        return value if value is not None and fits(self.source, field, value) else None


def identity_from_claims(issuer: OidcIssuer, claims: Mapping[str, Any]) -> Identity:
    """The identity a token from `issuer` with these (verified) claims stands for.

    Raises TokenRejected when a claim the identity needs is missing or malformed, or when a
    Buildkite token is of another organisation than the pinned one.
    """
    reader = _Claims(issuer, _SOURCES[issuer.kind], claims)
    data = _READERS[issuer.kind](reader)
    try:
        return identity_from_json(data, f"token of {issuer.name}")
    except InputError as exc:
        claim = reader.fields.get(exc.field or "", exc.field)
        raise TokenRejected(f"claim {claim}: {exc.detail}") from None


def _github(read: _Claims) -> dict[str, Any]:
    repository = read.required("repository")
    owner = read.required("repository_owner")
    if repository.partition("/")[0].lower() != owner.lower():
        raise TokenRejected(f"claims repository {repository!r} and repository_owner {owner!r} disagree")
    event_name = read.text("event_name")
    read.fields.update(repository="repository", actor="actor", event="event_name", ref="ref", commit="sha")
    return _without_none({
        "source": "github", "repository": repository, "actor": read.name_or_none("actor", "actor"),
        "event": read.event("event_name", GITHUB_EVENTS), "ref": read.text("ref"),
        "commit": read.commit("sha"),
        "fork": event_name in GITHUB_FORK_EVENTS,
    })


def _buildkite(read: _Claims) -> dict[str, Any]:
    organization = read.required("organization_slug")
    if organization != read.issuer.organization:
        raise TokenRejected(f"organization {organization} is not the pinned {read.issuer.organization}")
    branch = read.text("build_branch")
    tag = read.text("build_tag")
    read.fields.update(organization="organization_slug", pipeline="pipeline_slug", branch="build_branch",
                       ref="build_tag", event="build_source", commit="build_commit")
    return _without_none({
        "source": "buildkite", "organization": organization,
        "pipeline": read.required("pipeline_slug"), "branch": branch,
        # A tag build's ref is the tag's, as for the Buildkite source.
        "ref": f"refs/tags/{tag}" if tag else None,
        "event": read.event("build_source", BUILDKITE_TOKEN_EVENTS), "commit": read.commit("build_commit"),
        # Buildkite names a branch of a fork OWNER:BRANCH; the token says nothing else of forks.
        "fork": branch is not None and ":" in branch,
    })


def _gitlab(read: _Claims) -> dict[str, Any]:
    project = read.required("project_path")
    namespace = read.required("namespace_path")
    if project.rpartition("/")[0] != namespace:
        raise TokenRejected(f"claims project_path {project!r} and namespace_path {namespace!r} disagree")
    read.fields.update(project="project_path", actor="user_login", event="pipeline_source",
                       ref="ref_path", commit="sha", ref_protected="ref_protected")
    return _without_none({
        "source": "gitlab", "project": project,
        "actor": read.name_or_none("actor", "user_login"),
        "event": read.event("pipeline_source", GITLAB_EVENTS), "ref": _gitlab_ref(read),
        "commit": read.commit("sha"), "ref_protected": _flag(read, "ref_protected"), "fork": False,
    })


def _gitlab_ref(read: _Claims) -> str | None:
    path = read.text("ref_path")
    if path is not None:
        return path
    ref, ref_type = read.text("ref"), read.text("ref_type")
    prefix = {"branch": "refs/heads/", "tag": "refs/tags/"}.get(ref_type or "")
    return f"{prefix}{ref}" if ref is not None and prefix is not None else None


def _flag(read: _Claims, name: str) -> bool | None:
    """GitLab writes its booleans as the strings "true" and "false"."""
    value = read.claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise TokenRejected(f"claim {name} must be true or false, got {str(value)[:40]!r}")


def _generic(read: _Claims) -> dict[str, Any]:
    names = read.issuer.username_claims
    claim = next((name for name in names if read.text(name) is not None), None)
    if claim is None:
        raise TokenRejected(f"the token has none of the claims {', '.join(names)}, which name its user")
    read.fields.update(user=claim, groups=read.issuer.groups_claim)
    return {"source": "idp", "user": read.text(claim), "groups": _groups(read), "event": GENERIC_EVENT}


def _groups(read: _Claims) -> list[str]:
    name = read.issuer.groups_claim
    value = read.claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TokenRejected(f"claim {name} must be a list of strings")
    kept = [group for group in value if fits("idp", "groups", group)]
    return list(dict.fromkeys(kept))


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


_SOURCES: dict[str, Source] = {"github": "github", "buildkite": "buildkite", "gitlab": "gitlab",
                               "generic": "idp"}
_READERS: dict[str, Callable[[_Claims], dict[str, Any]]] = {
    "github": _github, "buildkite": _buildkite, "gitlab": _gitlab, "generic": _generic,
}
