"""Logging in to the hub's dashboard at a real OpenID Connect provider (oidc-provider-mock, Authlib's
authorization server), driven as a browser would: the redirects followed by hand, the provider's
login form posted, the session cookie kept in a cookie jar. And the `[login]` section of a config."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import stat
import textwrap
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from fakes.oidc_issuer import OidcIssuerEmulator
from fakes.oidc_provider import running_provider
from joserfc.jwk import KeySet
from yarl import URL

from runner.config import LoginConfig, parse_config_text
from runner.errors import InputError
from runner.secrets import SecretFileError
from runner.web.login import Login, LoginFailed, safe_next, verify_id_token
from runner.web.sessions import (
    COOKIE_NAME,
    SECURE_COOKIE_NAME,
    check_csrf,
    csrf_token,
    load_session_key,
    setup_sessions,
)

CLIENT_ID = "hpc-dashboard"
USERS: dict[str, dict[str, object]] = {
    "alice": {"preferred_username": "alice", "groups": ["hpc-users", "ocean modellers", "climate"]},
    "mallory": {"preferred_username": "mallory/../root", "groups": []},
    "bob": {"preferred_username": "bob"},
}


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    with running_provider(USERS) as url:
        yield url


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text("s3cret-of-the-dashboard-client\n")
    path.chmod(0o600)
    return path


@dataclass
class Dashboard:
    url: str
    login: Login
    key: bytes
    client: aiohttp.ClientSession

    @property
    def cookie_name(self) -> str:
        return SECURE_COOKIE_NAME if self.login.secure else COOKIE_NAME

    async def whoami(self) -> dict[str, Any]:
        async with self.client.get(f"{self.url}/whoami") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def begin(self, next_path: str = "/jobs") -> str:
        """GET /login: the provider's authorization URL it redirects to."""
        async with self.client.get(f"{self.url}/login", params={"next": next_path},
                                   allow_redirects=False) as response:
            assert response.status == 302, await response.text()
            return response.headers["Location"]

    async def at_provider(self, authorize: str, **form: str) -> str:
        """The person's answer at the provider's login form: the callback URL it redirects to."""
        async with self.client.post(authorize, data=form, allow_redirects=False) as response:
            assert response.status == 302, await response.text()
            return response.headers["Location"]

    async def callback(self, url: str) -> tuple[int, str, str | None]:
        async with self.client.get(url, allow_redirects=False) as response:
            return response.status, await response.text(), response.headers.get("Location")

    async def log_in(self, sub: str = "alice", next_path: str = "/jobs") -> tuple[int, str, str | None]:
        return await self.callback(await self.at_provider(await self.begin(next_path), sub=sub))

    def session(self) -> dict[str, Any]:
        """The session as the hub reads it from the cookie (the test holds the key)."""
        data: dict[str, Any] = json.loads(Fernet(base64.urlsafe_b64encode(self.key)).decrypt(self._cookie()))
        return data

    def replace_session(self, data: Mapping[str, Any]) -> None:
        token = Fernet(base64.urlsafe_b64encode(self.key)).encrypt(json.dumps(data).encode()).decode()
        self.client.cookie_jar.update_cookies({self.cookie_name: token}, URL(self.url))

    def _cookie(self) -> str:
        cookie = self.client.cookie_jar.filter_cookies(URL(self.url)).get(self.cookie_name)
        assert cookie is not None, "no session cookie"
        return cookie.value


def login_config(issuer: str, secret_file: Path, **overrides: Any) -> LoginConfig:
    return LoginConfig(issuer=issuer, client_id=CLIENT_ID, client_secret_file=secret_file, **overrides)


