"""The headers every dashboard answer carries, and the ones that keep pages out of caches.

The content security policy allows the hub's own script and stylesheets only: no inline script,
no inline style (the log's colours are classes), no frame around the pages, no form sent
elsewhere. Everything a page needs is served by the hub itself, since login nodes and hubs are
often offline. The headers go on at `on_response_prepare`, so streamed answers (events, the raw
log) and error pages carry them too.
"""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

R = TypeVar("R", bound=web.StreamResponse)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)


def add_security_headers(app: web.Application) -> None:
    app.on_response_prepare.append(_add_headers)


def no_store(response: R) -> R:
    """A page or stream that holds what only this viewer may see: kept by no cache."""
    response.headers["Cache-Control"] = "no-store"
    return response
