"""What a job's log says of a checkout that failed, in both sources (`runner.sources.checkout_failure`)."""

from __future__ import annotations

import pytest

from runner.sources.checkout_failure import checkout_failure_lines
from runner.sources.git import CheckoutFailed


@pytest.mark.parametrize(("output", "lines"), [
    ("fatal: no such repository\n", "fatal: no such repository\nhpc-runner: git failed\n"),
    ("fatal: no newline at the end", "fatal: no newline at the end\nhpc-runner: git failed\n"),
    ("", "hpc-runner: git failed\n"),
])
def test_gits_output_comes_first_on_lines_of_its_own_then_why(output: str, lines: str) -> None:
    assert checkout_failure_lines(CheckoutFailed("git failed", output)) == lines


def test_a_job_that_is_not_what_it_claims_is_said_to_be_refused() -> None:
    failure = CheckoutFailed("commit abc is not on refs/heads/main", "Cloning into 'w'...\n")
    assert checkout_failure_lines(failure, refused=True) == (
        "Cloning into 'w'...\nhpc-runner: refused: commit abc is not on refs/heads/main\n")
