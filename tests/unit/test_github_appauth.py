"""The GitHub App's JWT and installation tokens, checked against the GitHub emulator."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fakes.github_api import GitHubEmulator, ManualClock

from runner.errors import InputError
from runner.secrets import SecretFileError
from runner.sources.github.appauth import (
    AppAuth,
    GitHubAuthError,
    app_jwt,
    load_private_key,
    parse_token_response,
)
from runner.sources.github.client import GitHubClient, GitHubHTTPError

REPO = "CliMA/ClimaAtmos.jl"


@pytest.fixture
async def gh(clock: ManualClock) -> AsyncIterator[GitHubEmulator]:
    async with GitHubEmulator(clock=clock.time) as emulator:
        emulator.add_repository(REPO, installation=7)
        yield emulator


@pytest.fixture
def client(gh: GitHubEmulator, http: aiohttp.ClientSession, clock: ManualClock) -> GitHubClient:
    return GitHubClient(http, api_url=gh.url, auth=AppAuth(gh.app_id, gh.app_private_key_pem), clock=clock)


def test_the_jwt_is_backdated_a_minute_and_lives_ten_minutes(gh: GitHubEmulator) -> None:
    token = app_jwt(gh.app_id, gh.app_private_key_pem, now=1_800_000_000.7)
    public = serialization.load_pem_private_key(gh.app_private_key_pem.encode(), None).public_key()
    claims = jwt.decode(token, public, algorithms=["RS256"],
                        options={"verify_exp": False, "verify_iat": False})
    assert claims == {"iat": 1_800_000_000 - 60, "exp": 1_800_000_000 + 540, "iss": str(gh.app_id)}
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    # A pure function of its inputs: the same time gives the same token.
    assert app_jwt(gh.app_id, gh.app_private_key_pem, now=1_800_000_000.2) == token


@pytest.mark.parametrize("github_ahead", [-59, 0, 59])
async def test_github_accepts_the_jwt_despite_a_minute_of_clock_difference(
        gh: GitHubEmulator, clock: ManualClock, github_ahead: int) -> None:
    token = app_jwt(gh.app_id, gh.app_private_key_pem, now=clock.now)
    clock.advance(github_ahead)
    async with aiohttp.ClientSession() as session, session.get(
            gh.url + "/app", headers={"Authorization": f"Bearer {token}", "User-Agent": "t",
                                      "Accept": "application/vnd.github+json",
                                      "X-GitHub-Api-Version": "2022-11-28"}) as resp:
        assert resp.status == 200, await resp.text()


def write_key(path: Path, pem: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(pem)
    os.chmod(path, mode)
    return path


def test_the_private_key_file_must_be_private_and_rsa(tmp_path: Path, gh: GitHubEmulator) -> None:
    good = write_key(tmp_path / "app.pem", gh.app_private_key_pem.encode())
    assert load_private_key(good).key_size == 2048
    with pytest.raises(SecretFileError, match="mode 0644"):
        load_private_key(write_key(tmp_path / "open.pem", gh.app_private_key_pem.encode(), 0o644))
    with pytest.raises(InputError, match=r"garbage\.pem.*not a PEM private key"):
        load_private_key(write_key(tmp_path / "garbage.pem", b"-----BEGIN NOTHING-----\n"))
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(InputError, match="RSA keys"):
        load_private_key(write_key(tmp_path / "ec.pem", ec_pem))


def test_token_answers_are_parsed_and_tokens_kept_out_of_reprs() -> None:
    long_token = "ghs_12345_" + "x" * 510
    token = parse_token_response(3, {"token": long_token, "expires_at": "2026-11-26T11:00:00Z"})
    assert token.token == long_token and token.expires_at == 1795690800.0  # 2026-11-26T11:00:00Z
    assert long_token not in repr(token)
    with pytest.raises(GitHubAuthError, match="no token"):
        parse_token_response(3, {"expires_at": "2026-11-26T11:00:00Z"})
    with pytest.raises(GitHubAuthError, match="not a time"):
        parse_token_response(3, {"token": "t", "expires_at": "soon"})


async def test_the_installation_is_found_once_and_its_token_reused_until_near_expiry(
        gh: GitHubEmulator, client: GitHubClient, clock: ManualClock) -> None:
    for _ in range(3):
        await client.get(f"/repos/{REPO}/pulls")
    assert gh.count("apps/get-repo-installation") == 1
    assert gh.count("apps/create-installation-access-token") == 1
    [minted] = gh.requests("apps/create-installation-access-token")
    assert minted.path == "/app/installations/7/access_tokens"
    clock.advance(3600 - 301)   # the token has five minutes left: still used
    await client.get(f"/repos/{REPO}/pulls")
    assert gh.count("apps/create-installation-access-token") == 1
    clock.advance(2)            # under five minutes left: replaced before GitHub refuses it
    await client.get(f"/repos/{REPO}/pulls")
    assert gh.count("apps/create-installation-access-token") == 2
    assert all(r.status in (200, 304) for r in gh.requests("pulls/list"))


async def test_concurrent_first_requests_share_one_token(gh: GitHubEmulator, client: GitHubClient) -> None:
    await client.get(f"/repos/{REPO}")   # the installation lookup
    await asyncio.gather(*(client.get(f"/repos/{REPO}/pulls") for _ in range(5)))
    assert gh.count("apps/create-installation-access-token") == 1


async def test_an_expired_token_is_replaced_once(gh: GitHubEmulator, client: GitHubClient) -> None:
    await client.get(f"/repos/{REPO}/pulls")
    gh.expire_tokens()
    assert await client.get(f"/repos/{REPO}/pulls") == []
    assert [r.status for r in gh.requests("pulls/list")] == [200, 401, 304]
    assert gh.count("apps/create-installation-access-token") == 2


async def test_a_second_401_stands(gh: GitHubEmulator, client: GitHubClient) -> None:
    gh.fail("pulls/list", 401, times=2, message="Bad credentials")
    with pytest.raises(GitHubHTTPError, match=r"GET /repos/CliMA/ClimaAtmos\.jl/pulls: 401 Bad credentials"):
        await client.get(f"/repos/{REPO}/pulls")
    assert gh.count("pulls/list") == 2
    assert gh.count("apps/create-installation-access-token") == 2


async def test_a_repository_without_the_app_is_a_clear_error(gh: GitHubEmulator,
                                                             client: GitHubClient) -> None:
    gh.add_repository("someone/else", installation=None)
    with pytest.raises(GitHubHTTPError) as info:
        await client.get("/repos/someone/else/pulls")
    assert info.value.status == 404
    assert "GET /repos/someone/else/installation: 404 Not Found" in str(info.value)


async def test_the_installation_in_a_webhook_can_be_named(gh: GitHubEmulator, client: GitHubClient) -> None:
    await client.get(f"/repos/{REPO}/pulls", installation=7)
    assert gh.count("apps/get-repo-installation") == 0
    assert gh.requests("pulls/list")[0].installation == 7
