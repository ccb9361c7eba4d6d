"""Whether this agent trusts a leased API job: the token the hub forwarded, verified here.

The hub verified the token when it took the job, but the agent trusts the hub for nothing about
who asked: it verifies the token itself against its own `[[oidc]]` issuers (signature against the
issuer's keys, issuer, audience), so a hub that trusts an issuer this agent does not, or a hub
that was broken into, cannot have it run anything. Three things make that judgement:

- the token's times (`exp`, `nbf`, `iat`) are judged as of when the hub received the job, since a
  job may wait in the hub's queue longer than a CI system's token lives (five minutes or so);
- that time is the hub's word, so it is bounded: a job that waited longer than the agent's
  `hub_max_queue_age` (or that the hub says it received in the future) is refused, and a token
  that expired longer ago than that can never be passed off as fresh;
- a token whose audience binds it to one job's digest (`AUDIENCE:sha256:<hex>`) is good for that
  job only: the digest of the job object exactly as leased must match.

A refusal (`TokenRefused`) carries the line that says why; the issuer's keys being out of reach
(`KeysUnavailable`) is no refusal, and the job is judged again later.
"""

from __future__ import annotations

from runner.gateway.jobs_protocol import JobLease
from runner.oidc.binding import check_job_binding
from runner.oidc.errors import TokenRejected
from runner.oidc.registered import CLOCK_SKEW
from runner.oidc.verify import TokenVerifier, VerifiedToken
from runner.sources.refusal import Refusal
from runner.units import human_duration


class TokenRefused(Refusal):
    """This agent does not accept the job's token (or the time the hub says it received it)."""


async def confirm(lease: JobLease, verifier: TokenVerifier, *, now: float, max_queue_age: float,
                  skew: float = CLOCK_SKEW) -> VerifiedToken:
    """The verified token of a leased job; TokenRefused saying why not, or KeysUnavailable."""
    waited = now - lease.received_at
    if waited > max_queue_age:
        raise TokenRefused(f"the job waited {human_duration(int(waited))} at the hub, longer than this "
                           f"agent's hub_max_queue_age ({human_duration(int(max_queue_age))}): its token is "
                           "not judged that long after the hub received it")
    if waited < -skew:
        raise TokenRefused(f"the hub says it received the job {human_duration(int(-waited))} from now, in "
                           "the future: the clocks of the hub and this agent disagree")
    try:
        verified = await verifier.verify(lease.token, now=lease.received_at)
        check_job_binding(verified.audience, verified.issuer.audience, lease.job)
    except TokenRejected as rejected:
        raise TokenRefused(f"this agent does not accept the job's token: {rejected.reason}") from None
    return verified
