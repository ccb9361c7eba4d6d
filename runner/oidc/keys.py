"""The issuers' keys, fetched over HTTPS and cached per issuer.

An issuer's key set comes from its `jwks_uri`: the one configured, else the one its discovery
document (`/.well-known/openid-configuration`) names. It is fetched when first needed, again when a
token names a key id it does not hold (the issuer has rotated its keys) and when it is older than
`max_age` (a key the issuer withdrew is dropped). However many tokens name unknown keys, an issuer
is asked at most once per `refresh_interval`, so a flood of made-up key ids cannot hammer it. Every
answer is bounded in size and time, and redirects are not followed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from runner.jwk import VerificationKey
from runner.logging_setup import get_logger
from runner.oidc.errors import KeysUnavailable
from runner.oidc.issuers import OidcIssuer
from runner.oidc.jwks import KeySet, jwks_uri_of, read_key_set

log = get_logger("runner.oidc")

SessionFactory = Callable[[], aiohttp.ClientSession]

DEFAULT_REFRESH_INTERVAL = 30.0
DEFAULT_MAX_AGE = 3600.0
DEFAULT_TIMEOUT = 10.0
# A discovery document or key set is a few KiB; GitHub's key set, with certificates, about 10.
MAX_DOCUMENT_BYTES = 256 * 1024


class _FetchFailed(Exception):
    pass


@dataclass
class _Cached:
    keys: KeySet | None = None
    fetched_at: float = 0.0                 # of the keys held
    tried_at: float | None = None           # the last attempt, whatever came of it
    failure: str | None = None              # why the last attempt failed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class KeyCache:
    """Keys by issuer; `session_factory` makes the HTTP session each fetch uses (and closes)."""

    def __init__(self, session_factory: SessionFactory = aiohttp.ClientSession, *,
                 clock: Callable[[], float] = time.monotonic,
                 refresh_interval: float = DEFAULT_REFRESH_INTERVAL, max_age: float = DEFAULT_MAX_AGE,
                 timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_DOCUMENT_BYTES) -> None:
        self._session_factory = session_factory
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._max_age = max_age
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._cache: dict[tuple[str, str | None], _Cached] = {}

    async def key(self, issuer: OidcIssuer, kid: str) -> VerificationKey:
        """The issuer's key `kid`: TokenRejected for a key id it does not have (or a key that cannot
        be used), KeysUnavailable when its keys could not be fetched at all."""
        cached = self._cache.setdefault((issuer.issuer, issuer.jwks_uri), _Cached())
        async with cached.lock:
            now = self._clock()
            held = cached.keys
            wanted = held is None or now - cached.fetched_at > self._max_age or not held.knows(kid)
            if wanted and self._may_try(cached, now):
                await self._refresh(issuer, cached, now)
            if cached.keys is None:
                raise KeysUnavailable(f"the keys of issuer {issuer.name} ({issuer.issuer}) could not be "
                                      f"fetched: {cached.failure}")
            return cached.keys.key(kid)

    def _may_try(self, cached: _Cached, now: float) -> bool:
        return cached.tried_at is None or now - cached.tried_at >= self._refresh_interval

    async def _refresh(self, issuer: OidcIssuer, cached: _Cached, now: float) -> None:
        cached.tried_at = now
        try:
            keys = await self._fetch(issuer)
        except _FetchFailed as failure:
            cached.failure = str(failure)
            # Keys held from before stay in use: an issuer out of reach for a while must not
            # stop every job, and a token naming a key it never had is refused all the same.
            log.warning("oidc_keys_not_fetched", issuer=issuer.name, url=issuer.issuer, reason=str(failure),
                        keeping_keys=cached.keys is not None)
            return
        cached.keys, cached.fetched_at, cached.failure = keys, now, None

    async def _fetch(self, issuer: OidcIssuer) -> KeySet:
        async with self._session_factory() as session:
            uri = issuer.jwks_uri
            if uri is None:
                discovery = await self._get_json(session, issuer.discovery_url, "the discovery document")
                try:
                    uri = jwks_uri_of(discovery, issuer.issuer)
                except ValueError as error:
                    raise _FetchFailed(f"{error} ({issuer.discovery_url})") from None
            document = await self._get_json(session, uri, "the key set")
        try:
            return read_key_set(document)
        except ValueError as error:
            raise _FetchFailed(f"{error} ({uri})") from None

    async def _get_json(self, session: aiohttp.ClientSession, url: str, what: str) -> object:
        try:
            async with session.get(url, allow_redirects=False, headers={"Accept": "application/json"},
                                   timeout=aiohttp.ClientTimeout(total=self._timeout)) as response:
                if response.status != 200:
                    raise _FetchFailed(f"{what} at {url} answered HTTP {response.status}")
                body = await self._read_bounded(response, url, what)
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = "no answer within the timeout" if isinstance(error, TimeoutError) else str(error)
            raise _FetchFailed(f"{what} at {url}: {reason or type(error).__name__}") from None
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchFailed(f"{what} at {url} is not JSON") from None

    async def _read_bounded(self, response: aiohttp.ClientResponse, url: str, what: str) -> bytes:
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > self._max_bytes:
                raise _FetchFailed(f"{what} at {url} is larger than {self._max_bytes} bytes")
        return bytes(body)
