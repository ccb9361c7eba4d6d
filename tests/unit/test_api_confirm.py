"""The agent's own judgement of a leased job's token: as of when the hub received it, within the
maximum queue age, against the agent's own issuers, and bound to the job where its audience says."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes.oidc_issuer import OidcIssuerEmulator

from runner.gateway.jobs_protocol import JobLease
from runner.oidc.binding import bound_audience
from runner.oidc.verify import TokenVerifier
from runner.sources.api.confirm import TokenRefused, confirm

from .oidc_trust import AUDIENCE, trusted

JOB = {"name": "unit", "image": "test", "command": ["make", "test"], "resources": {"time": "5m"}}
HOUR = 3600.0


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuerEmulator]:
    async with OidcIssuerEmulator() as emulator:
        yield emulator


def lease(token: str, received_at: float, job: dict[str, Any] = JOB) -> JobLease:
    return JobLease(id="job1", job=job, token=token, issuer="github-actions", cluster=None, repository=None,
                    commit=None, received_at=received_at, lease_seconds=120,
                    lease_expires_at=received_at + 120, attempt=1, cancel_requested=False)


async def test_a_token_good_when_the_hub_received_it_is_good_until_the_maximum_queue_age(
        issuer: OidcIssuerEmulator) -> None:
    verifier = TokenVerifier([trusted(issuer)])
    received = time.time() - 1800                       # half an hour ago; tokens live five minutes
    token = issuer.mint("github", aud=AUDIENCE, now=received - 10)
    verified = await confirm(lease(token, received), verifier, now=time.time(), max_queue_age=HOUR)
    assert verified.identity.repository == "octo-org/octo-repo"
    with pytest.raises(TokenRefused, match=r"^the job waited 30m(\ds)? at the hub, longer than this agent's "
                                           r"hub_max_queue_age \(29m\)"):
        await confirm(lease(token, received), verifier, now=time.time(), max_queue_age=29 * 60)


async def test_a_hub_that_says_it_received_a_job_in_the_future_is_not_believed(
        issuer: OidcIssuerEmulator) -> None:
    verifier = TokenVerifier([trusted(issuer)])
    later = time.time() + 600
    token = issuer.mint("github", aud=AUDIENCE, now=later)
    with pytest.raises(TokenRefused, match="the hub says it received the job 10m from now, in the future"):
        await confirm(lease(token, later + 1), verifier, now=time.time(), max_queue_age=HOUR)


async def test_a_bound_token_is_good_for_its_job_in_any_key_order_and_for_no_other(
        issuer: OidcIssuerEmulator) -> None:
    verifier = TokenVerifier([trusted(issuer)])
    token = issuer.mint("github", aud=bound_audience(AUDIENCE, JOB))
    reordered = dict(reversed(list(JOB.items())))
    assert (await confirm(lease(token, time.time(), reordered), verifier, now=time.time(),
                          max_queue_age=HOUR)).job_digest is not None
    with pytest.raises(TokenRefused, match="the token is bound to job digest sha256:"):
        await confirm(lease(token, time.time(), JOB | {"name": "other"}), verifier, now=time.time(),
                      max_queue_age=HOUR)


async def test_the_agents_own_issuers_decide_whatever_the_hub_trusted(issuer: OidcIssuerEmulator) -> None:
    async with OidcIssuerEmulator() as other:
        verifier = TokenVerifier([trusted(other)])
        token = issuer.mint("github", aud=AUDIENCE)
        with pytest.raises(TokenRefused) as refused:
            await confirm(lease(token, time.time()), verifier, now=time.time(), max_queue_age=HOUR)
    assert refused.value.reason == ("this agent does not accept the job's token: issuer "
                                    f"{issuer.url} is not trusted")
