"""Typed principals in grants (`github:team:CliMA/core`) and how they match an identity.

Matching is exact. The one wildcard is a trailing `/*` on a two-part name
(`github:repo:CliMA/*`), and it stands for exactly one further segment inside that
organisation: it never matches `CliMAX/x`, nor `CliMA/x/y`. GitHub names are compared
without regard to case, since GitHub itself treats `CliMA` and `clima` as one account.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,99}"
# A Unix user or group name, optionally with the domain SSSD appends (`alice@example.org`,
# `host$@ad.example.org`): one `@`, never at either end.
LOCAL_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\$?(?:@[A-Za-z0-9_][A-Za-z0-9_.-]{0,190})?"

# (source, type) -> does the value have the shape OWNER/NAME?
KINDS: dict[tuple[str, str], bool] = {
    ("github", "org"): False, ("github", "repo"): True, ("github", "team"): True,
    ("github", "user"): False,
    ("buildkite", "org"): False, ("buildkite", "pipeline"): True, ("buildkite", "team"): True,
    ("local", "user"): False, ("local", "group"): False,
}


@dataclass(frozen=True)
class PrincipalPattern:
    source: str
    kind: str
    owner: str            # the whole value for one-part kinds
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
        owner, slash, name = value.partition("/")
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
    two_part = KINDS[(source, kind)]
    segment = LOCAL_NAME if source == "local" else _SEGMENT
    if not two_part:
        if "*" in value:
            raise ValueError(f"{text!r}: a wildcard is only allowed as a trailing '/*' after an "
                             f"organisation, and {source}:{kind} names have no organisation part")
        if not re.fullmatch(segment, value):
            raise ValueError(f"{text!r}: {value!r} is not a valid {kind} name")
        return PrincipalPattern(source, kind, value, None)
    owner, slash, name = value.partition("/")
    if "*" in owner:
        raise ValueError(f"{text!r}: the organisation must be spelled out; '*' is only allowed "
                         "as the whole last part (ORG/*)")
    if not slash:
        raise ValueError(f"{text!r}: a {source}:{kind} principal is OWNER/NAME")
    if "*" in name and name != "*":
        raise ValueError(f"{text!r}: '*' is only allowed as the whole last part ('{owner}/*'), "
                         "never inside a name")
    if not re.fullmatch(segment, owner):
        raise ValueError(f"{text!r}: {owner!r} is not a valid organisation name")
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
