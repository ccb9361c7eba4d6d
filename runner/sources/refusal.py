"""A job a source will not run as it was given, with the one line of its log that says why."""

from __future__ import annotations

from runner.errors import HpcRunnerError


class Refusal(HpcRunnerError):
    """The job must not run as given; `reason` is one line for a person reading the job log."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
