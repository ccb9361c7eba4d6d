"""Logging in to the hub's dashboard at the site's OpenID Connect provider (`[login]`).

The authorization code flow, with PKCE (S256), `state` and `nonce`: `GET /login` sends the browser
to the provider with a fresh state, nonce and code challenge, kept in the session cookie;
`GET /login/callback` takes the provider's answer only with the state it sent, redeems the code
with the verifier (once: the provider refuses a code used before, and the state is forgotten
when it is used), verifies the ID token against the provider's keys (signature RS256 or ES256,
`iss`, `aud` = our client id, `exp`, `nonce`), and starts a new session holding the user's name
and groups. The viewer's principals are `idp:user:NAME` and `idp:group:G` for each group, as the
jobs API names a site IdP's users.

The provider's discovery document and keys are fetched when first needed (never when the hub
starts, which must not wait for, or fail with, the provider), kept an hour, and the keys fetched
again when a token names a key not known yet.

Every failure is a plain page naming what went wrong (400, 403, or 502 when the provider cannot
be reached); no code, token or secret is ever shown or logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
from aiohttp import web
from aiohttp_session import Session, get_session, new_session
from authlib.deprecate import AuthlibDeprecationWarning
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import ClaimError, InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from runner.config import DEFAULT_LOGIN_SCOPES, LoginConfig
from runner.identity import fits
from runner.logging_setup import get_logger
from runner.secrets import read_secret_file
from runner.urls import https_url
from runner.web.board import Viewer
from runner.web.sessions import CSRF_FIELD, CSRF_HEADER, SESSION_MAX_AGE, check_csrf

with warnings.catch_warnings():
    # Authlib's httpx client warns at import that it would rather have httpx2; httpx is what
    # the project uses, and the warning would only repeat in every process's log.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

log = get_logger("runner.web")

CALLBACK_PATH = "/login/callback"
# The only signatures an ID token may carry: asymmetric, so holding our client secret (as the
# provider's other relying parties may hold theirs) forges nothing.
ID_TOKEN_ALGORITHMS = ("RS256", "ES256")
DEFAULT_TIMEOUT = 10.0
# How long the provider's discovery document and keys are trusted before being fetched again,
# and how soon keys are fetched again for a token naming a key not known yet.
PROVIDER_TTL = 3600.0
KEYS_REFETCH_INTERVAL = 60.0
# Seconds a login may take at the provider; the logins begun in other tabs kept beside it.
PENDING_MAX_AGE = 600
MAX_PENDING = 4
CLOCK_LEEWAY = 60
MAX_NEXT_LENGTH = 2000
# The session lives in a cookie, which browsers drop beyond 4096 bytes: what a login stores (the
# name and groups, in JSON) must fit with Fernet's overhead (a third more, and 57 bytes).
MAX_IDENTITY_JSON = 2600

_SESSION_USER = "user"
_SESSION_GROUPS = "groups"
_SESSION_AT = "authenticated_at"
_SESSION_PENDING = "login_pending"
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class LoginFailed(Exception):
    """What the person logging in is told (a plain page with `status`)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ProviderUnreachable(LoginFailed):
    def __init__(self, reason: str) -> None:
        super().__init__(502, reason)


@dataclass(frozen=True)
class _Provider:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    scopes_supported: tuple[str, ...]
    keys: KeySet
    fetched_at: float


def safe_next(value: str | None) -> str:
    """`value` when it is a path of this site ("/jobs?state=running"), else "/".

    Refused: anything not starting with one "/" ("//evil.example" is another host to a browser),
    a backslash (which browsers read as "/"), and anything not printable ASCII.
    """
    if (not value or len(value) > MAX_NEXT_LENGTH or not value.startswith("/") or value.startswith("//")
            or "\\" in value or not _PRINTABLE.fullmatch(value)):
        return "/"
    return value


