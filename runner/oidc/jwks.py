"""An issuer's discovery document and key set (JWKS) read into verification keys. Pure.

Only RS256 and ES256 are accepted: what GitHub, Buildkite and GitLab sign their ID tokens with,
and what identity providers offer. A key that names no `alg` is taken for the one its type allows
(RSA: RS256; EC on P-256: ES256). A key that cannot be used (another algorithm, a private part, a
key id used twice) does not spoil the others: it is kept with the reason, which a token naming it
is refused with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.jwk import KeyType, VerificationKey, verification_key
from runner.oidc.errors import TokenRejected
from runner.urls import https_url

ALGORITHMS: Mapping[str, KeyType] = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}
MAX_KEYS = 100


@dataclass(frozen=True)
class KeySet:
    """An issuer's keys by key id, and why each key that cannot be used cannot."""

    keys: Mapping[str, VerificationKey]
    unusable: Mapping[str, str]

    def knows(self, kid: str) -> bool:
        return kid in self.keys or kid in self.unusable

    def key(self, kid: str) -> VerificationKey:
        """The key `kid`; TokenRejected when the issuer has none by that id, or one that cannot be used."""
        if kid in self.unusable:
            raise TokenRejected(f"key id {kid} names a key that cannot be used: {self.unusable[kid]}")
        if kid not in self.keys:
            raise TokenRejected(f"unknown key id {kid}")
        return self.keys[kid]


def jwks_uri_of(discovery: object, issuer: str) -> str:
    """The `jwks_uri` of an OpenID Connect discovery document; ValueError when it is not one for `issuer`."""
    if not isinstance(discovery, dict):
        raise ValueError("the discovery document is not a JSON object")
    # OpenID Connect Discovery: the document's issuer must be the one it was fetched for.
    if discovery.get("issuer") != issuer:
        raise ValueError(f"the discovery document is for issuer {str(discovery.get('issuer'))[:200]!r}, "
                         f"not {issuer!r}")
    uri = discovery.get("jwks_uri")
    if not isinstance(uri, str):
        raise ValueError("the discovery document has no jwks_uri")
    try:
        return https_url(uri)
    except ValueError as error:
        raise ValueError(f"the discovery document's jwks_uri: {error}") from None


def read_key_set(document: object) -> KeySet:
    """The keys of a JWKS document (RFC 7517); ValueError when it is not one."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('the key set is not a JSON object with a "keys" list (a JWKS)')
    if len(entries) > MAX_KEYS:
        raise ValueError(f"the key set holds more than {MAX_KEYS} keys")
    keys: dict[str, VerificationKey] = {}
    unusable: dict[str, str] = {}
    for entry in entries:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        # A key without an id cannot be named by a token: nothing can use it.
        if not isinstance(kid, str) or not kid:
            continue
        if kid in keys or kid in unusable:
            keys.pop(kid, None)
            unusable[kid] = "the issuer's key set uses that id twice"
            continue
        try:
            keys[kid] = _read_key(kid, entry)
        except ValueError as error:
            unusable[kid] = str(error)
    return KeySet(keys, unusable)


def _read_key(kid: str, entry: Mapping[str, Any]) -> VerificationKey:
    alg = entry.get("alg") or _implied_algorithm(entry)
    if alg not in ALGORITHMS:
        raise ValueError(f"it is for algorithm {str(alg)[:40]}, and only {', '.join(ALGORITHMS)} "
                         "are accepted")
    return VerificationKey(kid, alg, verification_key(entry, alg, ALGORITHMS[alg]))


def _implied_algorithm(entry: Mapping[str, Any]) -> str:
    for alg, (kty, crv) in ALGORITHMS.items():
        if entry.get("kty") == kty and (crv is None or entry.get("crv") == crv):
            return alg
    raise ValueError(f"it names no alg, and its key type {str(entry.get('kty'))[:20]} is not RSA or EC P-256")
