"""A commit named by a CI service reaches git only as a commit: never as one of git's options."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import git

from runner.sources.buildkite.checkout import CheckoutFailed, checkout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose default branch has two commits; the first is tagged `first`."""
    path = tmp_path / "origin"
    path.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=path)
    for name in ("first", "second"):
        (path / name).write_text(f"{name}\n")
        git("add", name, cwd=path)
        git("commit", "--quiet", "-m", name, cwd=path)
    git("tag", "first", "HEAD~1", cwd=path)
    return path


@pytest.mark.parametrize("commit", ["-f", "--orphan=x", "--detach", "-", "first", "HEAD~1", "1234abc^"])
@pytest.mark.parametrize("ref", [None, "refs/heads/main"])
async def test_a_commit_that_is_not_a_sha_or_head_is_refused_before_anything_is_cloned(
        repo: Path, tmp_path: Path, commit: str, ref: str | None) -> None:
    workspace = tmp_path / "ws"
    with pytest.raises(CheckoutFailed) as caught:
        await checkout(str(repo), commit, workspace, ref=ref)
    assert str(caught.value) == (f"{commit!r} is not a commit SHA (hexadecimal) or HEAD, so it is not "
                                 "checked out: a job names its commit by its SHA")
    assert not workspace.exists()


async def test_a_sha_and_head_are_still_checked_out(repo: Path, tmp_path: Path) -> None:
    first = git("rev-parse", "HEAD~1", cwd=repo).strip()
    await checkout(str(repo), first, tmp_path / "a", ref="refs/heads/main")
    assert git("rev-parse", "HEAD", cwd=tmp_path / "a").strip() == first
    await checkout(str(repo), first[:12].upper(), tmp_path / "b")
    assert git("rev-parse", "HEAD", cwd=tmp_path / "b").strip() == first
    await checkout(str(repo), "HEAD", tmp_path / "c")
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c").strip() == git("rev-parse", "HEAD", cwd=repo).strip()
