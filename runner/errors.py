"""Errors that point a user at the exact place in an input file that is wrong."""

from __future__ import annotations


class HpcRunnerError(Exception):
    """Base class of every error the tool reports to a user without a traceback."""


class InputError(HpcRunnerError):
    """A file (job spec, policy, config, identity) that does not hold what it must.

    The message always names the file and the dotted field, and the line when the TOML
    text lets us find one, so that a user can go straight to the mistake.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.detail}"


class InfrastructureError(HpcRunnerError):
    """Something outside the job went wrong (image missing, apptainer absent...): exit 125."""
