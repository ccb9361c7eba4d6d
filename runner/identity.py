"""Who asks for a job, as the policy sees it, and the principals that identity holds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runner.errors import InputError
from runner.fields import MAX_LIST
from runner.principals import GITLAB_PATH, GITLAB_SEGMENT, LOCAL_NAME
from runner.tomlsource import read_text_limited

# "gitlab" and "idp" (a site's identity provider) come from the OIDC ID tokens of the REST API;
# "github" and "buildkite" from those too, or from the CI sources.
Source = Literal["github", "buildkite", "local", "gitlab", "idp"]

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_NAME = re.compile(_SEGMENT)
_SLASHED = re.compile(f"{_SEGMENT}/{_SEGMENT}")
_LOCAL_NAME = re.compile(LOCAL_NAME)
_REF = re.compile(r"refs/[A-Za-z0-9._/+-]{1,250}")
# The name of a user of GitHub or GitLab, or of an identity provider's user or group (an email
# address included), as principals spell them.
_PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,99}")
_GITLAB_NAME = re.compile(GITLAB_SEGMENT)
# A project is a group's path and a name in it.
_GITLAB_PROJECT = re.compile(f"{GITLAB_PATH}/{GITLAB_SEGMENT}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

# Buildkite's build sources (BUILDKITE_SOURCE, a token's `build_source`) and the policy event each
# stands for.
BUILDKITE_EVENTS = {"webhook": "push", "api": "api", "ui": "ui", "schedule": "schedule",
                    "trigger_job": "trigger"}

# What a Buildkite identity's fields may come from a step signature for (a grant's
# `signed_fields`): the pipeline (organisation and pipeline slugs), the ref (branch, tag or pull
# request), the commit, the event, the pull request (number and fork status) and the creator's
# teams. Buildkite itself asserts each of them in the job's env; a pipeline signs one by signing
# the env variables it comes from.
SIGNABLE_FIELDS = ("pipeline", "ref", "commit", "event", "pull_request", "teams")


@dataclass(frozen=True)
class Identity:
    """A verified identity: nothing here is ever taken from a caller's word by the agent."""

    source: Source
    # github; gitlab's user is its actor too
    repository: str | None = None
    actor: str | None = None
    # gitlab: the project's full path (GROUP/.../NAME) and whether its ref is protected
    project: str | None = None
    ref_protected: bool | None = None
    # buildkite
    organization: str | None = None
    pipeline: str | None = None
    branch: str | None = None
    creator: str | None = None
    signer: str | None = None
    # local and idp
    user: str | None = None
    groups: tuple[str, ...] = ()
    # shared
    teams: tuple[str, ...] = ()
    event: str | None = None
    ref: str | None = None
    commit: str | None = None
    fork: bool = False
    # buildkite: the SIGNABLE_FIELDS whose values the step's verified signature covers
    signed: tuple[str, ...] = ()

    def principals(self) -> tuple[str, ...]:
        """Every typed principal this identity holds, e.g. `github:team:CliMA/core`."""
        found: list[str] = []
        if self.source == "github":
            if self.repository:
                owner = self.repository.split("/", 1)[0]
                found += [f"github:org:{owner}", f"github:repo:{self.repository}"]
            if self.actor:
                found.append(f"github:user:{self.actor}")
            found += [f"github:team:{team}" for team in self.teams]
        elif self.source == "buildkite":
            if self.organization:
                found.append(f"buildkite:org:{self.organization}")
                if self.pipeline:
                    found.append(f"buildkite:pipeline:{self.organization}/{self.pipeline}")
                found += [f"buildkite:team:{self.organization}/{team}" for team in self.teams]
        elif self.source == "gitlab":
            if self.project:
                # The project's group and every group above it: GitLab's own members of a group
                # are members of the groups inside it.
                parts = self.project.split("/")[:-1]
                found += [f"gitlab:group:{'/'.join(parts[:depth])}" for depth in range(1, len(parts) + 1)]
                found.append(f"gitlab:project:{self.project}")
            if self.actor:
                found.append(f"gitlab:user:{self.actor}")
        else:
            if self.user:
                found.append(f"{self.source}:user:{self.user}")
            found += [f"{self.source}:group:{group}" for group in self.groups]
        return tuple(found)

    @property
    def effective_event(self) -> str:
        """The event a grant's `events` is matched against."""
        if self.event:
            return self.event
        return {"local": "local", "buildkite": "push", "github": "push", "gitlab": "push",
                "idp": "api"}[self.source]

    @property
    def effective_ref(self) -> str | None:
        """The git ref a grant's `refs` is matched against (Buildkite names a branch)."""
        if self.ref:
            return self.ref
        if self.branch:
            return f"refs/heads/{self.branch}"
        return None

    @property
    def actor_principal(self) -> str:
        """The one principal that best names who asked, for the audit log."""
        principals = self.principals()
        if self.source == "github" and self.actor:
            return f"github:user:{self.actor}"
        if self.source == "buildkite" and self.organization and self.pipeline:
            return f"buildkite:pipeline:{self.organization}/{self.pipeline}"
        if self.source == "gitlab" and self.actor:
            return f"gitlab:user:{self.actor}"
        if self.source in ("local", "idp") and self.user:
            return f"{self.source}:user:{self.user}"
        return principals[0] if principals else f"{self.source}:unknown"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source}
        for key in ("repository", "actor", "project", "organization", "pipeline", "branch", "creator",
                    "signer", "user", "event", "ref", "commit", "ref_protected"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.groups:
            data["groups"] = list(self.groups)
        if self.teams:
            data["teams"] = list(self.teams)
        if self.source in _FORKABLE:
            data["fork"] = self.fork
        if self.signed:
            data["signed"] = list(self.signed)
        return data


_FIELDS: dict[str, dict[str, re.Pattern[str] | None]] = {
    "github": {"repository": _SLASHED, "actor": _NAME, "event": _NAME, "ref": _REF, "commit": _COMMIT},
    "buildkite": {"organization": _NAME, "pipeline": _NAME, "branch": None, "creator": None,
                  "signer": None, "event": _NAME, "ref": _REF, "commit": _COMMIT},
    "gitlab": {"project": _GITLAB_PROJECT, "actor": _GITLAB_NAME, "event": _NAME, "ref": _REF,
               "commit": _COMMIT},
    "idp": {"user": _PRINCIPAL_NAME, "event": _NAME},
    "local": {"user": _LOCAL_NAME, "event": _NAME},
}
_REQUIRED = {"github": ("repository",), "buildkite": ("organization", "pipeline"), "gitlab": ("project",),
             "idp": ("user",), "local": ("user",)}
# Sources whose jobs may come from a fork, and the list each names its user's groups or teams by,
# with the shape of an item (a pattern, and in words).
_FORKABLE = ("github", "buildkite", "gitlab")
_MEMBERSHIPS: dict[str, tuple[str, re.Pattern[str], str]] = {
    "github": ("teams", _SLASHED, "ORG/TEAM"), "buildkite": ("teams", _NAME, "a name"),
    "local": ("groups", _LOCAL_NAME, "a name"), "idp": ("groups", _PRINCIPAL_NAME, "a name"),
}


def fits(source: Source, field: str, value: str) -> bool:
    """Whether `value` may be the `field` of a `source` identity (or an item of its groups or teams)."""
    membership = _MEMBERSHIPS.get(source)
    if membership is not None and field == membership[0]:
        pattern: re.Pattern[str] | None = membership[1]
    else:
        pattern = _FIELDS[source][field]
    if not 0 < len(value) <= 256 or "\x00" in value:
        return False
    return pattern is None or bool(pattern.fullmatch(value))


def identity_from_json(data: Any, name: str = "<identity>") -> Identity:
    """Parse and validate an identity document; errors name the field."""
    def fail(field: str | None, message: str) -> InputError:
        return InputError(message, file=name, field=field)

    if not isinstance(data, dict):
        raise fail(None, "an identity must be a JSON object")
    source = data.get("source")
    if source not in _FIELDS:
        raise fail("source", f"must be one of github, buildkite, gitlab, idp, local; got {source!r}")
    membership = _MEMBERSHIPS.get(source)
    allowed = set(_FIELDS[source]) | {"source"} | ({membership[0]} if membership else set())
    if source in _FORKABLE:
        allowed.add("fork")
    if source == "buildkite":
        allowed.add("signed")
    if source == "gitlab":
        allowed.add("ref_protected")
    for key in data:
        if key not in allowed:
            article = "an" if source == "idp" else "a"
            raise fail(key, f"unknown field for {article} {source} identity "
                            f"(known: {', '.join(sorted(allowed))})")
    values: dict[str, Any] = {"source": source}
    for key, pattern in _FIELDS[source].items():
        if key not in data:
            if key in _REQUIRED[source]:
                raise fail(key, "is required")
            continue
        value = data[key]
        if not isinstance(value, str) or not value or len(value) > 256 or "\x00" in value:
            raise fail(key, "must be a non-empty string of at most 256 characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise fail(key, f"{value!r} is not valid here")
        values[key] = value
    if membership is not None:
        list_key, item_pattern, shape = membership
        items = data.get(list_key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) and item_pattern.fullmatch(i)
                                                  for i in items):
            raise fail(list_key, f"must be a list of names ({shape} each)")
        if len(items) > MAX_LIST:
            raise fail(list_key, f"has more than {MAX_LIST} entries")
        values[list_key] = tuple(items)
    for flag in ("fork", "ref_protected"):
        if flag in data:
            if not isinstance(data[flag], bool):
                raise fail(flag, "must be true or false")
            values[flag] = data[flag]
    if "signed" in data:
        signed = data["signed"]
        if not isinstance(signed, list) or not all(isinstance(f, str) and f in SIGNABLE_FIELDS
                                                   for f in signed):
            raise fail("signed", f"must be a list of {', '.join(SIGNABLE_FIELDS)}")
        values["signed"] = tuple(f for f in SIGNABLE_FIELDS if f in signed)
    return Identity(**values)


def load_identity(path: str | Path) -> Identity:
    """Read an identity JSON file; errors name the file, the field and, when found, its line."""
    text = read_text_limited(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno) from None
    except RecursionError:
        raise InputError("invalid JSON: arrays or objects nested too deeply", file=str(path)) from None
    except ValueError:
        # int() refuses integers of thousands of digits
        raise InputError("invalid JSON: a number has too many digits", file=str(path)) from None
    try:
        return identity_from_json(data, str(path))
    except InputError as exc:
        if exc.field is None:
            raise
        key = re.search(f'"{re.escape(exc.field)}"\\s*:', text)
        line = text.count("\n", 0, key.start()) + 1 if key else None
        raise InputError(exc.detail, file=str(path), line=line, field=exc.field) from None
