"""Who calls the jobs API: the verified OIDC token, reduced to what the hub keeps and compares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from runner.errors import InputError
from runner.gateway.refusal import Refusal
from runner.identity import identity_from_json
from runner.oidc.errors import KeysUnavailable, TokenRejected
from runner.oidc.verify import TokenVerifier, VerifiedToken


@dataclass(frozen=True)
class Caller:
    issuer: str                     # the name of the [[oidc]] table whose issuer signed the token
    token: str                      # the raw token, kept for the agent to verify again
    identity: dict[str, Any]        # the policy's identity, as JSON
    principals: tuple[str, ...]
    repository: str | None          # what the token says the job's source is, where it says so
    commit: str | None
    audience: str                   # the token's `aud`: the issuer's audience, or one bound to a job
    configured_audience: str        # the issuer's audience as the [[oidc]] table names it

    @property
    def actor(self) -> str:
        """Who asks, as the audit trail names them: the identity's acting principal (the
        workflow's user, the pipeline), as for the jobs it submits."""
        try:
            return identity_from_json(self.identity, "the identity").actor_principal
        except InputError:
            return self.principals[0] if self.principals else f"{self.issuer}:unknown"


# A bearer token into its caller, or Refusal.
Authenticate = Callable[[str], Awaitable[Caller]]


def caller_of(verified: VerifiedToken, token: str) -> Caller:
    """The caller a verified token makes: its identity, and the source it names for a job (GitHub's
    repository, GitLab's project, the commit of any kind that carries one)."""
    identity = verified.identity
    return Caller(issuer=verified.issuer_name, token=token, identity=identity.to_json(),
                  principals=identity.principals(), repository=identity.repository or identity.project,
                  commit=identity.commit, audience=verified.audience,
                  configured_audience=verified.issuer.audience)


def authenticator(verifier: TokenVerifier) -> Authenticate:
    """Tokens verified by `verifier` into callers; a Refusal 401 with the verifier's reason, or
    503 when an issuer's keys are out of reach (the token may be good: try again)."""
    async def authenticate(token: str) -> Caller:
        try:
            verified = await verifier.verify(token)
        except TokenRejected as rejected:
            raise Refusal(401, rejected.reason) from None
        except KeysUnavailable as unavailable:
            raise Refusal(503, str(unavailable)) from None
        return caller_of(verified, token)
    return authenticate
