"""A verified token's claims as the policy's identity: the claims each CI system documents, the
events they map to, and the claims that refuse a token. Pure: the claims come from the issuer
emulator's documented shapes, and no token is signed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes.oidc_issuer import DROP, Kind, OidcIssuerEmulator

from runner.identity import Identity
from runner.oidc.claims import identity_from_claims
from runner.oidc.errors import TokenRejected
from runner.policy import decide, parse_policy_text
from runner.spec import parse_job_text

from .oidc_trust import trusted


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuerEmulator]:
    async with OidcIssuerEmulator() as emulator:
        yield emulator


def identity(issuer: OidcIssuerEmulator, kind: Kind, **overrides: Any) -> Identity:
    return identity_from_claims(trusted(issuer, kind), issuer.claims(kind, **overrides))


def refusal(issuer: OidcIssuerEmulator, kind: Kind, **overrides: Any) -> str:
    with pytest.raises(TokenRejected) as caught:
        identity(issuer, kind, **overrides)
    return caught.value.reason


# --- GitHub Actions --------------------------------------------------------------------------------


@pytest.mark.parametrize(("event_name", "event", "fork"), [
    ("push", "push", False),
    ("pull_request", "pull_request", False),
    ("pull_request_target", "pull_request", True),
    ("merge_group", "merge_group", False),
    ("schedule", "schedule", False),
    ("workflow_dispatch", "api", False),
    ("repository_dispatch", "api", False),
    ("workflow_run", "trigger", False),
    ("release", "release", False),
])
async def test_github_events_map_to_the_policy_s_events(
        issuer: OidcIssuerEmulator, event_name: str, event: str, fork: bool) -> None:
    found = identity(issuer, "github", event_name=event_name)
    assert (found.effective_event, found.fork) == (event, fork)


async def test_a_pull_request_target_token_needs_a_grant_for_forks(issuer: OidcIssuerEmulator) -> None:
    """It carries the base repository's name while it may run a fork's code."""
    policy = parse_policy_text("""\
