"""A submission's body judged without I/O: JSON read strictly, the job checked by the job spec's own
parser (the messages of a job file), the token's repository and commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.errors import InputError
from runner.gateway.jobs_protocol import MAX_JSON_NESTING, MAX_SUBMISSION_BYTES
from runner.gateway.submission import (
    Refusal,
    Submission,
    decode_body,
    read_submission,
    repository_path,
    settle_source,
)
from runner.spec import load_job

JOB = {"name": "unit", "image": "julia", "command": ["julia", "-e", "1+1"]}
SHA = "0123456789abcdef0123456789abcdef01234567"


def refusal(body: bytes) -> Refusal:
    with pytest.raises(Refusal) as caught:
        read_submission(decode_body(body))
    return caught.value


def test_a_valid_submission_keeps_the_job_as_received() -> None:
    body = {"job": {"script": "make test\n", "image": "julia", "name": "unit", "resources": {"nodes": 2}},
            "cluster": "hpc1", "repository": "CliMA/Oceananigans.jl", "commit": SHA.upper()}
    submission = read_submission(decode_body(json.dumps(body).encode()))
    assert submission.job == body["job"] and list(submission.job) == ["script", "image", "name", "resources"]
    assert (submission.spec.name, submission.spec.resources.nodes) == ("unit", 2)
    assert (submission.cluster, submission.repository, submission.commit) == ("hpc1", "CliMA/Oceananigans.jl",
                                                                              SHA)


@pytest.mark.parametrize("job_toml, job_json, field", [
    ('name = "unit"\nimage = "julia"\n', {"name": "unit", "image": "julia"}, "job"),
    ('name = "unit"\nimage = "julia"\ncommand = []\n', {"name": "unit", "image": "julia", "command": []},
     "job.command"),
    ('name = "x"\nimage = "j"\ncommand = ["a"]\n[job.resources]\nnodes = 0\n',
     {"name": "x", "image": "j", "command": ["a"], "resources": {"nodes": 0}}, "job.resources.nodes"),
    ('name = "x"\nimage = "j"\ncommand = ["a"]\nwalltime = "1h"\n',
     {"name": "x", "image": "j", "command": ["a"], "walltime": "1h"}, "job.walltime"),
    ('name = "x"\nimage = "j"\ncommand = ["a"]\n[job.env]\nLD_PRELOAD = "/x.so"\n',
     {"name": "x", "image": "j", "command": ["a"], "env": {"LD_PRELOAD": "/x.so"}}, "job.env.LD_PRELOAD"),
])
def test_an_invalid_job_is_refused_with_the_message_of_the_same_job_in_a_file(
        job_toml: str, job_json: dict[str, object], field: str, tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[job]\n" + job_toml)
    with pytest.raises(InputError) as in_file:
        load_job(path)
    refused = refusal(json.dumps({"job": job_json}).encode())
    assert (refused.status, refused.field) == (400, field) == (400, in_file.value.field)
    assert refused.message == f"request body: {field}: {in_file.value.detail}"


@pytest.mark.parametrize("body, status, words", [
    (b'{"job": {}, "priority": 1, "callback": "x"}', 400, "unknown field(s) 'priority', 'callback'"),
    (b'{"cluster": "hpc1"}', 400, "job: is required"),
    (b'{"job": "name = \\"x\\""}', 400, "job: must be a JSON object"),
    (b'[{"job": {}}]', 400, "must be a JSON object"),
    (b'{"job": ', 400, "not JSON"),
    (b'\xff\xfe{}', 400, "not UTF-8"),
    (b'{"job": {"name": NaN}}', 400, "NaN is not a JSON number"),
    (b'{"job": {}, "job": {}}', 400, "the key 'job' twice"),
    (b'{"job": {"name": "a", "name": "b"}}', 400, "the key 'name' twice"),
    (b'{"job": {"name": "\\ud800"}}', 400, "lone surrogate"),
    (b'{"job": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", 400, "nested deeper"),
    (json.dumps({"job": JOB, "cluster": "no spaces"}).encode(), 400, "cluster: must be a cluster name"),
    (json.dumps({"job": JOB, "repository": "ssh://git@x/y"}).encode(), 400, "repository: must be"),
    (json.dumps({"job": JOB, "repository": "https://user:pw@github.com/a/b"}).encode(), 400, "repository"),
    (json.dumps({"job": JOB, "commit": "main"}).encode(), 400, "commit: must be a full commit SHA"),
])
def test_malformed_bodies_are_refused_naming_what_is_wrong(body: bytes, status: int, words: str) -> None:
    refused = refusal(body)
    assert refused.status == status and words in refused.message


def test_nesting_is_bounded_below_what_json_itself_takes() -> None:
    deep = {"job": dict(JOB)}
    inner: dict[str, object] = deep["job"]
    for _ in range(MAX_JSON_NESTING):
        inner["env"] = {}
        inner = inner["env"]   # type: ignore[assignment]
    with pytest.raises(Refusal, match=f"nested deeper than {MAX_JSON_NESTING} levels"):
        decode_body(json.dumps(deep).encode())


def test_a_body_over_the_limit_is_413() -> None:
    with pytest.raises(Refusal) as caught:
        decode_body(b" " * (MAX_SUBMISSION_BYTES + 1))
    assert caught.value.status == 413


def submission(repository: str | None = None, commit: str | None = None) -> Submission:
    given = {"repository": repository, "commit": commit}
    return read_submission({"job": JOB} | {key: value for key, value in given.items() if value})


def test_the_tokens_repository_and_commit_are_the_jobs() -> None:
    assert settle_source(submission(), token_repository="CliMA/X", token_commit=SHA) == ("CliMA/X", SHA)
    assert settle_source(submission("https://github.com/clima/x.git", SHA.upper()),
                         token_repository="CliMA/X", token_commit=SHA) == ("CliMA/X", SHA)
    # Without them in the token, the body's word is all there is.
    assert settle_source(submission("https://git.example.org/a/b", SHA), token_repository=None,
                         token_commit=None) == ("https://git.example.org/a/b", SHA)
    with pytest.raises(Refusal, match="repository: 'Other/X' contradicts the token") as caught:
        settle_source(submission("Other/X"), token_repository="CliMA/X", token_commit=None)
    assert (caught.value.status, caught.value.field) == (400, "repository")
    with pytest.raises(Refusal, match=r"commit: .* contradicts the token"):
        settle_source(submission(commit="f" * 40), token_repository=None, token_commit=SHA)


def test_repository_paths_from_urls() -> None:
    assert repository_path("https://gitlab.com/group/sub/project.git") == "group/sub/project"
    assert repository_path("CliMA/X") == "CliMA/X"

