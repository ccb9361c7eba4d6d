"""Authenticating as a GitHub App: the app's JWT and the installation access tokens.

GitHub's rules for a GitHub App: the JWT is signed RS256 with the app's private key,
``iss`` is the app id (a string), ``iat`` is set 60 s in the past against clock drift and ``exp``
may be at most 10 minutes ahead of GitHub's clock, so ours is ``now + 540`` (lifetime 600 s) and a
local clock a few seconds fast still passes. An installation token is minted by
``POST /app/installations/{id}/access_tokens`` (authenticated with the JWT) and lives one hour; it
is an opaque string of any length (the stateless ``ghs_…`` format is ~520 characters), never
parsed, never logged.

``app_jwt`` is a pure function of (app id, key, now). ``AppAuth`` keeps the state: which
installation serves which repository or organisation, and a cache of tokens reused until
``refresh_margin`` seconds before they expire. The HTTP calls go through an ``AppApi`` (the REST
client), so this module has no transport of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from runner.errors import HpcRunnerError, InputError
from runner.logging_setup import get_logger
from runner.secrets import read_secret_file

log = get_logger(__name__)

JWT_BACKDATE = 60          # seconds iat is set in the past (GitHub's recommendation)
JWT_LIFETIME = 600         # exp - iat: GitHub's maximum, 10 minutes
TOKEN_REFRESH_MARGIN = 300  # seconds before expires_at at which a cached token is replaced


class GitHubAuthError(HpcRunnerError):
    """GitHub refused the app's credentials, or answered a token request with nonsense."""


def app_jwt(app_id: int | str, private_key: RSAPrivateKey | str | bytes, now: float) -> str:
    """The app's JWT at time ``now`` (epoch seconds): valid from ``now - 60`` to ``now + 540``."""
    issued = int(now) - JWT_BACKDATE
    claims = {"iat": issued, "exp": issued + JWT_LIFETIME, "iss": str(app_id)}
    return jwt.encode(claims, private_key, algorithm="RS256")


def load_private_key(path: str | Path) -> RSAPrivateKey:
    """The app's RSA private key from a PEM file that only the service account can read."""
    text = read_secret_file(path, what="GitHub App private key")
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"not a PEM private key without a passphrase ({exc})", file=str(path)) from None
    if not isinstance(key, RSAPrivateKey):
        raise InputError("GitHub App keys are RSA keys (RS256); this is a "
                         f"{type(key).__name__.lstrip('_')}", file=str(path))
    return key


@dataclass(frozen=True)
class InstallationToken:
    installation_id: int
    token: str = field(repr=False)   # opaque, any length; never logged
    expires_at: float                # epoch seconds

    def usable_at(self, now: float, margin: float = TOKEN_REFRESH_MARGIN) -> bool:
        return now < self.expires_at - margin


def parse_token_response(installation_id: int, body: Any) -> InstallationToken:
    """The token from a ``201`` of ``POST /app/installations/{id}/access_tokens``."""
    if not isinstance(body, Mapping) or not isinstance(body.get("token"), str) or not body["token"]:
        raise GitHubAuthError(f"installation {installation_id}: the access token response has no token")
    raw = body.get("expires_at")
    try:
        expires = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise GitHubAuthError(f"installation {installation_id}: expires_at {raw!r} is not a time") from None
    if expires.tzinfo is None:
        raise GitHubAuthError(f"installation {installation_id}: expires_at {raw!r} has no time zone")
    return InstallationToken(installation_id, body["token"], expires.timestamp())


class AppApi(Protocol):
    """What ``AppAuth`` needs from the REST client: a call authenticated with the app's JWT that
    returns the decoded JSON body (and raises for an error status)."""

    async def app_request(self, method: str, path: str) -> Any: ...


class AppAuth:
    """The app's credentials, the installations it has looked up and its cached tokens."""

    def __init__(self, app_id: int | str, private_key: RSAPrivateKey | str | bytes, *,
                 refresh_margin: float = TOKEN_REFRESH_MARGIN) -> None:
        self.app_id = str(app_id)
        self._key = private_key
        self._refresh_margin = refresh_margin
        self._installations: dict[str, int] = {}   # "repo:o/r" or "org:o" -> installation id
        self._tokens: dict[int, InstallationToken] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"AppAuth(app_id={self.app_id})"

    def jwt(self, now: float) -> str:
        return app_jwt(self.app_id, self._key, now)

    async def installation_for(self, api: AppApi, *, repo: str | None = None, org: str | None = None) -> int:
        """The installation that covers ``repo`` (``owner/name``) or organisation ``org``."""
        if (repo is None) == (org is None):
            raise ValueError("name exactly one of repo and org")
        key = f"repo:{repo.lower()}" if repo is not None else f"org:{org!s}".lower()
        if key not in self._installations:
            path = f"/repos/{repo}/installation" if repo is not None else f"/orgs/{org}/installation"
            body = await api.app_request("GET", path)
            if not isinstance(body, Mapping) or not isinstance(body.get("id"), int):
                raise GitHubAuthError(f"GET {path}: the answer names no installation id")
            self._installations[key] = body["id"]
            log.info("github.installation.found", target=key, installation=body["id"])
        return self._installations[key]

    def forget_installation(self, *, repo: str | None = None, org: str | None = None) -> None:
        """Drop a remembered installation (the app was uninstalled or the repository moved)."""
        key = f"repo:{repo.lower()}" if repo is not None else f"org:{org!s}".lower()
        installation = self._installations.pop(key, None)
        if installation is not None:
            self._tokens.pop(installation, None)

    async def token(self, api: AppApi, installation_id: int, now: float) -> str:
        """A token for the installation, reusing the cached one until shortly before expiry."""
        lock = self._locks.setdefault(installation_id, asyncio.Lock())
        # One request per installation at a time: concurrent callers share the fresh token.
        async with lock:
            cached = self._tokens.get(installation_id)
            if cached is not None and cached.usable_at(now, self._refresh_margin):
                return cached.token
            body = await api.app_request("POST", f"/app/installations/{installation_id}/access_tokens")
            fresh = parse_token_response(installation_id, body)
            self._tokens[installation_id] = fresh
            log.info("github.token.created", installation=installation_id,
                     expires_in=int(fresh.expires_at - now))
            return fresh.token

    def invalidate(self, installation_id: int, token: str) -> None:
        """Forget ``token`` (GitHub answered 401 to it), unless it was replaced meanwhile."""
        cached = self._tokens.get(installation_id)
        if cached is not None and cached.token == token:
            del self._tokens[installation_id]
