"""Verifying ID tokens against a real issuer (the emulator over loopback): who a token makes the
caller, and every token refused with the reason a user reads."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from fakes.github_api import ManualClock
from fakes.oidc_issuer import COMMIT, LIFETIME, Kind, OidcIssuerEmulator

from runner.oidc.errors import KeysUnavailable, TokenRejected
from runner.oidc.issuers import OidcIssuer
from runner.oidc.keys import KeyCache
from runner.oidc.verify import MAX_TOKEN_BYTES, TokenVerifier, VerifiedToken
from runner.policy import decide, parse_policy_text
from runner.spec import parse_job_text

from .oidc_trust import AUDIENCE, trusted

POLICY = """\
version = 1

[accounts.octo]
slurm_account = "octo"
partitions = ["batch"]

[images.ci]
path = "/images/ci.sif"
sha256 = "%s"

[[grants]]
name = "octo-repo"
principals = ["github:repo:octo-org/octo-repo"]
events = ["push", "api"]
account = "octo"
images = ["ci"]
""" % ("a" * 64)
JOB = parse_job_text('[job]\nname = "t"\nimage = "ci"\ncommand = ["true"]\n', "job.toml")


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuerEmulator]:
    async with OidcIssuerEmulator() as emulator:
        yield emulator


def verifier(*issuers: OidcIssuer, clock: ManualClock | None = None) -> TokenVerifier:
    keys = KeyCache(clock=clock.time) if clock is not None else None
    return TokenVerifier(issuers, keys=keys)


async def verified(issuer: OidcIssuerEmulator, kind: Kind = "github", **overrides: Any) -> VerifiedToken:
    return await verifier(trusted(issuer, kind)).verify(issuer.mint(kind, aud=AUDIENCE, **overrides))


async def rejected(verifier: TokenVerifier, token: str, **kwargs: Any) -> str:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token, **kwargs)
    return caught.value.reason


# --- who a token makes its bearer ----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "principals", "event", "ref"), [
    ("github", ("github:org:octo-org", "github:repo:octo-org/octo-repo", "github:user:octocat"), "push",
     "refs/heads/main"),
    ("buildkite", ("buildkite:org:acme-inc", "buildkite:pipeline:acme-inc/super-duper-app"), "ui",
     "refs/heads/main"),
    ("gitlab", ("gitlab:group:my-group", "gitlab:project:my-group/my-project", "gitlab:user:sample-user"),
     "push", "refs/heads/feature-branch-1"),
    ("generic", ("idp:user:alice", "idp:group:hpc-users", "idp:group:ocean-modellers"), "api", None),
])
async def test_a_token_of_each_kind_holds_the_principals_of_its_claims(
        issuer: OidcIssuerEmulator, kind: Kind, principals: tuple[str, ...], event: str,
        ref: str | None) -> None:
    token = await verified(issuer, kind)
    assert token.identity.principals() == principals
    assert (token.identity.effective_event, token.identity.effective_ref) == (event, ref)
    assert (token.issuer_name, token.kind, token.audience, token.job_digest) == (
        f"test-{kind}", kind, AUDIENCE, None)


async def test_a_token_names_its_commit(issuer: OidcIssuerEmulator) -> None:
    assert (await verified(issuer, "github")).identity.commit == COMMIT
    assert (await verified(issuer, "buildkite")).identity.commit == COMMIT
    gitlab = await verified(issuer, "gitlab")
    assert (gitlab.identity.commit, gitlab.identity.ref_protected) == (
        "714a629c0b401fdce83e847fc9589983fc6f46bc", False)


async def test_the_policy_decides_on_a_tokens_identity(issuer: OidcIssuerEmulator) -> None:
    policy = parse_policy_text(POLICY, "policy.toml")
    granted = await verified(issuer, "github", event_name="workflow_dispatch")
    assert decide(policy, granted.identity, JOB).grant == "octo-repo"
    other = await verified(issuer, "github", repository="octo-org/other", event_name="workflow_dispatch")
    assert decide(policy, other.identity, JOB).reasons == (
        "no grant names this identity (it holds: github:org:octo-org, github:repo:octo-org/other, "
        "github:user:octocat)",)


async def test_an_es256_token_verifies(issuer: OidcIssuerEmulator) -> None:
    token = await verified(issuer, "gitlab", alg="ES256")
    assert token.identity.project == "my-group/my-project"


async def test_an_audience_list_holding_the_configured_one_is_accepted(issuer: OidcIssuerEmulator) -> None:
    listed = issuer.mint("github", aud=["https://github.com/x", AUDIENCE])
    token = await verifier(trusted(issuer)).verify(listed)
    assert token.audience == AUDIENCE


async def test_the_token_is_judged_at_the_time_given(issuer: OidcIssuerEmulator) -> None:
    """An agent judges expiry against when the hub received the token, not when it leases the job."""
    received = time.time() - 3600
    token = issuer.mint("github", aud=AUDIENCE, now=received)
    check = verifier(trusted(issuer))
    assert (await check.verify(token, now=received + 10)).identity.repository == "octo-org/octo-repo"
    assert (await rejected(check, token)).startswith("expired at ")


async def test_a_buildkite_token_is_taken_by_the_table_of_its_organisation(
        issuer: OidcIssuerEmulator) -> None:
    check = verifier(trusted(issuer, "buildkite", organization="clima", name="clima"),
                     trusted(issuer, "buildkite", name="acme"))
    token = await check.verify(issuer.mint("buildkite", aud=AUDIENCE))
    assert (token.issuer_name, token.identity.organization) == ("acme", "acme-inc")


# --- refused, with the reason ---------------------------------------------------------------------


async def test_a_forged_signature_is_refused(issuer: OidcIssuerEmulator) -> None:
    check = verifier(trusted(issuer))
    for alg in ("RS256", "ES256"):
        forged = issuer.mint("github", aud=AUDIENCE, alg=alg, forged=True)
        assert await rejected(check, forged) == "signature does not verify"


async def test_a_token_of_an_untrusted_issuer_is_refused(issuer: OidcIssuerEmulator) -> None:
    check = verifier(trusted(issuer))
    token = issuer.mint("github", aud=AUDIENCE, iss="https://token.actions.githubusercontent.com")
    assert await rejected(check, token) == "issuer https://token.actions.githubusercontent.com is not trusted"
    assert issuer.requests == []


async def test_a_token_for_another_audience_is_refused(issuer: OidcIssuerEmulator) -> None:
    check = verifier(trusted(issuer))
    assert await rejected(check, issuer.mint("github")) == (
        "audience https://github.com/octo-org is not hpc-runner (nor hpc-runner:sha256:<the job's digest>)")
    assert (await rejected(check, issuer.mint("github", aud=["vault", "sts"]))).startswith(
        "audience ['vault', 'sts'] is not hpc-runner")
    assert (await rejected(check, issuer.mint("github", aud="hpc-runner:sha256:short"))).startswith(
        "audience hpc-runner:sha256:short is not hpc-runner")


async def test_an_expired_token_is_refused_saying_when_it_expired(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("github", aud=AUDIENCE, now=1_790_000_000)
    # Issued at 14:13:20, it lived LIFETIME (five minutes).
    assert await rejected(verifier(trusted(issuer)), token) == "expired at 2026-09-21T14:18:20Z"


async def test_a_minute_of_clock_skew_is_allowed_and_no_more(issuer: OidcIssuerEmulator) -> None:
    issued = 1_790_000_000
    token = issuer.mint("github", aud=AUDIENCE, now=issued)
    check = verifier(trusted(issuer))
    await check.verify(token, now=issued + LIFETIME + 59)
    assert (await rejected(check, token, now=issued + LIFETIME + 61)).startswith("expired at ")
    await check.verify(token, now=issued - 59)
    assert (await rejected(check, token, now=issued - 61)) == "issued in the future, at 2026-09-21T14:13:20Z"


async def test_a_token_not_valid_yet_is_refused(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("gitlab", aud=AUDIENCE, nbf=int(time.time()) + 600)
    assert (await rejected(verifier(trusted(issuer, "gitlab")), token)).startswith("not valid before ")


async def test_an_unsigned_token_is_refused(issuer: OidcIssuerEmulator) -> None:
    check = verifier(trusted(issuer))
    for spelling in ("none", "None", "NONE"):
        unsigned = issuer.mint("github", aud=AUDIENCE, alg="none", header={"alg": spelling})
        assert await rejected(check, unsigned) == "algorithm none is not allowed"


async def test_a_token_signed_with_the_public_key_as_a_shared_secret_is_refused(
        issuer: OidcIssuerEmulator) -> None:
    """The classic confusion: HS256 keyed with the issuer's public key, which anyone can fetch."""
    token = issuer.mint("github", aud=AUDIENCE, alg="HS256")
    assert await rejected(verifier(trusted(issuer)), token) == (
        "algorithm HS256 is not allowed (only RS256, ES256)")


