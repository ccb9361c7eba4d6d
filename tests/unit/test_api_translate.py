"""A leased API job as the agent runs it: its spec read as the hub reads it, the token's identity,
repository and commit, and where the repository is fetched from."""

from __future__ import annotations

import time
from typing import Any

import pytest

from runner.gateway.jobs_protocol import JobLease
from runner.identity import Identity
from runner.sources.api.checkout import CheckoutRefused, clone_url
from runner.sources.api.translate import JobRefused, job_spec, translate

COMMIT = "9f3182061f1e2cca4702c368cbc039b7dc9d4485"
JOB = {"name": "unit", "image": "test", "command": ["make", "test"], "resources": {"time": "5m"}}
GITHUB = Identity(source="github", repository="octo-org/octo-repo", actor="octocat", commit=COMMIT)
ALICE = Identity(source="idp", user="alice", groups=("hpc-users",))


def lease(**fields: Any) -> JobLease:
    values: dict[str, Any] = {"id": "job1", "job": JOB, "token": "t", "issuer": "github-actions",
                              "cluster": None, "repository": None, "commit": None, "received_at": time.time(),
                              "lease_seconds": 120, "lease_expires_at": time.time() + 120, "attempt": 1,
                              "cancel_requested": False}
    return JobLease(**(values | fields))


def test_the_tokens_repository_and_commit_are_the_jobs() -> None:
    translated = translate(lease(repository="octo-org/octo-repo", commit=COMMIT), GITHUB, cluster="hpc1")
    assert (translated.repository, translated.commit, translated.identity) == ("octo-org/octo-repo", COMMIT,
                                                                              GITHUB)
    assert translated.spec.name == "unit" and translated.spec.resources.time_seconds == 300
    # What the hub forwards need not say them: the token does.
    assert translate(lease(), GITHUB, cluster="hpc1").repository == "octo-org/octo-repo"


@pytest.mark.parametrize("fields, words", [
    ({"repository": "other/repo"}, "repository: 'other/repo' contradicts the token"),
    ({"commit": "f" * 40}, f"commit: {'f' * 40} contradicts the token"),
    ({"cluster": "hpc2"}, "the job is for cluster hpc2, and this agent serves cluster hpc1"),
    ({"job": {k: v for k, v in JOB.items() if k != "image"}}, "request body: job.image: is required"),
    ({"job": JOB | {"resources": {"nodes": 0}}}, "request body: job.resources.nodes"),
])
def test_a_lease_the_token_or_the_job_parser_contradicts_is_refused_saying_why(fields: dict[str, Any],
                                                                              words: str) -> None:
    with pytest.raises(JobRefused) as refused:
        translate(lease(**fields), GITHUB, cluster="hpc1")
    assert words in refused.value.reason


def test_a_token_without_a_repository_takes_the_submitters_which_needs_a_commit() -> None:
    translated = translate(lease(repository="https://git.example.org/ocean/model.git", commit=COMMIT.upper()),
                           ALICE, cluster="hpc1")
    assert (translated.repository, translated.commit) == ("https://git.example.org/ocean/model.git", COMMIT)
    assert translate(lease(), ALICE, cluster="hpc1").repository is None
    with pytest.raises(JobRefused, match="names repository ocean/model but no commit"):
        translate(lease(repository="ocean/model"), ALICE, cluster="hpc1")


def test_a_job_taken_before_is_read_again_with_the_same_parser() -> None:
    assert job_spec(JOB).name == "unit"
    with pytest.raises(JobRefused, match=r"request body: job\.image"):
        job_spec({"name": "x"})


@pytest.mark.parametrize("template, repository, url", [
    ("https://github.com/{repository}.git", "octo-org/octo-repo", "https://github.com/octo-org/octo-repo.git"),
    ("/srv/git/{repository}.git", "octo-org/octo-repo", "/srv/git/octo-org/octo-repo.git"),
    ("file:///srv/git/{repository}", "group/sub/project", "file:///srv/git/group/sub/project"),
    # A repository given as a URL is fetched from checkout_url all the same, where it is the same place.
    ("https://git.example.org/{repository}.git", "https://git.example.org/ocean/model",
     "https://git.example.org/ocean/model.git"),
])
def test_a_repository_is_fetched_from_checkout_url(template: str, repository: str, url: str) -> None:
    assert clone_url(template, repository) == url


def test_a_repository_url_elsewhere_than_checkout_url_is_refused() -> None:
    with pytest.raises(CheckoutRefused) as refused:
        clone_url("https://github.com/{repository}.git", "https://evil.example.org/octo-org/octo-repo.git")
    assert refused.value.reason == ("repository https://evil.example.org/octo-org/octo-repo.git is not where "
                                    "this agent checks repositories out from (checkout_url "
                                    "https://github.com/{repository}.git); name it by its path, "
                                    "octo-org/octo-repo")
