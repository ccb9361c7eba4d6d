"""A request the hub refuses: the status to answer, and why."""

from __future__ import annotations

from typing import Any


class Refusal(Exception):
    """Answer `status` with `message` (naming `field` where one is at fault), and change nothing."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": self.message} | ({"field": self.field} if self.field else {})
