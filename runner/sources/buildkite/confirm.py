"""Confirming a Buildkite pull request build through GitHub, when the agent has a GitHub App.

Buildkite asserts a pull request build's number, its fork status (`BUILDKITE_PULL_REQUEST_REPO`
against `BUILDKITE_REPO`) and its commit, and no signature covers them unless the pipeline signs
them. With a `[github]` section the agent asks GitHub with the App's own credentials, as the
GitHub source does: is the pull request's head repository another repository (a fork), and is
the job's commit the pull request's head? A job whose claims GitHub contradicts does not run.

`pull_request_claim` and `check_pull` are pure; `confirm_pull_request` makes the one request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.identity import Identity
from runner.sources.github.client import GitHubClient, GitHubHTTPError, api_path
from runner.sources.github.repository_urls import github_repository
from runner.sources.github.translate import is_fork
from runner.sources.refusal import Refusal

_FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class NotConfirmed(Refusal):
    """GitHub does not back the job's claims up."""


@dataclass(frozen=True)
class PullRequestClaim:
    """What a Buildkite job says about its pull request."""

    repository: str   # OWNER/NAME on the App's GitHub (from BUILDKITE_REPO)
    number: int
    commit: str       # BUILDKITE_COMMIT: a SHA, or HEAD
    fork: bool        # the identity's fork status


def pull_request_claim(env: Mapping[str, str], identity: Identity, web_host: str) -> PullRequestClaim | None:
    """The claims of a pull request build of a repository on `web_host`; None for other jobs."""
    number = env.get("BUILDKITE_PULL_REQUEST", "false")
    if not number.isdigit() or not 0 < int(number) < 2**31:
        return None
    repository = github_repository(env.get("BUILDKITE_REPO", ""), web_host)
    if repository is None:
        return None
    return PullRequestClaim(repository, int(number), env.get("BUILDKITE_COMMIT", "") or "HEAD", identity.fork)


def check_pull(claim: PullRequestClaim, pull: Mapping[str, Any]) -> str:
    """The pull request's head SHA, if GitHub's answer `pull` backs `claim` up (NotConfirmed if not).

    A head in another repository than the base is a fork, whatever Buildkite says; a job that
    calls itself a fork when GitHub says it is none is left a fork (that only denies more).
    """
    where = f"pull request #{claim.number} of {claim.repository}"
    head = pull.get("head")
    head_sha = str(head.get("sha") or "") if isinstance(head, Mapping) else ""
    if not _FULL_SHA.fullmatch(head_sha):
        raise NotConfirmed(f"GitHub's answer for {where} names no head commit")
    if is_fork(pull) and not claim.fork:
        head_repo = head.get("repo") if isinstance(head, Mapping) else None
        name = head_repo.get("full_name") if isinstance(head_repo, Mapping) else None
        raise NotConfirmed(f"GitHub says {where} comes from a fork ({name or 'a deleted repository'}); "
                           "Buildkite's job says it does not")
    if claim.commit != "HEAD" and claim.commit.lower() != head_sha:
        raise NotConfirmed(f"the job's commit {claim.commit} is not the head of {where}, which GitHub says "
                           f"is {head_sha}")
    return head_sha


async def confirm_pull_request(client: GitHubClient, claim: PullRequestClaim) -> str:
    """The head SHA of the claimed pull request, read through the API and checked against the claim.

    Raises NotConfirmed when GitHub contradicts the claim or does not know the pull request, and
    GitHubError when it could not be asked (the job then fails; nothing runs unconfirmed).
    """
    owner, name = claim.repository.split("/")
    path = api_path("/repos/{owner}/{repo}/pulls/{number}", owner=owner, repo=name, number=claim.number)
    try:
        pull = await client.get(path)
    except GitHubHTTPError as exc:
        if exc.status != 404:
            raise
        if exc.path.endswith("/installation"):
            raise NotConfirmed(f"the GitHub App is not installed on {claim.repository}, so the pull "
                               f"request cannot be confirmed: install it there") from None
        raise NotConfirmed(f"GitHub knows no pull request #{claim.number} of {claim.repository}") from None
    if not isinstance(pull, Mapping):
        raise NotConfirmed(f"GitHub's answer for pull request #{claim.number} of {claim.repository} "
                           "is not a pull request")
    return check_pull(claim, pull)
