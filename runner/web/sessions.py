"""The dashboard's sessions: an encrypted cookie, the key it is encrypted with, and the CSRF token
every state-changing request must carry.

The session lives in the cookie itself (encrypted and authenticated with Fernet), so the hub keeps
nothing per visitor; the key is kept in the hub's state directory, so sessions survive a restart.
The cookie is HttpOnly (no script reads it), SameSite=Lax (the identity provider's redirect back
is a cross-site top-level GET, which must still carry the cookie holding the login's state, nonce
and PKCE verifier; cross-site POSTs do not carry it), and Secure when the hub's public URL is https.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import os
import secrets
from pathlib import Path

from aiohttp import web
from aiohttp_session import get_session
from aiohttp_session import setup as setup_session_middleware
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from runner.secrets import SecretFileError, read_secret_file, user_name
from runner.sqlitefile import prepare_state_dir

SESSION_KEY_FILE = "session.key"
SESSION_KEY_BYTES = 32
# How long a login lasts, however active its holder: then the provider is asked again.
SESSION_MAX_AGE = 12 * 3600
COOKIE_NAME = "hpc_runner_session"
# With Secure, the `__Host-` prefix makes browsers refuse the cookie set for a parent domain or
# another path, so a neighbouring site cannot plant a session of its choosing.
SECURE_COOKIE_NAME = "__Host-hpc_runner_session"
# Where a form puts the token, or a script's request the header.
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_CSRF_SESSION_KEY = "csrf"
_WHAT = "dashboard session key"


def load_session_key(state_dir: Path) -> bytes:
    """The key of the session cookies, `state_dir/session.key`, made (0600) on first use.

    A key file that others may read is refused (SecretFileError saying how to fix it): whoever
    holds the key can forge any session.
    """
    prepare_state_dir(state_dir, holds="the dashboard's session key")
    path = state_dir / SESSION_KEY_FILE
    _create_key_file(path)
    text = read_secret_file(path, what=_WHAT)
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != SESSION_KEY_BYTES:
        raise SecretFileError(f"{_WHAT} {path} does not hold {SESSION_KEY_BYTES} bytes in base64",
                              path=path, fix=f"remove {path}: the hub makes a new one when it starts "
                                             "(everyone logged in must log in again)")
    return key


def _create_key_file(path: Path) -> None:
    # O_EXCL: two hubs starting at once on one state directory keep whichever key was written first.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return  # a symbolic link: read_secret_file refuses it, saying so
        raise SecretFileError(f"{_WHAT} {path} cannot be created: {exc.strerror}", path=path,
                              fix=f"make {path.parent} writable by {user_name(os.geteuid())}") from None
    try:
        os.write(descriptor, base64.urlsafe_b64encode(secrets.token_bytes(SESSION_KEY_BYTES)) + b"\n")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def cookie_name(*, secure: bool) -> str:
    return SECURE_COOKIE_NAME if secure else COOKIE_NAME


# The agent's own dashboard names its cookie apart: browsers keep cookies per host, not per port,
# so a hub and an agent both forwarded to localhost would otherwise overwrite each other's session
# (and its CSRF token) at each visit.
AGENT_COOKIE_NAME = "hpc_runner_agent_session"


def setup_sessions(app: web.Application, key: bytes, *, secure: bool, name: str | None = None) -> None:
    """Sessions for `app`'s handlers (before the app starts): `key` from `load_session_key`,
    `secure` when the hub's public URL is https; `name` the cookie's, if not the hub's."""
    if len(key) != SESSION_KEY_BYTES:
        raise ValueError(f"a session key is {SESSION_KEY_BYTES} bytes, not {len(key)}")
    storage = EncryptedCookieStorage(key, cookie_name=name or cookie_name(secure=secure),
                                     max_age=SESSION_MAX_AGE, path="/", secure=secure, httponly=True,
                                     samesite="Lax")
    setup_session_middleware(app, storage)


async def csrf_token(request: web.Request) -> str:
    """This session's CSRF token, made on first use; forms send it back as `csrf_token`."""
    session = await get_session(request)
    token = session.get(_CSRF_SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[_CSRF_SESSION_KEY] = token
    return token


async def check_csrf(request: web.Request, submitted: str | None) -> None:
    """Refuse (403) a state-changing request whose token is missing or not this session's."""
    if not submitted:
        raise _forbidden(f"the request carries no CSRF token (the form field {CSRF_FIELD!r} or the "
                         f"header {CSRF_HEADER}): reload the page and try again")
    session = await get_session(request)
    expected = session.get(_CSRF_SESSION_KEY)
    if not isinstance(expected, str) or not expected or not hmac.compare_digest(
            submitted.encode("utf-8", "surrogateescape"), expected.encode("utf-8")):
        raise _forbidden("the request's CSRF token is not this session's (the session ended or the "
                         "request came from another site): reload the page and try again")


def _forbidden(text: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=text + "\n", headers={"Cache-Control": "no-store"})
