"""Tests of the OIDC issuer emulator itself, driven by a plain aiohttp client and PyJWT."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest

from .oidc_issuer import COMMIT, DROP, LIFETIME, OidcIssuerEmulator

DOCUMENTED = {
    "github": {"jti", "sub", "aud", "ref", "sha", "repository", "repository_owner", "actor_id",
               "repository_visibility", "repository_id", "repository_owner_id", "run_id", "run_number",
               "run_attempt", "runner_environment", "actor", "workflow", "workflow_ref", "workflow_sha",
               "head_ref", "base_ref", "event_name", "ref_type", "job_workflow_ref", "job_workflow_sha",
               "iss", "nbf", "exp", "iat"},
    "buildkite": {"iss", "sub", "aud", "iat", "nbf", "exp", "organization_slug", "pipeline_slug",
                  "build_number", "build_branch", "build_tag", "build_commit", "step_key", "job_id",
                  "agent_id", "build_source", "runner_environment"},
    "gitlab": {"namespace_id", "namespace_path", "project_id", "project_path", "user_id", "user_login",
               "user_email", "pipeline_id", "pipeline_source", "job_id", "ref", "ref_type", "ref_path",
               "ref_protected", "environment", "runner_id", "runner_environment", "sha", "jti", "iss",
               "iat", "nbf", "exp", "sub", "aud"},
    "generic": {"iss", "sub", "aud", "exp", "iat", "preferred_username", "email", "groups"},
}


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuerEmulator]:
    async with OidcIssuerEmulator() as emulator:
        yield emulator


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return json.loads(await response.read())


async def published_keys(issuer: OidcIssuerEmulator) -> dict[str, jwt.PyJWK]:
    document = await get_json(issuer.jwks_uri)
    return {entry["kid"]: jwt.PyJWK(entry) for entry in document["keys"]}


async def verify(issuer: OidcIssuerEmulator, token: str) -> dict[str, Any]:
    keys = await published_keys(issuer)
    header = jwt.get_unverified_header(token)
    claims: dict[str, Any] = jwt.decode(token, keys[header["kid"]], algorithms=[header["alg"]],
                                        options={"verify_aud": False})
    return claims


async def test_discovery_names_the_issuer_and_its_key_set(issuer: OidcIssuerEmulator) -> None:
    discovery = await get_json(issuer.url + "/.well-known/openid-configuration")
    assert (discovery["issuer"], discovery["jwks_uri"]) == (issuer.url, issuer.url + "/.well-known/jwks")
    document = await get_json(discovery["jwks_uri"])
    assert [(key["kid"], key["kty"], key["alg"], key["use"]) for key in document["keys"]] == [
        ("rsa-1", "RSA", "RS256", "sig"), ("rsa-2", "RSA", "RS256", "sig"), ("ec-1", "EC", "ES256", "sig")]
    assert all("d" not in key for key in document["keys"])
    assert issuer.requests == ["/.well-known/openid-configuration", "/.well-known/jwks"]
    assert issuer.key_set_requests() == 1


@pytest.mark.parametrize("kind", ["github", "buildkite", "gitlab", "generic"])
async def test_each_kind_of_token_has_its_documented_claims_and_verifies(
        issuer: OidcIssuerEmulator, kind: Any) -> None:
    claims = await verify(issuer, issuer.mint(kind))
    assert DOCUMENTED[kind] <= set(claims)
    assert (claims["iss"], claims["exp"] - claims["iat"]) == (issuer.url, LIFETIME)


async def test_github_tokens_look_like_github_s(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("github")
    assert jwt.get_unverified_header(token)["x5t"]
    claims = await verify(issuer, token)
    assert (claims["sub"], claims["aud"], claims["sha"]) == (
        "repo:octo-org/octo-repo:ref:refs/heads/main", "https://github.com/octo-org", COMMIT)
    assert claims["iat"] - claims["nbf"] == 600
    assert isinstance(claims["repository_id"], str)
    pull = await verify(issuer, issuer.mint("github", event_name="pull_request", ref="refs/pull/7/merge"))
    assert pull["sub"] == "repo:octo-org/octo-repo:pull_request"
    deploy = await verify(issuer, issuer.mint("github", environment="prod:eu"))
    assert deploy["sub"] == "repo:octo-org/octo-repo:environment:prod%3Aeu"


async def test_buildkite_and_gitlab_subjects_follow_their_claims(issuer: OidcIssuerEmulator) -> None:
    buildkite = await verify(issuer, issuer.mint("buildkite", build_tag="v1.2", pipeline_slug="ocean"))
    assert buildkite["sub"] == (f"organization:acme-inc:pipeline:ocean:ref:refs/tags/v1.2:commit:{COMMIT}"
                                ":step:build")
    assert buildkite["aud"] == "https://buildkite.com/acme-inc"
    gitlab = await verify(issuer, issuer.mint("gitlab", ref="v2", ref_type="tag", ref_path="refs/tags/v2"))
    assert gitlab["sub"] == "project_path:my-group/my-project:ref_type:tag:ref:v2"
    assert (gitlab["ref_protected"], gitlab["project_id"]) == ("false", "20")


async def test_overrides_replace_or_drop_claims(issuer: OidcIssuerEmulator) -> None:
    claims = await verify(issuer, issuer.mint("github", aud=["a", "b"], actor=DROP, sub="custom"))
    assert (claims["aud"], claims["sub"]) == (["a", "b"], "custom")
    assert "actor" not in claims


async def test_es256_tokens_are_signed_by_the_ec_key(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("gitlab", alg="ES256")
    assert jwt.get_unverified_header(token)["kid"] == "ec-1"
    assert (await verify(issuer, token))["project_path"] == "my-group/my-project"


async def test_rotation_publishes_a_new_key_and_signs_with_it(issuer: OidcIssuerEmulator) -> None:
    kid = issuer.rotate()
    token = issuer.mint("github")
    assert jwt.get_unverified_header(token)["kid"] == kid
    assert kid in await published_keys(issuer)
    assert (await verify(issuer, token))["repository"] == "octo-org/octo-repo"
    issuer.retire("rsa-1")
    assert set(await published_keys(issuer)) == {"rsa-2", "ec-1", kid}


async def test_attack_knobs_make_tokens_the_published_keys_refuse(issuer: OidcIssuerEmulator) -> None:
    keys = await published_keys(issuer)
    forged = issuer.mint("github", forged=True)
    assert jwt.get_unverified_header(forged)["kid"] == "rsa-1"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, keys["rsa-1"], algorithms=["RS256"], options={"verify_aud": False})
    unsigned = issuer.mint("github", alg="none")
    assert unsigned.endswith(".") and jwt.get_unverified_header(unsigned)["alg"] == "none"
    unknown = issuer.mint("github", kid="no-such-key")
    assert jwt.get_unverified_header(unknown)["kid"] not in keys
    expired = jwt.decode(issuer.mint("github", now=1_000_000_000), options={"verify_signature": False})
    assert expired["exp"] == 1_000_000_000 + LIFETIME


async def test_the_key_set_answer_can_be_replaced(issuer: OidcIssuerEmulator) -> None:
    issuer.jwks_override = b"{" * 10
    async with aiohttp.ClientSession() as http, http.get(issuer.jwks_uri) as response:
        assert await response.read() == b"{" * 10
