"""The workspace of an API job: its repository checked out at its commit, on this node.

The repository is fetched from the agent's `checkout_url` with the repository's path in place of
`{repository}` (by default `https://github.com/{repository}.git`), so the agent fetches from where
its site says repositories live, whoever submitted the job. A repository the submitter gave as a
URL must be that same place. The commit is fetched by the token's ref where it has one (the commit
is most likely there), else by its id, and checked out detached, with neither the system's nor the
service account's git config (`runner.sources.github.checkout`, which the GitHub source uses too).
A job with no repository gets an empty workspace.

Credentials: none, unless the agent has a GitHub App (`[github]`) and the URL names a repository
of the App's GitHub that the App is installed on; then the App's installation token opens it, for
this one fetch (a private repository checks out as the GitHub source's pull requests do). The
token is never sent to another host, and never reaches the job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from runner.errors import HpcRunnerError
from runner.gateway.submission import repository_path
from runner.sources.github.appauth import AppAuth, GitHubAuthError
from runner.sources.github.checkout import CheckoutFailed, checkout
from runner.sources.github.client import GitHubClient, GitHubError
from runner.sources.github.repository_urls import github_repository, github_web_host
from runner.sources.refusal import Refusal

__all__ = ["AppCheckoutTokens", "CheckoutFailed", "CheckoutRefused", "NoAppToken", "check_out", "clone_url",
           "empty_workspace"]

PLACEHOLDER = "{repository}"


class CheckoutRefused(Refusal):
    """The job's repository is not one this agent fetches from."""


def clone_url(template: str, repository: str) -> str:
    """Where `repository` (a path, or an https:// URL) is fetched from, by `template` (`checkout_url`)."""
    path = repository_path(repository)
    url = template.replace(PLACEHOLDER, path)
    if path != repository and _same_place(url) != _same_place(repository):
        raise CheckoutRefused(f"repository {repository} is not where this agent checks repositories out from "
                              f"(checkout_url {template}); name it by its path, {path}")
    return url


def _same_place(url: str) -> str:
    return url.rstrip("/").removesuffix(".git").lower()


async def check_out(url: str, commit: str, workspace: Path, *, ref: str | None,
                    token: str | None = None) -> str:
    """Make `workspace` a checkout of `commit` from `url` (with `token`, sent to `url`'s origin
    only); git's output, or CheckoutFailed."""
    return await checkout(url, commit, workspace, ref=ref, token=token)


class NoAppToken(HpcRunnerError):
    """The GitHub App has no token for this repository; the message says why."""


class AppCheckoutTokens:
    """The GitHub App's installation tokens for checkouts of repositories on its own GitHub."""

    def __init__(self, auth: AppAuth, client: GitHubClient, *, api_url: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._auth = auth
        self._client = client
        self._web_host = github_web_host(api_url)
        self._clock = clock

    async def for_url(self, url: str) -> str | None:
        """The token that opens `url`; None when `url` is not a repository of the App's GitHub (no
        credentials go elsewhere). NoAppToken when it is one and the App has no token for it (not
        installed there, or GitHub out of reach)."""
        repository = github_repository(url, self._web_host)
        if repository is None:
            return None
        try:
            installation = await self._auth.installation_for(self._client, repo=repository)
            return await self._auth.token(self._client, installation, self._clock())
        except (GitHubError, GitHubAuthError) as exc:
            raise NoAppToken(f"the GitHub App has no token for {repository}: {exc}") from None


async def empty_workspace(workspace: Path) -> None:
    """The workspace of a job without a repository: a new empty directory."""
    await asyncio.to_thread(workspace.mkdir, mode=0o700, parents=True, exist_ok=True)
