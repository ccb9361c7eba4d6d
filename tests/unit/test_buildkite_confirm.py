"""What a Buildkite pull request build claims, and GitHub's answer held against it (pure parts)."""

from __future__ import annotations

from typing import Any

import pytest

from runner.identity import Identity
from runner.sources.buildkite.confirm import NotConfirmed, PullRequestClaim, check_pull, pull_request_claim
from runner.sources.github.repository_urls import github_repository, github_web_host

HEAD = "a" * 40
BUILD = Identity(source="buildkite", organization="clima", pipeline="atmos", event="pull_request",
                 ref="refs/pull/7/head")


def test_the_web_host_of_github_com_and_of_an_enterprise_server() -> None:
    assert github_web_host("https://api.github.com") == "github.com"
    assert github_web_host("https://GHE.example.org/api/v3") == "ghe.example.org"


@pytest.mark.parametrize(("url", "expected"), [
    ("https://github.com/CliMA/ClimaAtmos.jl.git", "CliMA/ClimaAtmos.jl"),
    ("https://github.com/CliMA/ClimaAtmos.jl", "CliMA/ClimaAtmos.jl"),
    ("https://user:token@github.com/CliMA/ClimaAtmos.jl.git", "CliMA/ClimaAtmos.jl"),
    ("git@github.com:CliMA/ClimaAtmos.jl.git", "CliMA/ClimaAtmos.jl"),
    ("ssh://git@github.com/CliMA/ClimaAtmos.jl.git", "CliMA/ClimaAtmos.jl"),
    ("git@GitHub.com:CliMA/ClimaAtmos.jl", "CliMA/ClimaAtmos.jl"),
    ("https://gitlab.com/CliMA/ClimaAtmos.jl.git", None),
    ("https://github.com.evil.example/CliMA/ClimaAtmos.jl.git", None),
    ("https://github.com/CliMA/ClimaAtmos.jl/tree/main", None),
    ("https://github.com/CliMA", None),
    ("/srv/git/ClimaAtmos.jl", None),
    ("https://github.com/CliMA/..%2Fx", None),
    ("https://github.com/CliMA/..", None),
])
def test_a_clone_url_names_a_repository_of_that_github_or_none(url: str, expected: str | None) -> None:
    assert github_repository(url, "github.com") == expected


def test_only_numbered_pull_request_builds_of_that_github_are_claims() -> None:
    env = {"BUILDKITE_PULL_REQUEST": "7", "BUILDKITE_REPO": "git@github.com:CliMA/Atmos.git",
           "BUILDKITE_COMMIT": HEAD}
    assert pull_request_claim(env, BUILD, "github.com") == PullRequestClaim("CliMA/Atmos", 7, HEAD, False)
    assert pull_request_claim({**env, "BUILDKITE_PULL_REQUEST": "false"}, BUILD, "github.com") is None
    assert pull_request_claim({**env, "BUILDKITE_PULL_REQUEST": "0"}, BUILD, "github.com") is None
    assert pull_request_claim(env, BUILD, "ghe.example.org") is None
    assert pull_request_claim({**env, "BUILDKITE_COMMIT": ""}, BUILD, "github.com") == PullRequestClaim(
        "CliMA/Atmos", 7, "HEAD", False)


def _pull(head_repo_id: int | None, sha: str = HEAD) -> dict[str, Any]:
    head_repo = None if head_repo_id is None else {"id": head_repo_id, "full_name": "mallory/Atmos"}
    return {"head": {"sha": sha, "repo": head_repo}, "base": {"repo": {"id": 1, "full_name": "CliMA/Atmos"}}}


def test_a_pull_request_from_a_fork_is_refused_when_the_job_says_it_is_none() -> None:
    claim = PullRequestClaim("CliMA/Atmos", 7, HEAD, fork=False)
    with pytest.raises(NotConfirmed, match=r"GitHub says pull request #7 of CliMA/Atmos comes from a fork "
                                           r"\(mallory/Atmos\); Buildkite's job says it does not"):
        check_pull(claim, _pull(2))
    with pytest.raises(NotConfirmed, match=r"from a fork \(a deleted repository\)"):
        check_pull(claim, _pull(None))
    # A job that calls itself a fork stays one: that only denies more.
    assert check_pull(PullRequestClaim("CliMA/Atmos", 7, HEAD, fork=True), _pull(1)) == HEAD
    assert check_pull(PullRequestClaim("CliMA/Atmos", 7, HEAD, fork=True), _pull(2)) == HEAD


def test_the_jobs_commit_must_be_the_pull_requests_head() -> None:
    older = "b" * 40
    with pytest.raises(NotConfirmed, match=f"the job's commit {older} is not the head of pull request #7 of "
                                           f"CliMA/Atmos, which GitHub says is {HEAD}"):
        check_pull(PullRequestClaim("CliMA/Atmos", 7, older, fork=False), _pull(1))
    assert check_pull(PullRequestClaim("CliMA/Atmos", 7, HEAD.upper(), fork=False), _pull(1)) == HEAD
    assert check_pull(PullRequestClaim("CliMA/Atmos", 7, "HEAD", fork=False), _pull(1)) == HEAD
    with pytest.raises(NotConfirmed, match="names no head commit"):
        check_pull(PullRequestClaim("CliMA/Atmos", 7, "HEAD", fork=False), _pull(1, sha="HEAD~1"))
