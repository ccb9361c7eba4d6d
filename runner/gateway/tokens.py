"""The agents' bearer tokens: the `agent_tokens_file` format, and authentication in constant time.

The file holds one agent per line, `NAME:TOKEN`; blank lines and lines starting with `#` are
ignored. NAME (letters, digits, `.`, `_`, `-`, at most 64) appears in the gateway's log and in
each lease; TOKEN is at least 32 printable characters without spaces (for example the output of
`openssl rand -hex 32`). Names and tokens are unique. The file is a secret: mode 0600, owned by
the account the gateway runs as.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from runner.errors import InputError
from runner.secrets import read_secret_file

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")
MIN_TOKEN_LENGTH = 32
WHAT = "gateway's agent tokens"


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes


class AgentTokens:
    """Which agent, if any, a presented bearer token belongs to."""

    def __init__(self, entries: dict[str, str]) -> None:
        if not entries:
            raise ValueError("no agent tokens")
        # Comparing digests gives every comparison the same length, so its time says nothing
        # about the length of any token.
        self._entries = tuple(_Entry(name, _digest(token)) for name, token in entries.items())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self._entries)

    def agent_for(self, token: str) -> str | None:
        """The agent holding `token`, or None. Every entry is compared, with no early exit."""
        presented = _digest(token)
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented):
                found = entry.name
        return found

    def agent_for_header(self, authorization: str | None) -> str | None:
        """The agent named by an `Authorization: Bearer <token>` header, or None."""
        token = bearer_token(authorization)
        return None if token is None else self.agent_for(token)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_agent_tokens(text: str, file: str) -> AgentTokens:
    """Read the file's text; an InputError names the file and line (never the token)."""
    entries: dict[str, str] = {}
    names_by_token: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not colon:
            raise InputError("is not NAME:TOKEN", file=file, line=number)
        if not NAME_PATTERN.fullmatch(name):
            raise InputError(f"agent name {name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'",
                             file=file, line=number)
        if name in entries:
            raise InputError(f"agent {name!r} is listed twice", file=file, line=number)
        if not TOKEN_PATTERN.fullmatch(token):
            raise InputError(f"the token of agent {name!r} is empty or has spaces or control characters",
                             file=file, line=number)
        if len(token) < MIN_TOKEN_LENGTH:
            raise InputError(f"the token of agent {name!r} is shorter than {MIN_TOKEN_LENGTH} characters "
                             "(make one with `openssl rand -hex 32`)", file=file, line=number)
        if token in names_by_token:
            raise InputError(f"agent {name!r} has the same token as agent {names_by_token[token]!r}: "
                             "each agent needs its own", file=file, line=number)
        entries[name] = token
        names_by_token[token] = name
    if not entries:
        raise InputError("lists no agent: add a line NAME:TOKEN for each agent", file=file)
    return AgentTokens(entries)


def load_agent_tokens(path: Path) -> AgentTokens:
    """Read and check the agent tokens file (SecretFileError for its permissions, InputError for its text)."""
    return parse_agent_tokens(read_secret_file(path, what=WHAT), str(path))
