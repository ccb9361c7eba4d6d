"""Where a CI step asks its CI system for an OIDC ID token, as GitHub Actions and Buildkite answer.

One aiohttp server on 127.0.0.1 (ephemeral port), minting with an `OidcIssuerEmulator` for the
audience asked:

* GitHub Actions' token endpoint: a workflow with ``permissions: id-token: write`` gets
  ``ACTIONS_ID_TOKEN_REQUEST_URL`` (which already has a query, ``?api-version=2.0``) and
  ``ACTIONS_ID_TOKEN_REQUEST_TOKEN``; ``GET $URL&audience=AUD`` with ``Authorization: bearer
  $TOKEN`` answers ``{"count": N, "value": "<JWT>"}``. Another request token is 401.
* The Buildkite agent API's ``POST /v3/jobs/{job_id}/oidc/tokens`` (``Authorization: Token
  <agent access token>``, body ``{"audience": AUD}``), answered ``{"token": "<JWT>"}``: what
  ``buildkite-agent oidc request-token --audience AUD`` asks for the job it runs. The fake
  ``bin/buildkite-agent`` calls it from ``BUILDKITE_AGENT_ENDPOINT``, ``BUILDKITE_AGENT_ACCESS_TOKEN``
  and ``BUILDKITE_JOB_ID``, as the real agent does.

``audiences`` records, per vendor, each audience asked for.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from fakes.oidc_issuer import OidcIssuerEmulator

BUILDKITE_AGENT = Path(__file__).parent / "bin" / "buildkite-agent"
BUILDKITE_JOB_ID = "0184990a-477b-4fa8-9968-496074483cee"


class CiTokenEndpoints:
    def __init__(self, *, github: OidcIssuerEmulator, buildkite: OidcIssuerEmulator,
                 github_claims: dict[str, Any] | None = None) -> None:
        self._github = github
        self._buildkite = buildkite
        self.github_claims = github_claims or {}
        self.request_token = secrets.token_urlsafe(24)
        self.agent_token = secrets.token_urlsafe(24)
        self.audiences: dict[str, list[str]] = {"github": [], "buildkite": []}
        self._runner: web.AppRunner | None = None
        self._port = 0

    async def __aenter__(self) -> CiTokenEndpoints:
        app = web.Application()
        app.router.add_get("/_apis/idtoken", self._github_token)
        app.router.add_post("/v3/jobs/{job_id}/oidc/tokens", self._buildkite_token)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def github_env(self) -> dict[str, str]:
        """The variables a GitHub Actions job with `id-token: write` has."""
        return {"GITHUB_ACTIONS": "true",
                "ACTIONS_ID_TOKEN_REQUEST_URL": f"{self.url}/_apis/idtoken?api-version=2.0",
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN": self.request_token}

    def buildkite_env(self) -> dict[str, str]:
        """The variables a Buildkite job has (with the fake `buildkite-agent` first on PATH)."""
        return {"BUILDKITE": "true", "BUILDKITE_AGENT_ENDPOINT": f"{self.url}/v3",
                "BUILDKITE_AGENT_ACCESS_TOKEN": self.agent_token, "BUILDKITE_JOB_ID": BUILDKITE_JOB_ID}

    async def _github_token(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"bearer {self.request_token}":
            return web.json_response({"message": "Bad credentials"}, status=401)
        audience = request.query.get("audience")
        claims = dict(self.github_claims)
        if audience is not None:
            self.audiences["github"].append(audience)
            claims["aud"] = audience
        token = self._github.mint("github", **claims)
        return web.json_response({"count": 2304, "value": token})

    async def _buildkite_token(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Token {self.agent_token}":
            return web.json_response({"message": "Unauthorized"}, status=401)
        body = await request.json()
        claims: dict[str, Any] = {"job_id": request.match_info["job_id"]}
        audience = body.get("audience")
        if audience:
            self.audiences["buildkite"].append(audience)
            claims["aud"] = audience
        return web.json_response({"token": self._buildkite.mint("buildkite", **claims)})
