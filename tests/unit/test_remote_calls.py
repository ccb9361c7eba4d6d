"""What `hpc-runner remote` asks of the hub and makes of its answers, without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from runner.oidc.binding import bound_audience
from runner.remote.calls import (
    TokenSource,
    ci_source,
    ending_lines,
    exit_status,
    github_token_url,
    log_path,
    submission_body,
    token_source,
)

SHA = "9f3182061f1e2cca4702c368cbc039b7dc9d4485"
JOB = {"name": "unit", "image": "julia", "command": ["true"]}


@pytest.mark.parametrize("env, expected", [
    ({"GITHUB_REPOSITORY": "CliMA/Oceananigans.jl", "GITHUB_SHA": SHA}, ("CliMA/Oceananigans.jl", SHA)),
    ({"CI_PROJECT_URL": "https://gitlab.example.org/group/project", "CI_COMMIT_SHA": SHA.upper()},
     ("https://gitlab.example.org/group/project", SHA)),
    # An ssh remote and a commit that is no full SHA are left to the token's claims.
    ({"BUILDKITE_REPO": "git@github.com:acme/app.git", "BUILDKITE_COMMIT": "HEAD"}, (None, None)),
    ({"BUILDKITE_REPO": "https://github.com/acme/app.git", "BUILDKITE_COMMIT": SHA},
     ("https://github.com/acme/app.git", SHA)),
    ({"BUILDKITE_REPO": "https://user:secret@github.com/acme/app.git"}, (None, None)),
    ({}, (None, None)),
])
def test_the_ci_systems_repository_and_commit_in_the_form_the_hub_reads(
        env: dict[str, str], expected: tuple[str | None, str | None]) -> None:
    assert ci_source(env) == expected


def test_the_body_names_only_what_is_known() -> None:
    assert submission_body(JOB, cluster=None, repository=None, commit=None) == {"job": JOB}
    assert submission_body(JOB, cluster="hpc1", repository="a/b", commit=SHA) == {
        "job": JOB, "cluster": "hpc1", "repository": "a/b", "commit": SHA}


def test_the_token_comes_from_the_first_source_there_is() -> None:
    github = {"ACTIONS_ID_TOKEN_REQUEST_URL": "https://x/idtoken?api-version=2.0",
              "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "r", "BUILDKITE": "true"}
    assert token_source(github, token_file="t", token_env="V") == TokenSource("file", "t")
    assert token_source(github, token_file=None, token_env="V") == TokenSource("env", "V")
    assert token_source(github, token_file=None, token_env=None) == TokenSource("github", github[
        "ACTIONS_ID_TOKEN_REQUEST_URL"])
    assert token_source({"BUILDKITE": "true"}, token_file=None, token_env=None) == TokenSource(
        "buildkite", "buildkite-agent")
    assert token_source({}, token_file=None, token_env=None) is None


def test_github_is_asked_for_the_bound_audience_on_its_url() -> None:
    audience = bound_audience("hpc-runner", JOB)
    assert github_token_url("https://x/idtoken?api-version=2.0", audience) == (
        f"https://x/idtoken?api-version=2.0&audience=hpc-runner%3Asha256%3A{audience.rsplit(':', 1)[1]}")
    assert github_token_url("https://x/idtoken", "a b").endswith("/idtoken?audience=a%20b")


def test_the_log_is_asked_from_an_offset() -> None:
    assert log_path("abc", 7, follow=True) == "/api/v1/jobs/abc/log?offset=7&follow=1"
    assert log_path("abc", 0, follow=False) == "/api/v1/jobs/abc/log?offset=0"


@pytest.mark.parametrize("view, status, lines", [
    ({"state": "succeeded", "exit_status": 0}, 0, []),
    ({"id": "j", "state": "failed", "exit_status": 3, "reasons": []}, 3, ["job j failed (exit status 3)"]),
    ({"id": "j", "state": "timed_out", "exit_status": None}, 124, ["job j timed_out"]),
    ({"id": "j", "state": "cancelled"}, 130, ["job j cancelled"]),
    ({"id": "j", "state": "infra_failed", "reasons": ["sbatch failed"]}, 125,
     ["job j infra_failed: sbatch failed"]),
    ({"state": "denied", "reasons": ["no grant", "bad image"]}, 126,
     ["denied: no grant", "denied: bad image"]),
])
def test_an_ended_job_exits_as_hpc_runner_run_does(view: dict[str, Any], status: int,
                                                   lines: list[str]) -> None:
    assert (exit_status(view), ending_lines(view)) == (status, lines)
