"""The OIDC ID token `hpc-runner remote` presents, from where `calls.token_source` says it is.

A file (checked like every secret file), a variable (GitLab's `id_tokens`), GitHub Actions' token
endpoint, or the Buildkite agent. From GitHub and Buildkite the token is asked for the audience
bound to the one job (`calls.requested_audience`), so whoever takes it can submit nothing else.
The token is never printed nor logged; what a failure says names only where it was asked.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import aiohttp

from runner.errors import HpcRunnerError
from runner.remote.calls import TokenSource, buildkite_command, github_token_url
from runner.secrets import read_secret_file
from runner.urls import https_url

MAX_TOKEN_BYTES = 64 * 1024
_TIMEOUT_SECONDS = 30


class TokenUnavailable(HpcRunnerError):
    """No token could be had from the source named."""


async def obtain_token(source: TokenSource, audience: str, *, env: Mapping[str, str],
                       http: aiohttp.ClientSession) -> str:
    """The token from `source`; `audience` is what GitHub and Buildkite are asked for."""
    if source.kind == "file":
        token = read_secret_file(source.where, what="OIDC token file")
    elif source.kind == "env":
        token = env.get(source.where, "")
        if not token:
            raise TokenUnavailable(f"the variable {source.where} holds no token")
    elif source.kind == "github":
        token = await _from_github(source.where, env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"], audience, http)
    else:
        token = await _from_buildkite(audience)
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_BYTES or any(ch.isspace() for ch in token):
        raise TokenUnavailable(f"what {_where(source)} gave is not a token")
    return token


def _where(source: TokenSource) -> str:
    return {"file": f"the file {source.where}", "env": f"the variable {source.where}",
            "github": "GitHub Actions' token endpoint", "buildkite": "buildkite-agent"}[source.kind]


async def _from_github(request_url: str, request_token: str, audience: str,
                       http: aiohttp.ClientSession) -> str:
    """GET `$ACTIONS_ID_TOKEN_REQUEST_URL&audience=A` with the request token; the answer's `value`."""
    try:
        https_url(request_url)
    except ValueError as error:
        raise TokenUnavailable(f"ACTIONS_ID_TOKEN_REQUEST_URL: {error}") from None
    try:
        headers = {"Authorization": f"bearer {request_token}", "Accept": "application/json"}
        async with http.get(github_token_url(request_url, audience), headers=headers,
                            timeout=aiohttp.ClientTimeout(total=_TIMEOUT_SECONDS)) as response:
            if response.status != 200:
                raise TokenUnavailable(f"GitHub Actions' token endpoint answered {response.status}; does the "
                                       "workflow have `permissions: id-token: write`?")
            answer = await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError) as error:
        raise TokenUnavailable(f"GitHub Actions' token endpoint cannot be read: {error}") from None
    value = answer.get("value") if isinstance(answer, dict) else None
    if not isinstance(value, str):
        raise TokenUnavailable("GitHub Actions' token endpoint answered without a `value`")
    return value


async def _from_buildkite(audience: str) -> str:
    """`buildkite-agent oidc request-token --audience A`: the token on its stdout."""
    try:
        process = await asyncio.create_subprocess_exec(
            *buildkite_command(audience), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    except OSError as error:
        raise TokenUnavailable(f"buildkite-agent cannot be run: {error.strerror or error}") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise TokenUnavailable(f"buildkite-agent oidc request-token gave no token in {_TIMEOUT_SECONDS} s"
                               ) from None
    if process.returncode != 0:
        said = err.decode("utf-8", "replace").strip()[-500:]
        raise TokenUnavailable(f"buildkite-agent oidc request-token failed (exit {process.returncode})"
                               + (f": {said}" if said else ""))
    return out.decode("utf-8", "replace")