@asynccontextmanager
async def dashboard(config: LoginConfig, state_dir: Path, *, https: bool = False,
                    prefix: str = "") -> AsyncIterator[Dashboard]:
    """A hub-like app on 127.0.0.1: sessions, the login routes, `/whoami` and `/csrf`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    public_url = ("https://hub.example.org" if https else url) + prefix
    login = Login(config, public_url)
    key = load_session_key(state_dir)
    app = web.Application()
    setup_sessions(app, key, secure=login.secure)
    login.add_routes(app)

    async def whoami(request: web.Request) -> web.Response:
        viewer = await login.viewer(request)
        if viewer is None:
            return web.json_response({"name": None, "principals": []})
        return web.json_response({"name": viewer.name, "principals": list(viewer.principals)})

    async def csrf(request: web.Request) -> web.Response:
        return web.Response(text=await csrf_token(request))

    async def change(request: web.Request) -> web.Response:
        await check_csrf(request, request.headers.get("X-CSRF-Token"))
        return web.Response(text="changed")

    app.router.add_get("/whoami", whoami)
    app.router.add_get("/csrf", csrf)
    app.router.add_post("/change", change)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
            yield Dashboard(url, login, key, client)
    finally:
        await runner.cleanup()


# --- the flow ------------------------------------------------------------------------------------


async def test_a_login_gives_the_viewer_its_idp_user_and_group_principals(
        provider: str, secret_file: Path, tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        assert await hub.whoami() == {"name": None, "principals": []}
        authorize = await hub.begin("/jobs?state=running")
        assert authorize.startswith(provider + "/oauth2/authorize?")
        params = {key: values[0] for key, values in parse_qs(urlsplit(authorize).query).items()}
        pending = hub.session()["session"]["login_pending"][params["state"]]
        # PKCE: the challenge is the S256 digest of the verifier the hub keeps, never sent here.
        digest = hashlib.sha256(pending["verifier"].encode()).digest()
        assert params["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert params["code_challenge_method"] == "S256"
        assert params["nonce"] == pending["nonce"] and pending["verifier"] not in authorize
        assert params["redirect_uri"] == hub.url + "/login/callback"
        assert params["client_id"] == CLIENT_ID and params["scope"].split() == ["openid", "profile"]

        status, _, location = await hub.callback(await hub.at_provider(authorize, sub="alice"))
        assert (status, location) == (302, "/jobs?state=running")
        # "ocean modellers" cannot be a principal (a space): left out, the others kept.
        assert await hub.whoami() == {
            "name": "alice", "principals": ["idp:user:alice", "idp:group:hpc-users", "idp:group:climate"]}
        # The session holds who logged in, and no longer the login's state, nonce or verifier.
        assert "login_pending" not in hub.session()["session"]


async def test_a_session_outlives_a_restart_of_the_hub(provider: str, secret_file: Path,
                                                       tmp_path: Path) -> None:
    config = login_config(provider, secret_file)
    async with dashboard(config, tmp_path / "state") as first:
        await first.log_in("bob")
        cookie = first._cookie()
    async with dashboard(config, tmp_path / "state") as second:
        second.client.cookie_jar.update_cookies({COOKIE_NAME: cookie}, URL(second.url))
        assert await second.whoami() == {"name": "bob", "principals": ["idp:user:bob"]}
    # Another state directory, another key: the same cookie is nobody there.
    async with dashboard(config, tmp_path / "other-state") as third:
        third.client.cookie_jar.update_cookies({COOKIE_NAME: cookie}, URL(third.url))
        assert (await third.whoami())["name"] is None


async def test_groups_are_asked_of_userinfo_when_the_id_token_has_none(
        provider: str, secret_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def userinfo_requests() -> int:
        return sum("/userinfo" in record.getMessage() for record in caplog.records)

    caplog.set_level(logging.INFO, logger="werkzeug")
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        assert (await hub.log_in("alice"))[0] == 302
        assert userinfo_requests() == 0          # alice's ID token names her groups
        # bob's ID token has no groups claim: the provider's userinfo is asked (it has none either).
        assert (await hub.log_in("bob"))[0] == 302
        assert userinfo_requests() == 1
        assert await hub.whoami() == {"name": "bob", "principals": ["idp:user:bob"]}


async def test_a_login_lasts_twelve_hours_however_active(provider: str, secret_file: Path,
                                                        tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        await hub.log_in("alice")
        async with hub.client.get(f"{hub.url}/csrf") as response:     # a later write to the session
            assert response.status == 200
        data = hub.session()
        data["session"]["authenticated_at"] -= 12 * 3600 - 60
        hub.replace_session(data)
        assert (await hub.whoami())["name"] == "alice"
        data["session"]["authenticated_at"] -= 120
        hub.replace_session(data)
        assert (await hub.whoami())["name"] is None


async def test_a_user_name_that_cannot_be_a_principal_is_refused(
        provider: str, secret_file: Path, tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        status, text, _ = await hub.log_in("mallory")
        assert status == 403
        assert "your user name 'mallory/../root'" in text and "cannot name a principal" in text
        assert (await hub.whoami())["name"] is None


async def test_a_missing_username_claim_names_the_setting(provider: str, secret_file: Path,
                                                         tmp_path: Path) -> None:
    config = login_config(provider, secret_file, username_claim="uid")
    async with dashboard(config, tmp_path / "state") as hub:
        status, text, _ = await hub.log_in("alice")
        assert status == 403 and "no 'uid' claim" in text and "username_claim" in text


async def test_a_refusal_at_the_provider_is_a_page_saying_so(provider: str, secret_file: Path,
                                                             tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        callback = await hub.at_provider(await hub.begin(), action="deny")
        assert "error=access_denied" in callback
        status, text, _ = await hub.callback(callback)
        assert status == 403 and "did not log you in: access_denied" in text
        assert "Traceback" not in text
        assert (await hub.whoami())["name"] is None


async def test_a_callback_with_another_state_is_refused(provider: str, secret_file: Path,
                                                        tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        callback = await hub.at_provider(await hub.begin(), sub="alice")
        query = parse_qs(urlsplit(callback).query)
        code = query["code"][0]
        forged = f"{hub.url}/login/callback?code={code}&state=not-the-one-sent"
        status, text, _ = await hub.callback(forged)
        assert status == 400 and "state does not match" in text and code not in text
        status, text, _ = await hub.callback(f"{hub.url}/login/callback?code={code}")
        assert status == 400 and "state does not match" in text
        assert (await hub.whoami())["name"] is None


async def test_a_replayed_callback_is_refused(provider: str, secret_file: Path, tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        callback = await hub.at_provider(await hub.begin(), sub="alice")
        before = hub._cookie()            # the session still holding the login's state
        status, _, _ = await hub.callback(callback)
        assert status == 302
        # The same answer again in this browser: its state was used up.
        status, text, _ = await hub.callback(callback)
        assert status == 400 and "used already" in text
        # With the cookie from before the login (a copy taken by whoever saw the callback URL): the
        # state matches, but the provider redeems a code only once.
        hub.client.cookie_jar.clear()
        hub.client.cookie_jar.update_cookies({COOKIE_NAME: before}, URL(hub.url))
        status, text, _ = await hub.callback(callback)
        code = parse_qs(urlsplit(callback).query)["code"][0]
        assert status == 400 and "refused to redeem the authorization code (invalid_grant)" in text
        assert code not in text
        assert (await hub.whoami())["name"] is None


async def test_an_id_token_with_another_nonce_is_refused(provider: str, secret_file: Path,
                                                        tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        authorize = await hub.begin()
        state = parse_qs(urlsplit(authorize).query)["state"][0]
        # The session now expects another nonce than the one the provider puts in the ID token.
        data = hub.session()
        data["session"]["login_pending"][state]["nonce"] = "a-nonce-of-another-login"
        hub.replace_session(data)
        status, text, _ = await hub.callback(await hub.at_provider(authorize, sub="alice"))
        assert status == 403 and "not for this login (invalid_claim: nonce)" in text
        assert (await hub.whoami())["name"] is None


async def test_next_never_leaves_the_site(provider: str, secret_file: Path, tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        for target in ("//evil.example", "https://evil.example/x", "/\\evil.example"):
            status, _, location = await hub.log_in("alice", next_path=target)
            assert (status, location) == (302, "/")
    for target in ("//evil.example/", "https://evil.example", "http:/evil.example", "javascript:alert(1)",
                   "evil.example", "/\\evil.example", "/\t/evil.example", "", None, "/" + "x" * 3000):
        assert safe_next(target) == "/", target
    assert safe_next("/jobs/01H?state=failed&q=a%20b") == "/jobs/01H?state=failed&q=a%20b"


async def test_behind_a_path_prefix_the_redirects_stay_under_it(provider: str, secret_file: Path,
                                                                tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state", prefix="/ci") as hub:
        authorize = await hub.begin("/jobs")
        assert parse_qs(urlsplit(authorize).query)["redirect_uri"] == [hub.url + "/ci/login/callback"]
        callback = await hub.at_provider(authorize, sub="alice")
        # The provider sends the browser to the public URL; the proxy would strip the prefix.
        status, _, location = await hub.callback(callback.replace("/ci/login/", "/login/"))
        assert (status, location) == (302, "/ci/jobs")


async def test_logout_needs_the_csrf_token_and_ends_the_session(provider: str, secret_file: Path,
                                                                tmp_path: Path) -> None:
    async with dashboard(login_config(provider, secret_file), tmp_path / "state") as hub:
        await hub.log_in("alice")
        async with hub.client.post(f"{hub.url}/logout", allow_redirects=False) as response:
            assert response.status == 403 and "no CSRF token" in await response.text()
        async with hub.client.post(f"{hub.url}/logout", data={"csrf_token": "guessed"},
                                   allow_redirects=False) as response:
            assert response.status == 403 and "not this session's" in await response.text()
        assert (await hub.whoami())["name"] == "alice"
        async with hub.client.get(f"{hub.url}/csrf") as response:
            token = await response.text()
        async with hub.client.get(f"{hub.url}/csrf") as response:
            assert await response.text() == token          # one token for the session
        async with hub.client.post(f"{hub.url}/change", headers={"X-CSRF-Token": token}) as response:
            assert (response.status, await response.text()) == (200, "changed")
        async with hub.client.post(f"{hub.url}/logout", data={"csrf_token": token},
                                   allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (303, "/")
        assert await hub.whoami() == {"name": None, "principals": []}
        # The token died with the session.
        async with hub.client.post(f"{hub.url}/change", headers={"X-CSRF-Token": token}) as response:
            assert response.status == 403


async def test_the_session_cookie_is_httponly_lax_and_secure_over_https(
        provider: str, secret_file: Path, tmp_path: Path) -> None:
    for https in (False, True):
        async with dashboard(login_config(provider, secret_file), tmp_path / "state", https=https) as hub:
            async with hub.client.get(f"{hub.url}/login", allow_redirects=False) as response:
                assert response.status == 302
                headers = response.headers.getall("Set-Cookie")
            assert len(headers) == 1
            attributes = [part.strip().lower() for part in headers[0].split(";")]
            assert attributes[0].startswith((SECURE_COOKIE_NAME if https else COOKIE_NAME).lower() + "=")
            assert "httponly" in attributes and "samesite=lax" in attributes and "path=/" in attributes
            assert ("secure" in attributes) is https
            assert any(part.startswith("max-age=") and int(part.split("=")[1]) <= 12 * 3600
                       for part in attributes)


async def test_an_unreachable_provider_is_a_page_not_a_traceback(secret_file: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # Made without asking the provider anything: the hub starts whether the provider is up or not.
    async with dashboard(login_config(issuer, secret_file), tmp_path / "state") as hub:
        async with hub.client.get(f"{hub.url}/login", allow_redirects=False) as response:
            text = await response.text()
            assert response.status == 502
        assert "cannot be reached" in text and f"{issuer}/.well-known/openid-configuration" in text
        assert "Traceback" not in text


async def test_a_discovery_document_of_another_issuer_is_refused(secret_file: Path, tmp_path: Path) -> None:
    async with OidcIssuerEmulator() as issuer:
        issuer.discovery_issuer_override = "https://elsewhere.example.org"
        async with dashboard(login_config(issuer.url, secret_file), tmp_path / "state") as hub, \
                hub.client.get(f"{hub.url}/login", allow_redirects=False) as response:
            assert response.status == 502
            assert "names the issuer 'https://elsewhere.example.org'" in await response.text()


# --- the ID token --------------------------------------------------------------------------------


async def test_only_a_signed_id_token_of_this_login_is_taken() -> None:
    async with OidcIssuerEmulator() as issuer:
        keys = KeySet.import_key_set(issuer.key_set())  # type: ignore[arg-type]

        def verify(token: str, nonce: str = "n-1") -> dict[str, Any]:
            return verify_id_token(token, keys=keys, issuer=issuer.url, client_id=CLIENT_ID, nonce=nonce)

        def refusal(token: str, nonce: str = "n-1") -> str:
            with pytest.raises(LoginFailed) as caught:
                verify(token, nonce)
            assert caught.value.status == 403
            return caught.value.reason

        good = {"aud": CLIENT_ID, "azp": CLIENT_ID, "nonce": "n-1"}
        assert verify(issuer.mint("generic", **good))["preferred_username"] == "alice"
        assert verify(issuer.mint("generic", alg="ES256", **good))["sub"]
        assert "invalid_claim: nonce" in refusal(issuer.mint("generic", **good), nonce="n-2")
        assert "missing_claim: nonce" in refusal(issuer.mint("generic", aud=CLIENT_ID, azp=CLIENT_ID))
        assert "aud" in refusal(issuer.mint("generic", **{**good, "aud": "another-client"}))
        assert "iss" in refusal(issuer.mint("generic", **{**good, "iss": "https://elsewhere.example"}))
        assert "expired" in refusal(issuer.mint("generic", now=1_600_000_000, **good))
        for attack in ({"alg": "none"}, {"alg": "HS256"}, {"forged": True}):
            assert "does not verify" in refusal(issuer.mint("generic", **attack, **good)), attack


# --- the session key -----------------------------------------------------------------------------


def test_the_session_key_is_made_once_0600_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = load_session_key(state)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(state / "session.key").st_mode) == 0o600
    assert load_session_key(state) == key


def test_a_session_key_open_to_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    load_session_key(state)
    (state / "session.key").chmod(0o644)
    with pytest.raises(SecretFileError) as caught:
        load_session_key(state)
    assert "dashboard session key" in str(caught.value) and "mode 0644" in str(caught.value)
    assert caught.value.fix == f"chmod 600 {state / 'session.key'}"


def test_a_session_key_that_is_not_one_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    load_session_key(state)
    (state / "session.key").write_text("short\n")
    with pytest.raises(SecretFileError) as caught:
        load_session_key(state)
    assert "does not hold 32 bytes" in str(caught.value) and "remove" in caught.value.fix


def test_a_client_secret_open_to_others_stops_the_login_being_made(secret_file: Path) -> None:
    secret_file.chmod(0o640)
    with pytest.raises(SecretFileError) as caught:
        Login(login_config("https://idp.example.org", secret_file), "https://hub.example.org")
    assert "dashboard login's client secret" in str(caught.value)


# --- the [login] section -------------------------------------------------------------------------

HUB = """\
[hub]
listen = "127.0.0.1:8443"
state_dir = "/var/lib/hpc-runner-hub"
agent_tokens_file = "/etc/hpc-runner/hub-agent-tokens"
public_url = "https://hub.example.org/"
"""
LOGIN = """\
[login]
issuer = "https://idp.example.org/realms/hpc"
client_id = "hpc-dashboard"
client_secret_file = "/etc/hpc-runner/dashboard-client-secret"
"""


def error_of(text: str) -> str:
    with pytest.raises(InputError) as caught:
        parse_config_text(textwrap.dedent(text), "config.toml")
    return str(caught.value)


def test_a_login_section_with_its_defaults() -> None:
    config = parse_config_text(HUB + LOGIN)
    assert config.hub is not None
    login = config.hub.login
    assert login == LoginConfig("https://idp.example.org/realms/hpc", "hpc-dashboard",
                                Path("/etc/hpc-runner/dashboard-client-secret"))
    assert (login.username_claim, login.groups_claim, login.scopes) == ("preferred_username", "groups", None)
    assert login.discovery_url == "https://idp.example.org/realms/hpc/.well-known/openid-configuration"
    assert (Path("/etc/hpc-runner/dashboard-client-secret"), "login.client_secret_file") \
        in config.named_secret_files()
    assert parse_config_text(HUB).hub.login is None  # type: ignore[union-attr]


def test_a_login_section_with_every_key() -> None:
    text = HUB + LOGIN + 'username_claim = "email"\ngroups_claim = "roles"\nscopes = ["openid", "groups"]\n'
    login = parse_config_text(text).hub.login  # type: ignore[union-attr]
    assert login is not None
    assert (login.username_claim, login.groups_claim) == ("email", "roles")
    assert login.scopes == ("openid", "groups")


def test_a_login_section_is_read_strictly() -> None:
    assert "config.toml" in error_of(HUB + LOGIN.replace("https://idp", "http://idp"))
    assert "login.issuer" in error_of(HUB + LOGIN.replace("https://idp", "http://idp"))
    assert "must use https://" in error_of(HUB + LOGIN.replace("https://idp", "http://idp"))
    loopback = parse_config_text(HUB + LOGIN.replace("https://idp.example.org", "http://127.0.0.1:5556"))
    assert loopback.hub is not None and loopback.hub.login is not None
    assert "login.issuer" in error_of(HUB + LOGIN.replace("/realms/hpc", "/realms/hpc?x=1"))
    without_client = LOGIN.replace('client_id = "hpc-dashboard"\n', "")
    assert "login.client_id: is required" in error_of(HUB + without_client)
    assert "login.client_secret_file: is required" in error_of(
        HUB + LOGIN.replace('client_secret_file = "/etc/hpc-runner/dashboard-client-secret"\n', ""))
    relative = LOGIN.replace('"/etc/hpc-runner/dashboard', '"etc/dash')
    assert "login.client_secret_file" in error_of(HUB + relative)
    assert "login.client_id" in error_of(HUB + LOGIN.replace('"hpc-dashboard"', '"two words"'))
    assert "login.scopes" in error_of(HUB + LOGIN + 'scopes = ["openid profile"]\n')
    assert 'login.scopes: must include "openid"' in error_of(HUB + LOGIN + 'scopes = ["profile"]\n')
    assert "login.groups_claim" in error_of(HUB + LOGIN + "groups_claim = 3\n")
    assert "login.client_secret: unknown key" in error_of(HUB + LOGIN + 'client_secret = "inline"\n')


def test_a_login_section_needs_the_hubs_public_url() -> None:
    assert "login: logs people in to the hub's dashboard: it needs a [hub] section with public_url" \
        in error_of(LOGIN)
    gateway = HUB.replace("[hub]", "[gateway]").replace('public_url = "https://hub.example.org/"\n',
                                                        'webhook_secret_file = "/etc/hpc-runner/hook"\n')
    assert "it needs a [hub] section with public_url" in error_of(gateway + LOGIN)
    with_url = parse_config_text(gateway + 'public_url = "https://hub.example.org"\n' + LOGIN)
    assert with_url.hub is not None and with_url.hub.login is not None
