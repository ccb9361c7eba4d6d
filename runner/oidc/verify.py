"""`TokenVerifier`: an OIDC ID token checked against the trusted issuers and turned into an identity.

In order, each failure refusing the token with its reason (`TokenRejected`): the token's size (before
anything is parsed), its algorithm (RS256 or ES256; never `none`, never a shared-secret HS256 that a
public key would pass for), its issuer (one of `[[oidc]]`), its key id (in the issuer's key set,
fetched again once when unknown), its signature, for Buildkite its organisation, then `iss`, `aud`,
`exp`, `nbf`, `iat` with a minute of skew, and last the claims that make the identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from jwt.exceptions import InvalidSignatureError, PyJWTError

from runner.identity import Identity
from runner.oidc.binding import bound_digest
from runner.oidc.claims import identity_from_claims
from runner.oidc.errors import TokenRejected
from runner.oidc.issuers import IssuerKind, OidcIssuer
from runner.oidc.jwks import ALGORITHMS
from runner.oidc.keys import KeyCache, SessionFactory
from runner.oidc.registered import CLOCK_SKEW, check_registered_claims

MAX_TOKEN_BYTES = 16 * 1024

# Everything but the signature and the token's own shape is checked by `registered`, against a
# time the caller chooses.
_DECODE_OPTIONS: Any = {"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                        "verify_iat": False, "verify_aud": False, "verify_iss": False,
                        "verify_sub": False, "verify_jti": False}


@dataclass(frozen=True)
class VerifiedToken:
    issuer: OidcIssuer          # the `[[oidc]]` table that trusts it
    claims: Mapping[str, Any]
    identity: Identity
    audience: str               # the token's audience that matched: the issuer's, or it bound to a job

    @property
    def issuer_name(self) -> str:
        return self.issuer.name

    @property
    def kind(self) -> IssuerKind:
        return self.issuer.kind

    @property
    def job_digest(self) -> str | None:
        """The digest of the one job this token is for, when its audience binds it to one."""
        return bound_digest(self.audience, self.issuer.audience)


class TokenVerifier:
    """Verifies tokens of `issuers`; `session_factory` makes the HTTP sessions that fetch their keys."""

    def __init__(self, issuers: Sequence[OidcIssuer], session_factory: SessionFactory = aiohttp.ClientSession,
                 *, keys: KeyCache | None = None, clock: Callable[[], float] = time.time,
                 skew: float = CLOCK_SKEW) -> None:
        self.issuers = tuple(issuers)
        self._keys = keys or KeyCache(session_factory)
        self._clock = clock
        self._skew = skew

    async def verify(self, token: str, *, now: float | None = None) -> VerifiedToken:
        """The verified token; TokenRejected with the reason, or KeysUnavailable when the issuer's
        keys could not be fetched. `now` (seconds since 1970) is the time to judge `exp`, `nbf` and
        `iat` against: by default the clock's."""
        header, unverified = _parse(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise TokenRejected("algorithm none is not allowed")
        if alg not in ALGORITHMS:
            raise TokenRejected(f"algorithm {alg[:40]} is not allowed (only {', '.join(ALGORITHMS)})")
        iss = unverified.get("iss")
        trusting = [issuer for issuer in self.issuers if issuer.issuer == iss]
        if not isinstance(iss, str) or not trusting:
            raise TokenRejected(f"issuer {str(iss)[:200]} is not trusted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("the token names no key id (kid)")
        key = await self._keys.key(trusting[0], kid[:200])
        if key.alg != alg:
            raise TokenRejected(f"key {kid} is for {key.alg}, and the token says {alg}")
        try:
            claims: dict[str, Any] = jwt.decode(token, key.jwk, algorithms=[alg], options=_DECODE_OPTIONS)
        except InvalidSignatureError:
            raise TokenRejected("signature does not verify") from None
        except PyJWTError as error:
            raise TokenRejected(f"the token is malformed: {error}") from None
        issuer = _table_for(trusting, claims)
        audience = check_registered_claims(claims, issuer, now=self._clock() if now is None else now,
                                           skew=self._skew)
        return VerifiedToken(issuer, claims, identity_from_claims(issuer, claims), audience)


def _parse(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and the (not yet verified) claims of a compact JWS."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected(f"the token is larger than {MAX_TOKEN_BYTES} bytes")
    if not token.isascii() or token.count(".") != 2:
        raise TokenRejected("the token is not a JWT (three base64url parts joined by '.')")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except PyJWTError as error:
        # Critical header parameters (`crit`) are among what PyJWT refuses, as RFC 7515 says.
        raise TokenRejected(f"the token cannot be read: {error}") from None
    if not isinstance(claims, dict):
        raise TokenRejected("the token's claims are not a JSON object")
    return header, claims


def _table_for(trusting: list[OidcIssuer], claims: Mapping[str, Any]) -> OidcIssuer:
    """The `[[oidc]]` table for a verified token: for Buildkite, the one of its organisation."""
    if trusting[0].kind != "buildkite":
        return trusting[0]
    organization = claims.get("organization_slug")
    for issuer in trusting:
        if issuer.organization == organization:
            return issuer
    pinned = " or ".join(str(issuer.organization) for issuer in trusting)
    raise TokenRejected(f"organization {str(organization)[:100]} is not the pinned {pinned}")