async def test_a_token_whose_algorithm_is_not_its_keys_is_refused(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("github", aud=AUDIENCE, alg="ES256", kid="rsa-1")
    assert await rejected(verifier(trusted(issuer)), token) == (
        "key rsa-1 is for RS256, and the token says ES256")


async def test_an_unknown_key_id_is_refused(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("github", aud=AUDIENCE, kid="no-such-key")
    assert await rejected(verifier(trusted(issuer)), token) == "unknown key id no-such-key"


async def test_a_buildkite_token_of_another_organisation_is_refused(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("buildkite", aud=AUDIENCE, organization_slug="evil-corp")
    assert await rejected(verifier(trusted(issuer, "buildkite")), token) == (
        "organization evil-corp is not the pinned acme-inc")
    both = verifier(trusted(issuer, "buildkite", name="acme"),
                    trusted(issuer, "buildkite", name="clima", organization="clima"))
    assert await rejected(both, token) == "organization evil-corp is not the pinned acme-inc or clima"


@pytest.mark.parametrize(("token", "reason"), [
    ("x" * (MAX_TOKEN_BYTES + 1), f"the token is larger than {MAX_TOKEN_BYTES} bytes"),
    ("not a token", "the token is not a JWT (three base64url parts joined by '.')"),
    ("a.b.c", "the token cannot be read: "),
])
async def test_what_is_not_a_token_is_refused_before_anything_is_fetched(
        issuer: OidcIssuerEmulator, token: str, reason: str) -> None:
    assert (await rejected(verifier(trusted(issuer)), token)).startswith(reason)
    assert issuer.requests == []


async def test_a_token_with_critical_extensions_is_refused(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("github", aud=AUDIENCE, header={"crit": ["exp"]})
    assert await rejected(verifier(trusted(issuer)), token) == (
        "the token cannot be read: Unsupported critical extension: exp")


async def test_a_token_without_the_claims_of_its_kind_is_refused(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("gitlab", aud=AUDIENCE, project_path="other-group/project")
    assert await rejected(verifier(trusted(issuer, "gitlab")), token) == (
        "claims project_path 'other-group/project' and namespace_path 'my-group' disagree")


# --- the issuer's keys: discovery, cache, rotation, bounds -----------------------------------------


async def test_keys_are_found_through_discovery_and_fetched_once(issuer: OidcIssuerEmulator) -> None:
    check = verifier(trusted(issuer))
    for _ in range(3):
        await check.verify(issuer.mint("github", aud=AUDIENCE))
    assert issuer.requests == ["/.well-known/openid-configuration", "/.well-known/jwks"]


async def test_a_configured_jwks_uri_skips_discovery() -> None:
    async with OidcIssuerEmulator(discovery=False) as issuer:
        await verifier(trusted(issuer, jwks_uri=issuer.jwks_uri)).verify(issuer.mint("github", aud=AUDIENCE))
        assert issuer.requests == ["/.well-known/jwks"]


async def test_a_rotated_key_is_found_by_fetching_the_keys_again(
        issuer: OidcIssuerEmulator, clock: ManualClock) -> None:
    check = verifier(trusted(issuer), clock=clock)
    await check.verify(issuer.mint("github", aud=AUDIENCE))
    clock.advance(31)
    kid = issuer.rotate()
    token = await check.verify(issuer.mint("github", aud=AUDIENCE))
    assert jwt.get_unverified_header(issuer.mint("github"))["kid"] == kid
    assert token.identity.repository == "octo-org/octo-repo"
    assert issuer.key_set_requests() == 2


async def test_a_flood_of_unknown_key_ids_asks_the_issuer_at_most_every_30_seconds(
        issuer: OidcIssuerEmulator, clock: ManualClock) -> None:
    check = verifier(trusted(issuer), clock=clock)
    await check.verify(issuer.mint("github", aud=AUDIENCE))
    clock.advance(31)
    for _ in range(50):
        kid = uuid.uuid4().hex
        assert await rejected(check, issuer.mint("github", aud=AUDIENCE, kid=kid)) == f"unknown key id {kid}"
    assert issuer.key_set_requests() == 2
    # A key rotated in just now is found once the interval has passed.
    issuer.rotate()
    rotated = issuer.mint("github", aud=AUDIENCE)
    assert (await rejected(check, rotated)).startswith("unknown key id rsa-rotated-")
    clock.advance(30)
    await check.verify(issuer.mint("github", aud=AUDIENCE))
    assert issuer.key_set_requests() == 3


async def test_a_withdrawn_key_is_dropped_when_the_keys_are_an_hour_old(
        issuer: OidcIssuerEmulator, clock: ManualClock) -> None:
    check = verifier(trusted(issuer), clock=clock)
    old = issuer.mint("github", aud=AUDIENCE)
    await check.verify(old)
    issuer.rotate()
    issuer.retire("rsa-1")
    await check.verify(old)
    clock.advance(3601)
    assert await rejected(check, old) == "unknown key id rsa-1"


async def test_a_key_that_cannot_be_used_is_named(issuer: OidcIssuerEmulator) -> None:
    keys = issuer.key_set()["keys"]
    keys[0]["alg"] = "PS512"
    issuer.jwks_override = json.dumps({"keys": keys}).encode()
    check = verifier(trusted(issuer))
    assert await rejected(check, issuer.mint("github", aud=AUDIENCE)) == (
        "key id rsa-1 names a key that cannot be used: it is for algorithm PS512, and only RS256, ES256 "
        "are accepted")
    # The other keys of the set still serve.
    await check.verify(issuer.mint("github", aud=AUDIENCE, alg="ES256"))


async def test_unreachable_keys_are_not_a_verdict_on_the_token(issuer: OidcIssuerEmulator) -> None:
    table = trusted(issuer)
    token = issuer.mint("github", aud=AUDIENCE)
    await issuer.close()
    with pytest.raises(KeysUnavailable) as caught:
        await verifier(table).verify(token)
    assert str(caught.value).startswith(f"the keys of issuer test-github ({table.issuer}) could not be "
                                        f"fetched: the discovery document at {table.discovery_url}: ")


@pytest.mark.parametrize(("setup", "message"), [
    ({"jwks_override": b" " * (256 * 1024 + 1)}, "is larger than 262144 bytes"),
    ({"jwks_override": b"<html>"}, "is not JSON"),
    ({"jwks_override": b'{"keys": 1}'}, 'the key set is not a JSON object with a "keys" list'),
    ({"discovery_issuer_override": "https://elsewhere.example.org"},
     "the discovery document is for issuer 'https://elsewhere.example.org', not "),
    ({"jwks_uri_override": "http://keys.example.org/jwks"},
     "the discovery document's jwks_uri: 'http://keys.example.org/jwks' must use https://"),
])
async def test_a_bad_answer_from_the_issuer_is_reported(
        issuer: OidcIssuerEmulator, setup: dict[str, Any], message: str) -> None:
    for name, value in setup.items():
        setattr(issuer, name, value)
    with pytest.raises(KeysUnavailable) as caught:
        await verifier(trusted(issuer)).verify(issuer.mint("github", aud=AUDIENCE))
    assert message in str(caught.value)


async def test_an_issuer_that_does_not_answer_is_given_up_on_at_the_timeout(
        issuer: OidcIssuerEmulator) -> None:
    issuer.stall_key_set = True
    check = TokenVerifier([trusted(issuer)], keys=KeyCache(timeout=0.2))
    with pytest.raises(KeysUnavailable, match=r"the key set at .*: no answer within the timeout"):
        await check.verify(issuer.mint("github", aud=AUDIENCE))


async def test_keys_held_from_before_serve_while_the_issuer_is_out_of_reach(
        issuer: OidcIssuerEmulator, clock: ManualClock) -> None:
    check = verifier(trusted(issuer), clock=clock)
    token = issuer.mint("github", aud=AUDIENCE)
    await check.verify(token)
    clock.advance(3601)
    issuer.jwks_override = b"<html>"
    assert (await check.verify(token)).identity.repository == "octo-org/octo-repo"
    assert issuer.key_set_requests() == 2
