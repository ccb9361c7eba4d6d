"""Checkout of the commit under test with the installation token: used for the fetch, kept nowhere.

The repository is served over HTTP (git's dumb protocol, from a bare repository on disk) by a
server that refuses any request without the expected `Authorization` header, and records what it
got; the token must reach it, and must not be found afterwards in the workspace, in git's output
or on the command line.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from conftest import git

from runner.sources.github.checkout import CheckoutFailed, auth_environment, checkout

from .github_site import GitRepo

TOKEN = "ghs_12345_" + "x" * 500        # the stateless format: long and opaque


class GitServer:
    """Serves the bare repositories under `root` over git's dumb HTTP protocol, to a request whose
    Basic credentials are `x-access-token:T` for a token T that `accepts` (by default TOKEN alone)."""

    def __init__(self, root: Path, accepts: Callable[[str], bool] = TOKEN.__eq__) -> None:
        self.root = root
        self.accepts = accepts
        self.authorizations: list[str | None] = []
        self.base = ""
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self.url = f"{self.base}/origin.git"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        self.authorizations.append(header)
        if not self._authorized(header):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="GitHub"'})
        path = (self.root / request.match_info["tail"]).resolve()
        if not path.is_file() or self.root.resolve() not in path.parents:
            return web.Response(status=404)
        # Plain files: git falls back to the dumb HTTP protocol.
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")

    def _authorized(self, header: str | None) -> bool:
        scheme, _, encoded = (header or "").partition(" ")
        try:
            user, _, token = base64.b64decode(encoded, validate=True).decode().partition(":")
        except ValueError:
            return False
        return scheme == "Basic" and user == "x-access-token" and self.accepts(token)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[GitServer, GitRepo]]:
    repo = GitRepo(tmp_path / "git")
    server = GitServer(tmp_path / "git")
    await server.start()
    try:
        yield server, repo
    finally:
        await server.close()


async def test_a_pull_request_head_is_fetched_with_the_token_which_stays_nowhere(
        served: tuple[GitServer, GitRepo], tmp_path: Path) -> None:
    server, repo = served
    repo.commit({"README": "main\n"})
    head = repo.commit({"README": "change\n"}, branch="topic", start="main")
    repo.publish_pull(7, head)
    git("update-server-info", cwd=repo.bare)
    workspace = tmp_path / "job" / "workspace"

    output = await checkout(server.url, head, workspace, ref="refs/pull/7/head", token=TOKEN)

    assert (workspace / "README").read_text() == "change\n"
    assert git("rev-parse", "HEAD", cwd=workspace).strip() == head
    assert server.authorizations and all(server.authorizations)
    for path in workspace.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
            assert b"x-access-token" not in path.read_bytes(), path
    assert TOKEN not in output
    assert git("config", "--local", "--list", cwd=workspace).count("extraheader") == 0


async def test_without_the_token_the_fetch_fails_and_says_so(served: tuple[GitServer, GitRepo],
                                                             tmp_path: Path) -> None:
    server, repo = served
    sha = repo.commit({"README": "main\n"})
    git("update-server-info", cwd=repo.bare)
    with pytest.raises(CheckoutFailed, match=f"could not fetch commit {sha[:12]}"):
        await checkout(server.url, sha, tmp_path / "ws", ref="refs/heads/main", token="ghs_wrong")


async def test_a_sha_that_is_not_one_is_refused_before_git_runs(tmp_path: Path) -> None:
    with pytest.raises(CheckoutFailed, match="is not a commit SHA"):
        await checkout("https://github.com/o/r.git", "--upload-pack=evil", tmp_path / "ws", ref=None,
                       token=None)
    assert not (tmp_path / "ws").exists()


def test_the_token_goes_only_to_the_repository_s_own_origin() -> None:
    env = auth_environment("https://github.example.org/CliMA/ClimaAtmos.jl.git", "ghs_abc")
    assert env["GIT_CONFIG_COUNT"] == "1"
    assert env["GIT_CONFIG_KEY_0"] == "http.https://github.example.org/.extraHeader"
    assert env["GIT_CONFIG_VALUE_0"] == "Authorization: Basic " + base64.b64encode(
        b"x-access-token:ghs_abc").decode()
    assert auth_environment("/srv/git/repo.git", "ghs_abc") == {}
    assert auth_environment("https://github.com/o/r.git", None) == {}
