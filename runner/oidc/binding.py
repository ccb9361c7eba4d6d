"""A token bound to one job: its audience carries the digest of the job it was asked for. Pure.

A CI step that asks its CI system for a token with the audience `AUDIENCE:sha256:<hex>`, where
AUDIENCE is the one configured for the issuer and `<hex>` the SHA-256 of the RFC 8785 (JSON
Canonicalization Scheme) form of the request's `job` object, gets a token that is good for that
job only: whoever takes it from the step (or from the hub) cannot submit another job with it.
Canonicalisation is by value, so the key order and whitespace of the submitted JSON do not matter.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import rfc8785

from runner.oidc.errors import TokenRejected

BOUND_MARK = ":sha256:"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def job_digest(job: Mapping[str, Any]) -> str:
    """The hex SHA-256 of the job's RFC 8785 form; ValueError for a value JSON cannot carry
    exactly (NaN, an integer beyond 2**53, a key that is not a string)."""
    try:
        canonical = rfc8785.dumps(dict(job))
    except (rfc8785.CanonicalizationError, TypeError) as error:
        raise ValueError(f"the job cannot be put in canonical form (RFC 8785): {error}") from None
    return hashlib.sha256(canonical).hexdigest()


def bound_audience(configured_audience: str, job: Mapping[str, Any]) -> str:
    """The audience a token for exactly this job asks for."""
    return f"{configured_audience}{BOUND_MARK}{job_digest(job)}"


def bound_digest(token_audience: str, configured_audience: str) -> str | None:
    """The job digest a token's audience binds it to; None for the configured audience itself
    (or any other)."""
    prefix = configured_audience + BOUND_MARK
    if not token_audience.startswith(prefix):
        return None
    digest = token_audience[len(prefix):]
    return digest if _DIGEST.fullmatch(digest) else None


def check_job_binding(token_audience: str, configured_audience: str, job: Mapping[str, Any]) -> None:
    """Refuse (TokenRejected) a job other than the one a bound token is for; an unbound token
    binds nothing."""
    bound = bound_digest(token_audience, configured_audience)
    if bound is None:
        return
    try:
        digest = job_digest(job)
    except ValueError as error:
        raise TokenRejected(f"the token is bound to job digest sha256:{bound}, and {error}") from None
    if digest != bound:
        raise TokenRejected(f"the token is bound to job digest sha256:{bound}; the job submitted has "
                            f"sha256:{digest}")
