"""Why a token is not taken: refused for what it is, or not judged because its keys are out of reach."""

from __future__ import annotations

from runner.errors import HpcRunnerError


class TokenRejected(HpcRunnerError):
    """The token does not prove who its bearer is; `reason` is one line saying why (an HTTP 401)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class KeysUnavailable(HpcRunnerError):
    """The issuer's keys could not be fetched, so the token could not be judged (an HTTP 503: the
    token may be good, and a later try may succeed)."""
