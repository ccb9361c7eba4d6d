"""Who may see an API job: its repository's (pipeline's, project's) tokens and its account's admins,
keyed so that SQLite can answer; the same answers as the policy's own principal matching."""

from __future__ import annotations

import pytest

from runner.gateway.access import (
    ADMIN,
    MEMBER,
    OWNER,
    Access,
    access_of,
    admin_keys,
    caller_keys,
    may_access,
    member_keys,
    owner_keys,
)
from runner.principals import parse_principal


def test_owners_are_repositories_pipelines_and_projects_never_users() -> None:
    assert owner_keys(["github:org:CliMA", "github:repo:CliMA/X.jl", "github:user:octocat"]) == (
        "github:repo:clima/x.jl",)
    assert owner_keys(["buildkite:org:clima", "buildkite:pipeline:clima/ocean"]) == (
        "buildkite:pipeline:clima/ocean",)
    assert owner_keys(["gitlab:group:g", "gitlab:project:g/sub/p", "gitlab:user:u"]) == (
        "gitlab:project:g/sub/p",)
    # A site IdP's user has no repository: the user owns its jobs.
    assert owner_keys(["idp:user:alice", "idp:group:climate"]) == ("idp:user:alice",)
    assert owner_keys(["local:user:alice"]) == ()


def test_another_token_of_the_same_repository_sees_the_job_another_repository_does_not() -> None:
    job = owner_keys(["github:org:CliMA", "github:repo:CliMA/X.jl", "github:user:octocat"])
    assert may_access(job, caller_keys(["github:repo:clima/x.jl", "github:user:someone-else"]))
    assert not may_access(job, caller_keys(["github:org:CliMA", "github:repo:CliMA/Y.jl",
                                            "github:user:octocat"]))


@pytest.mark.parametrize("pattern, principal", [
    ("github:team:CliMA/core", "github:team:clima/Core"),
    ("github:repo:CliMA/*", "github:repo:CliMA/X.jl"),
    ("github:repo:CliMA/*", "github:repo:CliMAX/X.jl"),
    ("github:user:octocat", "github:user:OctoCat"),
    ("buildkite:pipeline:clima/*", "buildkite:pipeline:clima/ocean"),
    ("buildkite:pipeline:clima/*", "buildkite:pipeline:Clima/ocean"),
    ("gitlab:project:g/sub/*", "gitlab:project:g/sub/p"),
    ("gitlab:project:g/*", "gitlab:project:g/sub/p"),
    ("gitlab:group:g/sub", "gitlab:group:g/sub"),
    ("idp:group:climate", "idp:group:climate"),
    ("idp:group:climate", "idp:user:climate"),
])
def test_admin_keys_match_exactly_what_the_policy_matches(pattern: str, principal: str) -> None:
    expected = parse_principal(pattern).matches(principal)
    assert may_access(admin_keys([pattern]), caller_keys([principal])) is expected


def test_an_admin_that_is_no_principal_is_refused() -> None:
    with pytest.raises(ValueError, match=r"admins: .*unknown principal type"):
        admin_keys(["github:account:x"])


def test_members_see_owners_and_admins_also_cancel_everyone_else_neither() -> None:
    job = ((OWNER, "github:repo:clima/x.jl"), (ADMIN, "github:team:clima/leads"),
           (MEMBER, "github:repo:clima/*"))
    assert access_of(job, caller_keys(["github:repo:CliMA/X.jl"])) is Access.CANCEL
    assert access_of(job, caller_keys(["github:team:CliMA/Leads"])) is Access.CANCEL
    assert access_of(job, caller_keys(["github:repo:CliMA/Y.jl"])) is Access.SEE
    assert access_of(job, caller_keys(["github:repo:Other/X.jl", "github:org:CliMA"])) is Access.NONE
    assert member_keys(["github:repo:CliMA/*"]) == ("github:repo:clima/*",)
