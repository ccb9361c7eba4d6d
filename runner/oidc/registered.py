"""The registered claims of a token (RFC 7519): issuer, audience and times, checked. Pure.

`exp`, `nbf` and `iat` are judged against a time the caller gives (the hub: now; an agent: when the
hub received the token) with a small allowance for clocks that disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from runner.oidc.binding import BOUND_MARK, bound_digest
from runner.oidc.errors import TokenRejected
from runner.oidc.issuers import OidcIssuer

CLOCK_SKEW = 60.0
MAX_AUDIENCES = 16


def check_registered_claims(claims: Mapping[str, Any], issuer: OidcIssuer, *, now: float,
                            skew: float = CLOCK_SKEW) -> str:
    """The token's audience that is the issuer's (plain or bound to a job's digest); TokenRejected
    when the issuer, the audience or the times are not right."""
    if claims.get("iss") != issuer.issuer:
        raise TokenRejected(f"issuer {str(claims.get('iss'))[:200]} is not {issuer.issuer}")
    audience = _audience(claims.get("aud"), issuer.audience)
    expires = _required_time(claims, "exp")
    if now > expires + skew:
        raise TokenRejected(f"expired at {_iso(expires)}")
    not_before = _time(claims, "nbf")
    if not_before is not None and now + skew < not_before:
        raise TokenRejected(f"not valid before {_iso(not_before)}")
    issued = _required_time(claims, "iat")
    if now + skew < issued:
        raise TokenRejected(f"issued in the future, at {_iso(issued)}")
    return audience


def _audience(value: object, configured: str) -> str:
    listed = [value] if isinstance(value, str) else value
    if not isinstance(listed, list) or not listed or len(listed) > MAX_AUDIENCES \
            or not all(isinstance(item, str) for item in listed):
        raise TokenRejected("the token's audience (aud) is not a string or a short list of strings")
    audiences: list[str] = listed
    bound = sorted({item for item in audiences if bound_digest(item, configured) is not None})
    if len(bound) > 1:
        raise TokenRejected("the token's audience binds it to more than one job")
    if bound:
        return bound[0]
    if configured in audiences:
        return configured
    shown = audiences[0] if len(audiences) == 1 else audiences
    raise TokenRejected(f"audience {str(shown)[:300]} is not {configured} (nor {configured}{BOUND_MARK}"
                        "<the job's digest>)")


def _required_time(claims: Mapping[str, Any], name: str) -> float:
    value = _time(claims, name)
    if value is None:
        raise TokenRejected(f"the token has no {name}")
    return value


def _time(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenRejected(f"the token's {name} is not a time")
    return float(value)


def _iso(epoch: float) -> str:
    try:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{epoch:.0f} (seconds since 1970)"
