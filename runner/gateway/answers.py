"""The hub's JSON answers that every part of it gives alike."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    """`{"error": message, ...extra}` with `status`."""
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def agent_unauthorized() -> web.Response:
    return error(401, "a valid agent token is required (Authorization: Bearer <token>)",
                 {"WWW-Authenticate": 'Bearer realm="hpc-runner gateway"'})


def stopping() -> web.Response:
    return error(503, "the gateway is stopping", {"Retry-After": "5"})



class TooLarge(Exception):
    """A body over the limit of its route (answer 413)."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, refused (TooLarge) as soon as it is known to exceed `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body is larger than {limit} bytes ({request.content_length} bytes)")
    body = bytearray()
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"the body is larger than {limit} bytes")
    return bytes(body)
