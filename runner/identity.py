"""Who asks for a job, as the policy sees it, and the principals that identity holds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runner.errors import InputError
from runner.fields import MAX_LIST
from runner.principals import LOCAL_NAME
from runner.tomlsource import read_text_limited

Source = Literal["github", "buildkite", "local"]

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_NAME = re.compile(_SEGMENT)
_SLASHED = re.compile(f"{_SEGMENT}/{_SEGMENT}")
_LOCAL_NAME = re.compile(LOCAL_NAME)
_REF = re.compile(r"refs/[A-Za-z0-9._/+-]{1,250}")

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
    # github
    repository: str | None = None
    actor: str | None = None
    # buildkite
    organization: str | None = None
    pipeline: str | None = None
    branch: str | None = None
    creator: str | None = None
    signer: str | None = None
    # local
    user: str | None = None
    groups: tuple[str, ...] = ()
    # shared
    teams: tuple[str, ...] = ()
    event: str | None = None
    ref: str | None = None
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
        else:
            if self.user:
                found.append(f"local:user:{self.user}")
            found += [f"local:group:{group}" for group in self.groups]
        return tuple(found)

    @property
    def effective_event(self) -> str:
        """The event a grant's `events` is matched against."""
        if self.event:
            return self.event
        return {"local": "local", "buildkite": "push", "github": "push"}[self.source]

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
        if self.source == "local" and self.user:
            return f"local:user:{self.user}"
        return principals[0] if principals else f"{self.source}:unknown"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source}
        for key in ("repository", "actor", "organization", "pipeline", "branch", "creator", "signer",
                    "user", "event", "ref"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.groups:
            data["groups"] = list(self.groups)
        if self.teams:
            data["teams"] = list(self.teams)
        if self.source != "local":
            data["fork"] = self.fork
        if self.signed:
            data["signed"] = list(self.signed)
        return data


_FIELDS: dict[str, dict[str, re.Pattern[str] | None]] = {
    "github": {"repository": _SLASHED, "actor": _NAME, "event": _NAME, "ref": _REF},
    "buildkite": {"organization": _NAME, "pipeline": _NAME, "branch": None, "creator": None,
                  "signer": None, "event": _NAME, "ref": _REF},
    "local": {"user": _LOCAL_NAME, "event": _NAME},
}
_REQUIRED = {"github": ("repository",), "buildkite": ("organization", "pipeline"), "local": ("user",)}


def identity_from_json(data: Any, name: str = "<identity>") -> Identity:
    """Parse and validate an identity document; errors name the field."""
    def fail(field: str | None, message: str) -> InputError:
        return InputError(message, file=name, field=field)

    if not isinstance(data, dict):
        raise fail(None, "an identity must be a JSON object")
    source = data.get("source")
    if source not in _FIELDS:
        raise fail("source", f"must be one of github, buildkite, local; got {source!r}")
    allowed = set(_FIELDS[source]) | {"source", "teams", "fork"}
    if source == "buildkite":
        allowed.add("signed")
    if source == "local":
        allowed = (allowed | {"groups"}) - {"teams", "fork"}
    for key in data:
        if key not in allowed:
            raise fail(key, f"unknown field for a {source} identity (known: {', '.join(sorted(allowed))})")
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
    list_key = "groups" if source == "local" else "teams"
    items = data.get(list_key, [])
    item_pattern = _LOCAL_NAME if source == "local" else (_SLASHED if source == "github" else _NAME)
    shape = "ORG/TEAM" if source == "github" else "a name"
    if not isinstance(items, list) or not all(isinstance(i, str) and item_pattern.fullmatch(i)
                                              for i in items):
        raise fail(list_key, f"must be a list of names ({shape} each)")
    if len(items) > MAX_LIST:
        raise fail(list_key, f"has more than {MAX_LIST} entries")
    values[list_key] = tuple(items)
    if "fork" in data:
        if not isinstance(data["fork"], bool):
            raise fail("fork", "must be true or false")
        values["fork"] = data["fork"]
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
