"""The workspace of an API job: its repository checked out at its commit, on this node.

The repository is fetched from the agent's `checkout_url` with the repository's path in place of
`{repository}` (by default `https://github.com/{repository}.git`), so the agent fetches from where
its site says repositories live, whoever submitted the job. A repository the submitter gave as a
URL must be that same place. The commit is fetched by the token's ref where it has one (the commit
is most likely there), else by its id, and checked out detached, with neither the system's nor the
service account's git config (`runner.sources.github.checkout`, which the GitHub source uses too;
no credentials are sent). A job with no repository gets an empty workspace.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from runner.gateway.submission import repository_path
from runner.sources.github.checkout import CheckoutFailed, checkout
from runner.sources.refusal import Refusal

__all__ = ["CheckoutFailed", "CheckoutRefused", "check_out", "clone_url", "empty_workspace"]

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


async def check_out(url: str, commit: str, workspace: Path, *, ref: str | None) -> str:
    """Make `workspace` a checkout of `commit` from `url`; git's output, or CheckoutFailed."""
    return await checkout(url, commit, workspace, ref=ref, token=None)


async def empty_workspace(workspace: Path) -> None:
    """The workspace of a job without a repository: a new empty directory."""
    await asyncio.to_thread(workspace.mkdir, mode=0o700, parents=True, exist_ok=True)