version = 1
[accounts.octo]
slurm_account = "octo"
partitions = ["batch"]
[images.ci]
path = "/images/ci.sif"
sha256 = "%s"
[[grants]]
name = "octo"
principals = ["github:repo:octo-org/octo-repo"]
account = "octo"
images = ["ci"]
""" % ("a" * 64), "policy.toml")
    job = parse_job_text('[job]\nname = "t"\nimage = "ci"\ncommand = ["true"]\n', "job.toml")
    assert decide(policy, identity(issuer, "github", event_name="pull_request_target"), job).reasons == (
        "grant 'octo': the job comes from a fork and the grant has forks = false",)
    assert decide(policy, identity(issuer, "github", event_name="pull_request"), job).allowed


async def test_a_bot_actor_is_left_out_not_refused(issuer: OidcIssuerEmulator) -> None:
    found = identity(issuer, "github", actor="dependabot[bot]")
    assert found.principals() == ("github:org:octo-org", "github:repo:octo-org/octo-repo")


async def test_the_repository_comes_from_its_claim_never_from_sub(issuer: OidcIssuerEmulator) -> None:
    found = identity(issuer, "github", sub="repo:trusted-org/trusted-repo:ref:refs/heads/main")
    assert found.repository == "octo-org/octo-repo"
    # A customised or id-based sub changes nothing either.
    assert identity(issuer, "github", sub="repo:octo-org@65/octo-repo@74:environment:prod") == \
        identity(issuer, "github")


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"repository": DROP}, "the token has no repository claim, which a github token carries"),
    ({"repository_owner": "evil-org"},
     "claims repository 'octo-org/octo-repo' and repository_owner 'evil-org' disagree"),
    ({"repository": "octo-org/a/b", "repository_owner": "octo-org"},
     "claim repository: 'octo-org/a/b' is not valid here"),
    ({"ref": "main"}, "claim ref: 'main' is not valid here"),
    ({"repository": 74}, "claim repository must be a string, got int"),
])
async def test_github_claims_that_refuse_the_token(
        issuer: OidcIssuerEmulator, overrides: dict[str, Any], reason: str) -> None:
    assert refusal(issuer, "github", **overrides) == reason


# --- Buildkite -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("build_source", "event"), [
    ("webhook", "push"), ("ui", "ui"), ("api", "api"), ("schedule", "schedule"), ("trigger_job", "trigger"),
])
async def test_buildkite_build_sources_map_as_for_the_buildkite_source(
        issuer: OidcIssuerEmulator, build_source: str, event: str) -> None:
    assert identity(issuer, "buildkite", build_source=build_source).effective_event == event


async def test_a_buildkite_tag_build_decides_on_the_tag(issuer: OidcIssuerEmulator) -> None:
    found = identity(issuer, "buildkite", build_tag="v1.2.0", build_branch="v1.2.0")
    assert found.effective_ref == "refs/tags/v1.2.0"


async def test_a_buildkite_commit_that_is_not_a_sha_is_no_commit(issuer: OidcIssuerEmulator) -> None:
    assert identity(issuer, "buildkite", build_commit="HEAD").commit is None


async def test_a_buildkite_branch_of_a_fork_counts_as_a_fork(issuer: OidcIssuerEmulator) -> None:
    assert identity(issuer, "buildkite", build_branch="mallory:main").fork is True
    assert identity(issuer, "buildkite").fork is False


async def test_a_buildkite_token_of_another_organisation_is_refused(issuer: OidcIssuerEmulator) -> None:
    assert refusal(issuer, "buildkite", organization_slug="evil-corp") == (
        "organization evil-corp is not the pinned acme-inc")


# --- GitLab ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pipeline_source", "event"), [
    ("push", "push"), ("merge_request_event", "pull_request"),
    ("external_pull_request_event", "pull_request"), ("schedule", "schedule"), ("api", "api"), ("web", "ui"),
    ("trigger", "trigger"), ("pipeline", "trigger"), ("parent_pipeline", "trigger"), ("chat", "chat"),
])
async def test_gitlab_pipeline_sources_map_to_the_policy_s_events(
        issuer: OidcIssuerEmulator, pipeline_source: str, event: str) -> None:
    assert identity(issuer, "gitlab", pipeline_source=pipeline_source).effective_event == event


async def test_a_gitlab_project_in_a_subgroup_holds_every_group_above_it(issuer: OidcIssuerEmulator) -> None:
    found = identity(issuer, "gitlab", project_path="climate/ocean/solver", namespace_path="climate/ocean",
                     ref_protected="true")
    assert found.principals() == ("gitlab:group:climate", "gitlab:group:climate/ocean",
                                  "gitlab:project:climate/ocean/solver", "gitlab:user:sample-user")
    assert found.ref_protected is True


async def test_a_gitlab_ref_is_made_from_its_type_when_the_path_is_missing(
        issuer: OidcIssuerEmulator) -> None:
    assert identity(issuer, "gitlab", ref_path=DROP, ref="v2", ref_type="tag").effective_ref == "refs/tags/v2"
    assert identity(issuer, "gitlab", ref_path=DROP, ref="main").effective_ref == "refs/heads/main"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"namespace_path": "other-group"},
     "claims project_path 'my-group/my-project' and namespace_path 'other-group' disagree"),
    ({"project_path": DROP}, "the token has no project_path claim, which a gitlab token carries"),
    ({"ref_protected": "yes"}, "claim ref_protected must be true or false, got 'yes'"),
])
async def test_gitlab_claims_that_refuse_the_token(
        issuer: OidcIssuerEmulator, overrides: dict[str, Any], reason: str) -> None:
    assert refusal(issuer, "gitlab", **overrides) == reason


# --- a site's identity provider --------------------------------------------------------------------


async def test_an_identity_provider_user_is_its_username_else_its_sub(issuer: OidcIssuerEmulator) -> None:
    assert identity(issuer, "generic").user == "alice"
    assert identity(issuer, "generic", preferred_username=DROP).user == "f7c9a3e2-5b1d-4c8e-9a6f-2d4b8e1c7a90"
    by_email = identity_from_claims(trusted(issuer, "generic", username_claim="email"),
                                    issuer.claims("generic"))
    assert by_email.principals()[0] == "idp:user:alice@example.org"


async def test_groups_a_principal_cannot_name_are_left_out(issuer: OidcIssuerEmulator) -> None:
    found = identity(issuer, "generic", groups=["hpc-users", "Domain Users", "/realm/path", "hpc-users"])
    assert found.groups == ("hpc-users",)
    roles = identity_from_claims(trusted(issuer, "generic", groups_claim="roles"),
                                 issuer.claims("generic", roles=["admin"]))
    assert roles.groups == ("admin",)


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"groups": "hpc-users"}, "claim groups must be a list of strings"),
    ({"preferred_username": DROP, "sub": DROP},
     "the token has none of the claims preferred_username, sub, which name its user"),
    ({"preferred_username": "alice smith"}, "claim preferred_username: 'alice smith' is not valid here"),
])
async def test_identity_provider_claims_that_refuse_the_token(
        issuer: OidcIssuerEmulator, overrides: dict[str, Any], reason: str) -> None:
    assert refusal(issuer, "generic", **overrides) == reason
