"""Typed principals, their one wildcard, and the identities that hold them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.errors import InputError
from runner.identity import Identity, identity_from_json, load_identity
from runner.policy import decide, parse_policy_text
from runner.principals import PrincipalPattern, check_ref_pattern, parse_principal, ref_matches
from runner.spec import parse_job_text

GITHUB_ALICE: dict[str, Any] = {
    "source": "github", "repository": "CliMA/ClimaAtmos.jl", "actor": "alice", "teams": ["CliMA/core"],
    "event": "pull_request", "ref": "refs/pull/12/head", "fork": False}
BUILDKITE_MAIN: dict[str, Any] = {
    "source": "buildkite", "organization": "clima", "pipeline": "climaatmos-ci", "branch": "main",
    "creator": "alice@example.org", "teams": ["core"], "fork": False, "signer": "clima-2026"}
LOCAL_ALICE: dict[str, Any] = {"source": "local", "user": "alice", "groups": ["esm"]}


@pytest.mark.parametrize(("text", "pattern"), [
    ("github:org:CliMA", PrincipalPattern("github", "org", "CliMA", None)),
    ("github:repo:CliMA/ClimaAtmos.jl", PrincipalPattern("github", "repo", "CliMA", "ClimaAtmos.jl")),
    ("github:team:CliMA/core", PrincipalPattern("github", "team", "CliMA", "core")),
    ("github:user:alice", PrincipalPattern("github", "user", "alice", None)),
    ("buildkite:org:clima", PrincipalPattern("buildkite", "org", "clima", None)),
    ("buildkite:pipeline:clima/climaatmos-ci",
     PrincipalPattern("buildkite", "pipeline", "clima", "climaatmos-ci")),
    ("buildkite:team:clima/core", PrincipalPattern("buildkite", "team", "clima", "core")),
    ("local:user:alice", PrincipalPattern("local", "user", "alice", None)),
    ("local:group:esm", PrincipalPattern("local", "group", "esm", None)),
    ("github:repo:CliMA/*", PrincipalPattern("github", "repo", "CliMA", "*")),
    ("buildkite:pipeline:atmos/*", PrincipalPattern("buildkite", "pipeline", "atmos", "*")),
])
def test_every_principal_type_parses(text: str, pattern: PrincipalPattern) -> None:
    assert parse_principal(text) == pattern
    assert str(pattern) == text


@pytest.mark.parametrize(("text", "message"), [
    ("github:repo:CliMA/*x", r"'\*' is only allowed as the whole last part \('CliMA/\*'\)"),
    ("github:repo:CliMA/x*", r"'\*' is only allowed as the whole last part"),
    ("github:repo:CliMA/*/x", r"'\*' is only allowed as the whole last part"),
    ("github:team:CliMA/core/*", r"'\*' is only allowed as the whole last part"),
    ("github:repo:*/x", "the organisation must be spelled out"),
    ("github:repo:Cli*/x", "the organisation must be spelled out"),
    ("github:repo:*", "the organisation must be spelled out"),
    ("github:*:x", r"a wildcard is only allowed as a trailing '/\*' after an organisation, never in the"),
    ("*:team:CliMA/core", "never in the source or the type"),
    ("local:group:*", "local:group names have no organisation part"),
    ("local:user:al*", "local:user names have no organisation part"),
    ("github:org:*", "github:org names have no organisation part"),
    ("github:user:*", "github:user names have no organisation part"),
    ("github:repo:CliMA/x/y", "'x/y' is not a valid repo name"),
    ("github:team:CliMA", "a github:team principal is OWNER/NAME"),
    ("github:team:CliMA/", "'' is not a valid team name"),
    ("github:repo:/x", "'' is not a valid organisation name"),
    ("github:group:CliMA", "unknown principal type github:group"),
    ("gitlab:org:x", "unknown principal type gitlab:org"),
    ("github:org", "is not a principal"),
    ("github:team:CliMA/core:x", "is not a principal"),
    ("", "is not a principal"),
    ("local:user:ali ce", "'ali ce' is not a valid user name"),
    ("local:group:-x", "'-x' is not a valid group name"),
])
def test_malformed_principals_are_rejected_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_principal(text)


@pytest.mark.parametrize(("pattern", "held", "matches"), [
    ("github:repo:CliMA/*", "github:repo:CliMA/ClimaAtmos.jl", True),
    ("github:repo:CliMA/*", "github:repo:CliMAX/x", False),
    ("github:repo:CliMA/*", "github:repo:CliMA/x/y", False),
    ("github:repo:CliMA/*", "github:repo:CliMA/", False),
    ("github:repo:CliMA/*", "github:repo:CliMA", False),
    ("github:repo:CliMA/*", "github:team:CliMA/core", False),
    ("github:repo:CliMA/*", "github:org:CliMA", False),
    ("github:repo:ocean-lab/*", "github:repo:ocean-lab-x/repo", False),
    ("github:team:CliMA/core", "github:team:CliMA/core", True),
    ("github:team:CliMA/core", "github:team:CliMA/core-admins", False),
    ("github:team:CliMA/core", "github:team:CliMA/cor", False),
    ("github:team:CliMA/core", "github:team:clima/CORE", True),    # GitHub names ignore case
    ("github:org:CliMA", "github:org:clima", True),
    ("github:org:CliMA", "github:org:CliMAX", False),
    ("github:user:alice", "github:user:alice", True),
    ("github:user:alice", "github:user:alicea", False),
    ("github:user:alice", "local:user:alice", False),
    ("buildkite:pipeline:clima/*", "buildkite:pipeline:clima/climaatmos-ci", True),
    ("buildkite:pipeline:clima/*", "buildkite:pipeline:clima-x/climaatmos-ci", False),
    ("buildkite:pipeline:clima/ci", "buildkite:pipeline:Clima/ci", False),  # Buildkite slugs are exact
    ("buildkite:team:clima/core", "buildkite:team:clima/core", True),
    ("buildkite:org:clima", "buildkite:org:clima", True),
    ("local:user:alice", "local:user:Alice", False),
    ("local:group:esm", "local:group:esm", True),
    ("local:group:esm", "local:group:esm-admins", False),
])
def test_principal_matching_is_exact_but_for_a_trailing_wildcard(
        pattern: str, held: str, matches: bool) -> None:
    assert parse_principal(pattern).matches(held) is matches


@pytest.mark.parametrize(("pattern", "ref", "matches"), [
    ("refs/heads/main", "refs/heads/main", True),
    ("refs/heads/main", "refs/heads/main2", False),
    ("refs/heads/main", "refs/heads/mai", False),
    ("refs/pull/*", "refs/pull/12/head", True),
    ("refs/pull/*", "refs/pull/", False),
    ("refs/pull/*", "refs/pull", False),
    ("refs/pull/*", "refs/pullx/1", False),
    ("refs/tags/*", "refs/tags/v1.0", True),
    ("refs/tags/*", "refs/heads/v1.0", False),
])
def test_ref_patterns_match_exactly_or_everything_below_a_trailing_wildcard(
        pattern: str, ref: str, matches: bool) -> None:
    assert ref_matches(pattern, ref) is matches


@pytest.mark.parametrize("pattern", ["main", "heads/main", "refs/*/main", "refs/heads/ma*", "refs/*",
                                     "refs/heads/../tags/x", "refs/heads/a b"])
def test_malformed_ref_patterns_are_rejected(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"git ref|only a trailing"):
        check_ref_pattern(pattern)


# --- identities -----------------------------------------------------------------------------------

def test_github_identity_holds_org_repo_user_and_team_principals() -> None:
    identity = identity_from_json(GITHUB_ALICE)
    assert identity.principals() == (
        "github:org:CliMA", "github:repo:CliMA/ClimaAtmos.jl", "github:user:alice", "github:team:CliMA/core")
    assert (identity.effective_event, identity.effective_ref, identity.fork) == (
        "pull_request", "refs/pull/12/head", False)


def test_buildkite_identity_holds_org_pipeline_and_team_principals() -> None:
    identity = identity_from_json(BUILDKITE_MAIN)
    assert identity.principals() == (
        "buildkite:org:clima", "buildkite:pipeline:clima/climaatmos-ci", "buildkite:team:clima/core")
    assert (identity.effective_event, identity.effective_ref, identity.signer) == (
        "push", "refs/heads/main", "clima-2026")


def test_local_identity_holds_user_and_group_principals() -> None:
    identity = identity_from_json(LOCAL_ALICE)
    assert identity.principals() == ("local:user:alice", "local:group:esm")
    assert (identity.effective_event, identity.effective_ref) == ("local", None)


def test_identity_to_json_round_trips() -> None:
    for data in (GITHUB_ALICE, BUILDKITE_MAIN, LOCAL_ALICE):
        assert identity_from_json(identity_from_json(data).to_json()) == identity_from_json(data)


def test_identity_without_fork_is_not_a_fork() -> None:
    data = {k: v for k, v in GITHUB_ALICE.items() if k != "fork"}
    assert identity_from_json(data).fork is False


def test_actor_principal_names_who_asked() -> None:
    assert identity_from_json(GITHUB_ALICE).actor_principal == "github:user:alice"
    assert identity_from_json(BUILDKITE_MAIN).actor_principal == "buildkite:pipeline:clima/climaatmos-ci"
    assert identity_from_json(LOCAL_ALICE).actor_principal == "local:user:alice"


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"source": "jenkins"}, "source", "must be one of github, buildkite, gitlab, idp, local; got 'jenkins'"),
    ({"signer": "k"}, "signer", "unknown field for a github identity"),
    ({"groups": ["esm"]}, "groups", "unknown field for a github identity"),
    ({"repository": None}, "repository", "must be a non-empty string"),
    ({"repository": ""}, "repository", "must be a non-empty string"),
    ({"repository": "CliMA"}, "repository", "'CliMA' is not valid here"),
    ({"repository": "CliMA/x/y"}, "repository", "'CliMA/x/y' is not valid here"),
    ({"repository": "CliMA/*"}, "repository", "'CliMA/\\*' is not valid here"),
    ({"actor": "al:ice"}, "actor", "'al:ice' is not valid here"),
    ({"ref": "main"}, "ref", "'main' is not valid here"),
    ({"teams": "CliMA/core"}, "teams", r"must be a list of names \(ORG/TEAM each\)"),
    ({"teams": ["core"]}, "teams", r"must be a list of names \(ORG/TEAM each\)"),
    ({"teams": [1]}, "teams", "must be a list of names"),
    ({"teams": ["CliMA/core"] * 1025}, "teams", "has more than 1024 entries"),
    ({"fork": "false"}, "fork", "must be true or false"),
    ({"fork": 0}, "fork", "must be true or false"),
    ({"actor": "a" * 300}, "actor", "at most 256 characters"),
    ({"actor": "al\x00ice"}, "actor", "must be a non-empty string"),
])
def test_malformed_github_identity_is_rejected_naming_the_field(
        change: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        identity_from_json({**GITHUB_ALICE, **change}, "id.json")
    assert (caught.value.file, caught.value.field) == ("id.json", field)


@pytest.mark.parametrize(("data", "field", "message"), [
    ({"source": "github"}, "repository", "is required"),
    ({"source": "buildkite", "organization": "clima"}, "pipeline", "is required"),
    ({"source": "local"}, "user", "is required"),
    ({"source": "local", "user": "alice", "fork": True}, "fork", "unknown field for a local identity"),
    ({"source": "local", "user": "alice", "teams": ["x"]}, "teams", "unknown field for a local identity"),
    ({"source": "local", "user": "alice", "groups": ["a b"]}, "groups", "must be a list of names"),
    ({"source": "buildkite", "organization": "clima", "pipeline": "p", "teams": ["a/b"]}, "teams",
     r"must be a list of names \(a name each\)"),
])
def test_incomplete_identities_are_rejected_naming_the_field(
        data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        identity_from_json(data)
    assert caught.value.field == field


@pytest.mark.parametrize("data", [[], "github", None, 1])
def test_identity_must_be_an_object(data: Any) -> None:
    with pytest.raises(InputError, match="an identity must be a JSON object"):
        identity_from_json(data)


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "identity.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_load_identity_reads_an_identity_file(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps(GITHUB_ALICE))
    assert load_identity(path) == identity_from_json(GITHUB_ALICE)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"source": "local",\n "user": "alice",\n}\n')
    with pytest.raises(InputError) as caught:
        load_identity(path)
    assert str(caught.value).startswith(f"{path}:3: invalid JSON: ")


def test_identity_field_errors_name_the_line_of_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, '{\n  "source": "local",\n  "user": "alice",\n  "groups": "esm"\n}\n')
    with pytest.raises(InputError) as caught:
        load_identity(path)
    assert str(caught.value) == f"{path}:4: groups: must be a list of names (a name each)"


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 100_000, "invalid JSON: arrays or objects nested too deeply"),
    ('{"source": "local", "user": "alice", "x": ' + "9" * 5000 + "}",
     "invalid JSON: a number has too many digits"),
])
def test_hostile_json_is_refused_without_a_traceback(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as caught:
        load_identity(path)
    assert str(caught.value) == f"{path}: {message}"


def test_a_two_megabyte_identity_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps(LOCAL_ALICE) + " " * (2 * 1024 * 1024))
    with pytest.raises(InputError) as caught:
        load_identity(path)
    assert str(caught.value) == f"{path}: file is larger than 1048576 bytes"


def test_a_binary_identity_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, b'{"source": "\xff"}')
    with pytest.raises(InputError) as caught:
        load_identity(path)
    assert str(caught.value) == f"{path}: not UTF-8 text"


def test_a_missing_identity_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        load_identity(tmp_path / "none.json")
    assert str(caught.value) == f"{tmp_path / 'none.json'}: no such file"


def test_identity_is_immutable() -> None:
    identity = Identity(source="local", user="alice")
    with pytest.raises(AttributeError):
        identity.user = "root"  # type: ignore[misc]


# --- user and group names with a domain, as SSSD gives them ---------------------------------------

SSSD_POLICY = """version = 1
[accounts.esm]
slurm_account = "esm"
partitions = ["batch"]
[images.ci]
path = "/images/ci.sif"
sha256 = "%s"
[[grants]]
name = "by-user"
principals = ["local:user:alice@example.org"]
account = "esm"
images = ["ci"]
[[grants]]
name = "by-group"
principals = ["local:group:esm@ad.example.org"]
account = "esm"
images = ["ci"]
""" % ("0" * 64)
SSSD_JOB = '[job]\nname = "t"\nimage = "ci"\ncommand = ["true"]\n'


@pytest.mark.parametrize("text", ["local:user:alice@example.org", "local:group:esm@ad.example.org",
                                  "local:user:ALICE@EXAMPLE.ORG", "local:user:host$@example.org"])
def test_local_names_with_a_domain_are_principals(text: str) -> None:
    assert str(parse_principal(text)) == text


@pytest.mark.parametrize(("text", "value"), [
    ("local:user:@example.org", "@example.org"), ("local:user:alice@", "alice@"),
    ("local:user:alice@@example.org", "alice@@example.org"),
    ("local:group:esm@ex ample.org", "esm@ex ample.org"),
    ("local:user:alice@example.org@x", "alice@example.org@x"),
])
def test_a_malformed_domain_is_refused(text: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{value!r} is not a valid"):
        parse_principal(text)


def test_a_user_with_a_domain_is_matched_by_name_and_domain() -> None:
    pattern = parse_principal("local:user:alice@example.org")
    assert pattern.matches("local:user:alice@example.org")
    assert not pattern.matches("local:user:alice")
    assert not pattern.matches("local:user:alice@example.com")
    assert not parse_principal("local:user:alice").matches("local:user:alice@example.org")


def test_a_policy_grants_sssd_users_and_groups() -> None:
    policy = parse_policy_text(SSSD_POLICY, "p.toml")
    job = parse_job_text(SSSD_JOB, "job.toml")
    alice = identity_from_json({"source": "local", "user": "alice@example.org",
                                "groups": ["staff@example.org"]})
    assert decide(policy, alice, job).grant == "by-user"
    bob = identity_from_json({"source": "local", "user": "bob@ad.example.org",
                              "groups": ["esm@ad.example.org"]})
    assert decide(policy, bob, job).grant == "by-group"
    carol = Identity(source="local", user="carol@ad.example.org", groups=("esm@example.org",))
    assert not decide(policy, carol, job).allowed


# --- GitLab and an identity provider's principals (the REST API's tokens) -------------------------

GITLAB_ALICE: dict[str, Any] = {
    "source": "gitlab", "project": "climate/ocean/solver", "actor": "alice", "event": "push",
    "ref": "refs/heads/main", "commit": "a" * 40, "ref_protected": True}
IDP_ALICE: dict[str, Any] = {"source": "idp", "user": "alice@example.org", "groups": ["hpc-users"]}


@pytest.mark.parametrize(("text", "pattern"), [
    ("gitlab:group:climate", PrincipalPattern("gitlab", "group", "climate", None)),
    ("gitlab:group:climate/ocean", PrincipalPattern("gitlab", "group", "climate/ocean", None)),
    ("gitlab:project:climate/solver", PrincipalPattern("gitlab", "project", "climate", "solver")),
    ("gitlab:project:climate/ocean/solver",
     PrincipalPattern("gitlab", "project", "climate/ocean", "solver")),
    ("gitlab:project:climate/ocean/*", PrincipalPattern("gitlab", "project", "climate/ocean", "*")),
    ("gitlab:user:alice", PrincipalPattern("gitlab", "user", "alice", None)),
    ("idp:user:alice@example.org", PrincipalPattern("idp", "user", "alice@example.org", None)),
    ("idp:group:hpc-users", PrincipalPattern("idp", "group", "hpc-users", None)),
])
def test_gitlab_and_identity_provider_principals_parse(text: str, pattern: PrincipalPattern) -> None:
    assert parse_principal(text) == pattern
    assert str(pattern) == text


@pytest.mark.parametrize(("text", "message"), [
    ("gitlab:group:climate/*", "a gitlab:group name is a whole path, without a wildcard"),
    ("gitlab:group:climate//ocean", "'climate//ocean' is not a valid group path"),
    ("gitlab:project:solver", "a gitlab:project principal is GROUP/NAME"),
    ("gitlab:project:climate/*/solver", "the group must be spelled out"),
    ("gitlab:project:climate/sol*", r"'\*' is only allowed as the whole last part"),
    ("gitlab:project:-x/solver", "'-x' is not a valid group path"),
    ("gitlab:user:*", "gitlab:user names have no organisation part"),
    ("idp:group:hpc users", "'hpc users' is not a valid group name"),
    ("idp:team:x", "unknown principal type idp:team"),
])
def test_malformed_gitlab_and_identity_provider_principals_are_rejected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_principal(text)


@pytest.mark.parametrize(("pattern", "held", "matches"), [
    ("gitlab:project:climate/ocean/*", "gitlab:project:climate/ocean/solver", True),
    ("gitlab:project:climate/ocean/*", "gitlab:project:climate/ocean/deep/solver", False),
    ("gitlab:project:climate/*", "gitlab:project:climate/ocean/solver", False),
    ("gitlab:project:climate/ocean/solver", "gitlab:project:climate/ocean/solver", True),
    ("gitlab:project:climate/ocean/solver", "gitlab:project:Climate/ocean/solver", False),
    ("gitlab:group:climate", "gitlab:group:climate", True),
    ("gitlab:group:climate", "gitlab:group:climate-x", False),
    ("gitlab:user:alice", "github:user:alice", False),
    ("idp:user:alice@example.org", "idp:user:alice@example.org", True),
    ("idp:group:hpc-users", "local:group:hpc-users", False),
])
def test_gitlab_paths_match_exactly_or_one_project_below_a_wildcard(
        pattern: str, held: str, matches: bool) -> None:
    assert parse_principal(pattern).matches(held) is matches


def test_gitlab_identity_holds_its_project_every_group_above_it_and_its_user() -> None:
    identity = identity_from_json(GITLAB_ALICE)
    assert identity.principals() == (
        "gitlab:group:climate", "gitlab:group:climate/ocean", "gitlab:project:climate/ocean/solver",
        "gitlab:user:alice")
    assert (identity.effective_event, identity.effective_ref, identity.commit, identity.ref_protected) == (
        "push", "refs/heads/main", "a" * 40, True)
    assert identity.actor_principal == "gitlab:user:alice"


def test_identity_provider_identity_holds_user_and_group_principals() -> None:
    identity = identity_from_json(IDP_ALICE)
    assert identity.principals() == ("idp:user:alice@example.org", "idp:group:hpc-users")
    assert (identity.effective_event, identity.effective_ref, identity.fork) == ("api", None, False)
    assert identity.actor_principal == "idp:user:alice@example.org"


def test_new_identities_and_commits_round_trip_and_old_documents_read_as_before() -> None:
    assert identity_from_json(GITLAB_ALICE).to_json() == {**GITLAB_ALICE, "fork": False}
    assert identity_from_json(IDP_ALICE).to_json() == IDP_ALICE
    with_commit = {**GITHUB_ALICE, "commit": "b" * 64}
    assert identity_from_json(with_commit).to_json() == with_commit
    # A document written before commits were recorded keeps its exact JSON.
    assert identity_from_json(GITHUB_ALICE).to_json() == GITHUB_ALICE
    assert identity_from_json(LOCAL_ALICE).to_json() == LOCAL_ALICE


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"project": "solver"}, "project", "'solver' is not valid here"),
    ({"commit": "abc"}, "commit", "'abc' is not valid here"),
    ({"ref_protected": "true"}, "ref_protected", "must be true or false"),
    ({"teams": ["x"]}, "teams", "unknown field for a gitlab identity"),
    ({"source": "idp", "user": "alice", "fork": False}, "fork", "unknown field for an idp identity"),
    ({"source": "idp", "user": "al ice"}, "user", "'al ice' is not valid here"),
])
def test_malformed_gitlab_and_identity_provider_identities_are_rejected(
        change: dict[str, Any], field: str, message: str) -> None:
    data = {**GITLAB_ALICE, **change}
    if data["source"] == "idp":
        data = {key: value for key, value in data.items() if key in ("source", "user", *change)}
    with pytest.raises(InputError, match=message) as caught:
        identity_from_json(data)
    assert caught.value.field == field
