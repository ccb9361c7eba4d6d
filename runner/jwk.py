"""One public verification key out of a JWK (RFC 7517), held to the algorithm it will check.

Shared by the Buildkite step signatures (keys from a file) and the OIDC ID tokens (keys from an
issuer's JWKS): each names the algorithms it accepts and the key type each needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jwt import PyJWK
from jwt.exceptions import PyJWTError

# An algorithm -> the only key type (and curve) it may be used with, so that a key cannot be
# reinterpreted under a weaker algorithm.
KeyType = tuple[str, str | None]


@dataclass(frozen=True)
class VerificationKey:
    kid: str
    alg: str
    jwk: PyJWK


def verification_key(entry: Mapping[str, Any], alg: str, key_type: KeyType) -> PyJWK:
    """The key of `entry` for `alg`; ValueError saying why it cannot be one.

    The key must be of `key_type`, for signatures, public (a verification key that holds its
    private part is refused: whoever reads it could sign), and long enough for `alg`.
    """
    kty, crv = key_type
    if entry.get("kty") != kty or (crv is not None and entry.get("crv") != crv):
        found = f"kty {entry.get('kty')!r}" + (f", crv {entry.get('crv')!r}" if crv else "")
        wanted = f"kty {kty!r}" + (f", crv {crv!r}" if crv else "")
        raise ValueError(f"{alg} needs a key with {wanted}, not {found}")
    if entry.get("use", "sig") != "sig":
        raise ValueError(f'"use" is {entry.get("use")!r}; a verification key must be for "sig"')
    if kty != "oct" and "d" in entry:
        raise ValueError("holds a private key; give only the public key (the public JWKS)")
    try:
        jwk = PyJWK(dict(entry), algorithm=alg)
    except (PyJWTError, ValueError, TypeError) as error:
        raise ValueError(f"is not a valid {alg} key: {error}") from None
    weakness = jwk.Algorithm.check_key_length(jwk.key)
    if weakness:
        raise ValueError(weakness)
    return jwk