def principals_of(user: str, groups: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`idp:user:USER` and `idp:group:G` of each group that can be a principal."""
    return (f"idp:user:{user}", *(f"idp:group:{group}" for group in groups if fits("idp", "groups", group)))


def verify_id_token(id_token: str, *, keys: KeySet, issuer: str, client_id: str, nonce: str,
                    access_token: str | None = None, now: int | None = None) -> dict[str, Any]:
    """The claims of an ID token this login asked for, or LoginFailed (403) saying what is wrong.

    InvalidKeyIdError passes through: the provider may have rotated its keys.
    """
    try:
        token = jwt.decode(id_token, keys, registry=JWSRegistry(algorithms=list(ID_TOKEN_ALGORITHMS),
                                                               strict_check_header=False))
    except InvalidKeyIdError:
        raise
    except JoseError as exc:
        raise LoginFailed(403, f"the ID token from the identity provider does not verify ({exc.error}); "
                               f"only {' and '.join(ID_TOKEN_ALGORITHMS)} signatures by its keys are taken") \
            from None
    options: dict[str, Any] = {"iss": {"essential": True, "value": issuer},
                               "aud": {"essential": True, "value": client_id},
                               "exp": {"essential": True}, "nonce": {"essential": True}}
    claims = CodeIDToken(token.claims, token.header, options,
                         {"nonce": nonce, "client_id": client_id, "access_token": access_token})
    try:
        claims.validate(now=now, leeway=CLOCK_LEEWAY)
    except ClaimError as exc:
        raise LoginFailed(403, f"the ID token from the identity provider is not for this login "
                               f"({exc.error}: {exc.claim})") from None
    except JoseError as exc:
        raise LoginFailed(403, f"the ID token from the identity provider is not valid ({exc.error})") \
            from None
    # Checked here too, in constant time, whatever the library's version checks.
    held = token.claims.get("nonce")
    if not isinstance(held, str) or not hmac.compare_digest(held.encode(), nonce.encode()):
        raise LoginFailed(403, "the ID token from the identity provider is not for this login "
                               "(invalid_claim: nonce)")
    return dict(token.claims)


class Login:
    """The dashboard's login at `[login]`'s provider, for the hub reached at `public_url`."""

    def __init__(self, config: LoginConfig, public_url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        self.public_url = public_url.rstrip("/")
        self.redirect_uri = self.public_url + CALLBACK_PATH
        # Where the hub's paths are below the public URL (a proxy may serve it under a prefix).
        self._base_path = urlsplit(self.public_url).path.rstrip("/")
        self._timeout = timeout
        self._client_secret = read_secret_file(config.client_secret_file,
                                               what="dashboard login's client secret")
        self._provider: _Provider | None = None
        self._keys_fetched_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def secure(self) -> bool:
        """Whether the session cookie must be Secure (the hub is reached over https)."""
        return self.public_url.startswith("https://")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/login", self._login, allow_head=False)
        app.router.add_get(CALLBACK_PATH, self._callback, allow_head=False)
        app.router.add_post("/logout", self._logout)

    async def viewer(self, request: web.Request) -> Viewer | None:
        """Who is logged in on this request's session, or None."""
        session = await get_session(request)
        user = session.get(_SESSION_USER)
        at = session.get(_SESSION_AT)
        groups = session.get(_SESSION_GROUPS, [])
        if not isinstance(user, str) or not fits("idp", "user", user) or not isinstance(at, int | float):
            return None
        if not 0 <= time.time() - at <= SESSION_MAX_AGE:
            return None
        kept = [group for group in groups if isinstance(group, str)] if isinstance(groups, list) else []
        return Viewer(name=user, principals=principals_of(user, kept))

    # --- the routes ------------------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._begin(request)
        except LoginFailed as exc:
            return self._failure(exc)

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._finish(request)
        except LoginFailed as exc:
            return self._failure(exc)

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        submitted = form.get(CSRF_FIELD)
        await check_csrf(request,
                         submitted if isinstance(submitted, str) else request.headers.get(CSRF_HEADER))
        session = await get_session(request)
        user = session.get(_SESSION_USER)
        session.invalidate()
        if isinstance(user, str):
            log.info("logged out", user=user)
        raise web.HTTPSeeOther(self._local(""), headers={"Cache-Control": "no-store"})

    async def _begin(self, request: web.Request) -> web.StreamResponse:
        target = safe_next(request.query.get("next"))
        provider = await self._current_provider()
        state, nonce, verifier = (secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                                  secrets.token_urlsafe(48))
        session = await get_session(request)
        pending = _pending(session)
        now = int(time.time())
        pending = {key: entry for key, entry in pending.items()
                   if 0 <= now - entry.get("at", 0) <= PENDING_MAX_AGE}
        while len(pending) >= MAX_PENDING:
            del pending[min(pending, key=lambda key: pending[key].get("at", 0))]
        pending[state] = {"nonce": nonce, "verifier": verifier, "next": target, "at": now}
        session[_SESSION_PENDING] = pending
        url = await _authorization_url(self.config.client_id, self.redirect_uri,
                                       provider.authorization_endpoint, " ".join(self._scopes(provider)),
                                       state=state, nonce=nonce, verifier=verifier)
        raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})

    async def _finish(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        session = await get_session(request)
        entry = _take_pending(session, query.get("state"))
        error = query.get("error")
        if error is not None:
            shown = error if _PRINTABLE.fullmatch(error) and len(error) <= 64 else "(unreadable)"
            log.warning("login refused at the identity provider", error=shown)
            raise LoginFailed(403, f"the identity provider did not log you in: {shown}")
        if entry is None:
            raise LoginFailed(400, "this answer from the identity provider is not for a login begun in "
                                   "this browser, or was used already (its state does not match)")
        if time.time() - entry.get("at", 0) > PENDING_MAX_AGE:
            raise LoginFailed(400, f"the login took longer than {PENDING_MAX_AGE // 60} minutes")
        code = query.get("code")
        if not code:
            raise LoginFailed(400, "the identity provider's answer carries no authorization code")
        provider = await self._current_provider()
        tokens = await self._exchange(provider, code, str(entry["verifier"]))
        id_token, access_token = tokens.get("id_token"), tokens.get("access_token")
        if not isinstance(id_token, str):
            raise LoginFailed(403, "the identity provider gave no ID token (is \"openid\" among the scopes?)")
        claims = await self._verify(provider, id_token, str(entry["nonce"]),
                                    access_token if isinstance(access_token, str) else None)
        user = self._user(claims)
        groups = await self._groups(provider, claims, access_token if isinstance(access_token, str) else None)
        if len(json.dumps({"user": user, "groups": groups})) > MAX_IDENTITY_JSON:
            raise LoginFailed(403, f"{user} is in too many groups ({len(groups)}) to fit a session: let the "
                                   "provider send fewer in the groups claim")
        # A new session, not the one the login began in: whatever was planted in the browser
        # before the login does not carry over into the logged-in session.
        session = await new_session(request)
        session[_SESSION_USER] = user
        session[_SESSION_GROUPS] = groups
        session[_SESSION_AT] = int(time.time())
        log.info("logged in", user=user, groups=len(groups))
        raise web.HTTPFound(self._local(str(entry.get("next", "/"))), headers={"Cache-Control": "no-store"})

    def _failure(self, exc: LoginFailed) -> web.Response:
        if exc.status >= 500:
            log.warning("login failed", reason=exc.reason)
        else:
            log.info("login refused", reason=exc.reason)
        text = (f"Login failed: {exc.reason}.\n\nLog in again: {self.public_url}/login\n")
        return web.Response(status=exc.status, text=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    def _local(self, path: str) -> str:
        return self._base_path + (safe_next(path) if path else "/")

    # --- the provider ----------------------------------------------------------------------------

    def _scopes(self, provider: _Provider) -> tuple[str, ...]:
        if self.config.scopes is not None:
            return self.config.scopes
        # Some providers (Dex, Okta) send groups only when asked for the scope of that name.
        extra = ("groups",) if "groups" in provider.scopes_supported else ()
        return DEFAULT_LOGIN_SCOPES + extra

    async def _current_provider(self, *, refetch_keys: bool = False) -> _Provider:
        async with self._lock:
            now = time.monotonic()
            provider = self._provider
            if provider is None or now - provider.fetched_at > PROVIDER_TTL:
                provider = await self._discover()
            elif refetch_keys and now - self._keys_fetched_at > KEYS_REFETCH_INTERVAL:
                keys = await self._fetch_keys(provider.jwks_uri)
                provider = replace(provider, keys=keys)
                self._keys_fetched_at = now
            self._provider = provider
            return provider

    async def _discover(self) -> _Provider:
        url = self.config.discovery_url
        document = await self._get_json(url, "discovery document")
        issuer = document.get("issuer")
        if issuer != self.config.issuer:
            raise ProviderUnreachable(f"the identity provider's discovery document ({url}) names the issuer "
                                      f"{_shown(issuer)}, not {self.config.issuer!r} as [login] issuer says")
        endpoints: dict[str, str | None] = {}
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
            value = document.get(key)
            if value is None and key == "userinfo_endpoint":
                endpoints[key] = None
                continue
            try:
                endpoints[key] = https_url(value) if isinstance(value, str) else None
            except ValueError:
                endpoints[key] = None
            if endpoints[key] is None:
                raise ProviderUnreachable(f"the identity provider's discovery document ({url}) has no usable "
                                          f"{key} (an https:// URL)")
        scopes = document.get("scopes_supported")
        keys = await self._fetch_keys(str(endpoints["jwks_uri"]))
        self._keys_fetched_at = time.monotonic()
        return _Provider(issuer=issuer, authorization_endpoint=str(endpoints["authorization_endpoint"]),
                         token_endpoint=str(endpoints["token_endpoint"]), jwks_uri=str(endpoints["jwks_uri"]),
                         userinfo_endpoint=endpoints["userinfo_endpoint"],
                         scopes_supported=tuple(s for s in scopes if isinstance(s, str))
                         if isinstance(scopes, list) else (),
                         keys=keys, fetched_at=time.monotonic())

    async def _fetch_keys(self, url: str) -> KeySet:
        document = await self._get_json(url, "keys (JWKS)")
        try:
            return KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, KeyError, TypeError, ValueError):
            raise ProviderUnreachable(f"the identity provider's keys at {url} are not a usable JWKS") \
                from None

    async def _get_json(self, url: str, what: str, *, token: str | None = None) -> dict[str, Any]:
        """The JSON object the provider serves at `url` (its `what`), asked with `token` if given."""
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
                response = await client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise ProviderUnreachable(f"the identity provider cannot be reached for its {what} at {url} "
                                      f"({type(exc).__name__})") from None
        if response.status_code != 200:
            raise ProviderUnreachable(f"the identity provider answered {response.status_code} for its {what} "
                                      f"at {url}")
        try:
            document = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise ProviderUnreachable(f"the identity provider's {what} at {url} is not a JSON object")
        return document

    async def _exchange(self, provider: _Provider, code: str, verifier: str) -> dict[str, Any]:
        try:
            return await _redeem_code(self.config.client_id, self._client_secret, self.redirect_uri,
                                      provider.token_endpoint, code, verifier, self._timeout)
        except OAuthError as exc:
            error = exc.error if isinstance(exc.error, str) and _PRINTABLE.fullmatch(exc.error) else "refused"
            raise LoginFailed(400, f"the identity provider refused to redeem the authorization code "
                                   f"({error[:64]}): it may have been used already or have expired") from None
        except httpx.HTTPStatusError as exc:
            raise ProviderUnreachable(f"the identity provider's token endpoint answered "
                                      f"{exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            raise ProviderUnreachable(f"the identity provider's token endpoint cannot be reached "
                                      f"({type(exc).__name__})") from None
        except ValueError:
            raise ProviderUnreachable("the identity provider's token endpoint did not answer JSON") from None

    async def _verify(self, provider: _Provider, id_token: str, nonce: str,
                      access_token: str | None) -> dict[str, Any]:
        for attempt in (1, 2):
            try:
                return verify_id_token(id_token, keys=provider.keys, issuer=provider.issuer,
                                       client_id=self.config.client_id, nonce=nonce,
                                       access_token=access_token)
            except InvalidKeyIdError:
                if attempt == 2:
                    break
                provider = await self._current_provider(refetch_keys=True)
        raise LoginFailed(403, "the ID token is signed with a key the identity provider does not publish")

    def _user(self, claims: dict[str, Any]) -> str:
        claim = self.config.username_claim
        user = claims.get(claim)
        if not isinstance(user, str) or not user:
            raise LoginFailed(403, f"the ID token has no {claim!r} claim to name you by (set [login] "
                                   "username_claim to the claim that holds user names)")
        if not fits("idp", "user", user):
            raise LoginFailed(403, f"your user name {_shown(user)} (claim {claim!r}) cannot name a "
                                   "principal: it must be 1-100 letters, digits, '.', '_', '@', '+' or '-', "
                                   "starting with a letter, digit or '_'")
        return user

    async def _groups(self, provider: _Provider, claims: dict[str, Any],
                      access_token: str | None) -> list[str]:
        claim = self.config.groups_claim
        value = claims.get(claim)
        if value is None and provider.userinfo_endpoint is not None and access_token is not None:
            value = await self._userinfo_groups(provider.userinfo_endpoint, access_token, claims.get("sub"))
        if value is None:
            return []
        if not isinstance(value, list):
            log.warning("the groups claim is not a list; no groups taken", claim=claim)
            return []
        groups = list(dict.fromkeys(group for group in value if isinstance(group, str)
                                    and fits("idp", "groups", group)))
        if len(groups) < len(value):
            log.info("groups that cannot be principals left out", claim=claim,
                     left_out=len(value) - len(groups))
        return groups

    async def _userinfo_groups(self, url: str, access_token: str, subject: object) -> object:
        info = await self._get_json(url, "userinfo", token=access_token)
        # OpenID Connect: userinfo of another subject than the ID token's must not be used.
        if info.get("sub") != subject:
            raise LoginFailed(403, "the identity provider's userinfo is about another user than its ID token")
        return info.get(self.config.groups_claim)


def _pending(session: Session) -> dict[str, dict[str, Any]]:
    value = session.get(_SESSION_PENDING)
    if not isinstance(value, dict):
        return {}
    return {key: entry for key, entry in value.items() if isinstance(key, str) and isinstance(entry, dict)}


def _take_pending(session: Session, state: str | None) -> dict[str, Any] | None:
    """The login begun with `state`, forgotten at once: each state is good for one answer."""
    pending = _pending(session)
    found = None
    if state:
        for key in list(pending):
            if hmac.compare_digest(key.encode(), state.encode("utf-8", "surrogateescape")):
                found = pending.pop(key)
    if found is not None:
        session[_SESSION_PENDING] = pending
    return found


def _shown(value: object) -> str:
    """A value from the provider as a message may quote it: short, printable."""
    text = value if isinstance(value, str) else repr(value)
    text = text if _PRINTABLE.fullmatch(text) else text.encode("ascii", "backslashreplace").decode("ascii")
    return repr(text[:100] + ("..." if len(text) > 100 else ""))


# --- Authlib, which has no type hints, behind typed functions ------------------------------------


async def _authorization_url(client_id: str, redirect_uri: str, endpoint: str, scope: str, *,
                             state: str, nonce: str, verifier: str) -> str:
    async with AsyncOAuth2Client(client_id=client_id, redirect_uri=redirect_uri, scope=scope,
                                 code_challenge_method="S256") as client:
        url, _ = client.create_authorization_url(endpoint, state=state, code_verifier=verifier, nonce=nonce)
    return str(url)


async def _redeem_code(client_id: str, client_secret: str, redirect_uri: str, endpoint: str, code: str,
                       verifier: str, timeout: float) -> dict[str, Any]:
    async with AsyncOAuth2Client(client_id=client_id, client_secret=client_secret, redirect_uri=redirect_uri,
                                 code_challenge_method="S256", timeout=timeout) as client:
        token = await client.fetch_token(endpoint, grant_type="authorization_code", code=code,
                                         code_verifier=verifier)
    return dict(token)
