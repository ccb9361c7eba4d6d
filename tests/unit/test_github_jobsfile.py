"""`.hpc-runner.toml`: the `[[jobs]]` of a repository, with errors a user can act on."""

from __future__ import annotations

import base64

import pytest

from runner.errors import InputError
from runner.sources.github.jobsfile import MAX_JOBS, decode_contents, parse_jobs_file

TWO_JOBS = """# jobs for the cluster
[[jobs]]
name = "unit"
image = "clima-ci"
command = ["julia", "--project", "test/runtests.jl"]
env = { JULIA_NUM_THREADS = "4" }

[jobs.resources]
nodes = 2
tasks = 8
time = "30m"

[jobs.mpi]
enabled = true

[[jobs]]
name = "docs"
image = "clima-ci"
script = "make docs"
"""


def test_each_jobs_table_is_a_job_spec() -> None:
    unit, docs = parse_jobs_file(TWO_JOBS)
    assert (unit.name, unit.command, unit.mpi, unit.resources.nodes, unit.resources.time_seconds) == (
        "unit", ("julia", "--project", "test/runtests.jl"), True, 2, 1800)
    assert dict(unit.env) == {"JULIA_NUM_THREADS": "4"}
    assert (docs.name, docs.script, docs.mpi) == ("docs", "make docs", False)


@pytest.mark.parametrize("text, message", [
    (TWO_JOBS.replace('time = "30m"', 'time = "soon"'),
     ".hpc-runner.toml:11: jobs[0].resources.time: 'soon' is not a duration"),
    (TWO_JOBS.replace('script = "make docs"', 'script = "make docs"\ntimeout = 5'),
     ".hpc-runner.toml:20: jobs[1].timeout: unknown key"),
    (TWO_JOBS.replace('name = "docs"', 'name = "unit"'),
     ".hpc-runner.toml:17: jobs[1].name: job name 'unit' is already used by jobs[0]"),
    (TWO_JOBS.replace('name = "docs"', 'name = "a docs job"'),
     ".hpc-runner.toml:17: jobs[1].name: 'a docs job' is not a job name"),
    (TWO_JOBS.replace('env = { JULIA_NUM_THREADS = "4" }', 'env = { SLURM_JOB_ID = "4" }'),
     ".hpc-runner.toml:6: jobs[0].env.SLURM_JOB_ID: SLURM_JOB_ID is reserved"),
    ("[job]\nname = 'x'\n", ".hpc-runner.toml:1: job: unknown key (known keys here: jobs)"),
    ("", ".hpc-runner.toml: jobs: no jobs: add at least one [[jobs]] table"),
    ("jobs = 3\n", ".hpc-runner.toml:1: jobs: must be an array of tables"),
    ("[[jobs]\nname = 'x'\n", ".hpc-runner.toml:1: invalid TOML"),
])
def test_errors_name_the_file_the_line_and_the_field(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_jobs_file(text)
    assert str(caught.value).startswith(message), str(caught.value)


def test_too_many_jobs_are_refused() -> None:
    text = "".join(f'[[jobs]]\nname = "j{i}"\nimage = "x"\ncommand = ["true"]\n' for i in range(MAX_JOBS + 1))
    with pytest.raises(InputError, match=f"more than {MAX_JOBS} jobs"):
        parse_jobs_file(text)


def _answer(content: bytes, **overrides: object) -> dict[str, object]:
    encoded = base64.b64encode(content).decode()
    wrapped = "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60)) + "\n"
    return {"type": "file", "encoding": "base64", "content": wrapped, "size": len(content)} | overrides


def test_the_contents_answer_is_decoded_whatever_its_line_wrapping() -> None:
    assert decode_contents(_answer(TWO_JOBS.encode())) == TWO_JOBS


@pytest.mark.parametrize("answer, message", [
    (_answer(b"a\nb\xff\n"), ".hpc-runner.toml:2: not UTF-8 text"),
    (_answer(b"", type="dir"), "is a dir, not a file"),
    ({"type": "file", "encoding": "none", "content": "", "size": 3_000_000}, "too large to read"),
    ([{"type": "file"}], "is a list, not a file"),
])
def test_contents_that_are_not_a_text_file_are_named(answer: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_contents(answer)
