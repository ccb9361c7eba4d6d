"""Typed principals in grants (`github:team:CliMA/core`) and how they match an identity.

Matching is exact. The one wildcard is a trailing `/*` on a two-part name
(`github:repo:CliMA/*`), and it stands for exactly one further segment inside that
organisation: it never matches `CliMAX/x`, nor `CliMA/x/y`. GitHub names are compared
without regard to case, since GitHub itself treats `CliMA` and `clima` as one account.

GitLab groups nest, so its names are paths: `gitlab:group:G` is a group's full path
(`climate/ocean`), `gitlab:project:G/P` a project's, and `gitlab:project:climate/ocean/*` stands
for the projects directly in `climate/ocean`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,99}"
# A GitLab group or project path (what GitLab allows, less names starting with '.'), at most 20
# groups deep as GitLab nests them.
GITLAB_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}"
GITLAB_PATH = f"{GITLAB_SEGMENT}(?:/{GITLAB_SEGMENT}){{0,20}}"
# A Unix user or group name, optionally with the domain SSSD appends (`alice@example.org`,
# `host$@ad.example.org`): one `@`, never at either end.
LOCAL_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\$?(?:@[A-Za-z0-9_][A-Za-z0-9_.-]{0,190})?"

# The shape of a principal's value: one name, OWNER/NAME, a path of groups (GitLab's nest), or
# such a path and a name in it.
Shape = Literal["name", "owner/name", "path", "path/name"]

# (source, type) -> the shape of its value
KINDS: dict[tuple[str, str], Shape] = {
    ("github", "org"): "name", ("github", "repo"): "owner/name", ("github", "team"): "owner/name",
    ("github", "user"): "name",
    ("buildkite", "org"): "name", ("buildkite", "pipeline"): "owner/name",
    ("buildkite", "team"): "owner/name",
    ("gitlab", "group"): "path", ("gitlab", "project"): "path/name", ("gitlab", "user"): "name",
    ("idp", "user"): "name", ("idp", "group"): "name",
    ("local", "user"): "name", ("local", "group"): "name",
}


@dataclass(frozen=True)
class PrincipalPattern:
    source: str
    kind: str
    owner: str            # the whole value for one-part kinds; the group's path for GitLab's
    name: str | None      # None for one-part kinds; "*" for the trailing wildcard

    def __str__(self) -> str:
        value = self.owner if self.name is None else f"{self.owner}/{self.name}"
        return f"{self.source}:{self.kind}:{value}"

    def matches(self, principal: str) -> bool:
        source, _, rest = principal.partition(":")
        kind, _, value = rest.partition(":")
        if (source, kind) != (self.source, self.kind):
            return False
        if self.name is None:
            return self._same(value, self.owner)
        # A project's group path is all but its last part; an organisation is the first part.
        split = value.rpartition if KINDS[(self.source, self.kind)] == "path/name" else value.partition
        owner, slash, name = split("/")
        if not slash or not name or "/" in name:
            return False
        if not self._same(owner, self.owner):
            return False
        return self.name == "*" or self._same(name, self.name)

    def _same(self, held: str, granted: str) -> bool:
        if self.source == "github":
            return held.lower() == granted.lower()
        return held == granted


def parse_principal(text: str) -> PrincipalPattern:
    """Parse a grant principal; raises ValueError saying what is wrong."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not a principal (use SOURCE:TYPE:NAME, e.g. github:team:CliMA/core)")
    source, kind, value = parts
    if "*" in source or "*" in kind:
        raise ValueError(f"{text!r}: a wildcard is only allowed as a trailing '/*' after an "
                         "organisation, never in the source or the type")
    if (source, kind) not in KINDS:
        known = ", ".join(f"{s}:{k}" for s, k in KINDS)
        raise ValueError(f"{text!r}: unknown principal type {source}:{kind} (known: {known})")
    shape = KINDS[(source, kind)]
    if shape == "path":
        if "*" in value:
            raise ValueError(f"{text!r}: a {source}:{kind} name is a whole path, without a wildcard "
                             "(a group covers the groups inside it)")
        if not re.fullmatch(GITLAB_PATH, value):
            raise ValueError(f"{text!r}: {value!r} is not a valid {kind} path")
        return PrincipalPattern(source, kind, value, None)
    segment = {"local": LOCAL_NAME, "gitlab": GITLAB_SEGMENT}.get(source, _SEGMENT)
    if shape == "name":
        if "*" in value:
            raise ValueError(f"{text!r}: a wildcard is only allowed as a trailing '/*' after an "
                             f"organisation, and {source}:{kind} names have no organisation part")
        if not re.fullmatch(segment, value):
            raise ValueError(f"{text!r}: {value!r} is not a valid {kind} name")
        return PrincipalPattern(source, kind, value, None)
    in_path = shape == "path/name"
    owner, slash, name = value.rpartition("/") if in_path else value.partition("/")
    if "*" in owner:
        raise ValueError(f"{text!r}: the {'group' if in_path else 'organisation'} must be spelled out; "
                         f"'*' is only allowed as the whole last part ({'GROUP' if in_path else 'ORG'}/*)")
    if not slash:
        raise ValueError(f"{text!r}: a {source}:{kind} principal is {'GROUP' if in_path else 'OWNER'}/NAME")
    if "*" in name and name != "*":
        raise ValueError(f"{text!r}: '*' is only allowed as the whole last part ('{owner}/*'), "
                         "never inside a name")
    if not re.fullmatch(GITLAB_PATH if in_path else segment, owner):
        what = "group path" if in_path else "organisation name"
        raise ValueError(f"{text!r}: {owner!r} is not a valid {what}")
    if name != "*" and not re.fullmatch(segment, name):
        raise ValueError(f"{text!r}: {name!r} is not a valid {kind} name")
    return PrincipalPattern(source, kind, owner, name)


def ref_matches(pattern: str, ref: str) -> bool:
    """Git ref patterns: exact, or a trailing `/*` for everything below (`refs/pull/*`)."""
    if pattern.endswith("/*"):
        return ref.startswith(pattern[:-1]) and len(ref) > len(pattern) - 1
    return ref == pattern


def check_ref_pattern(pattern: str) -> str:
    if not pattern.startswith("refs/"):
        raise ValueError(f"{pattern!r} is not a git ref (refs/heads/main, refs/tags/*, refs/pull/*)")
    body = pattern[:-2] if pattern.endswith("/*") else pattern
    if "*" in body or ".." in body or not re.fullmatch(r"refs/[A-Za-z0-9._/+-]+", body):
        raise ValueError(f"{pattern!r}: only a trailing '/*' may be a wildcard in a ref")
    return pattern
