"""The commit a submitted directory is checked out at, read from its `.git` files (real git
repositories made by git, and `.git` files a submitter could have forged)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import git

from runner.provenance.commit import head_commit


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A repository with two commits on main."""
    path = tmp_path / "checkout"
    path.mkdir()
    git("init", "-q", "-b", "main", cwd=path)
    for text in ("one", "two"):
        (path / "file.txt").write_text(text)
        git("add", "file.txt", cwd=path)
        git("commit", "-q", "-m", text, cwd=path)
    return path


def rev_parse(path: Path, what: str = "HEAD") -> str:
    return git("rev-parse", what, cwd=path).strip()


def test_a_branch_checked_out_with_a_loose_ref(checkout: Path) -> None:
    assert (checkout / ".git/refs/heads/main").is_file()
    assert head_commit(checkout) == rev_parse(checkout)


def test_a_branch_whose_ref_is_packed(checkout: Path) -> None:
    git("pack-refs", "--all", cwd=checkout)
    assert not (checkout / ".git/refs/heads/main").exists()
    assert "refs/heads/main" in (checkout / ".git/packed-refs").read_text()
    assert head_commit(checkout) == rev_parse(checkout)


def test_a_detached_head(checkout: Path) -> None:
    first = rev_parse(checkout, "HEAD~1")
    git("checkout", "-q", "--detach", first, cwd=checkout)
    assert (checkout / ".git/HEAD").read_text().strip() == first
    assert head_commit(checkout) == first


def test_no_git_directory_means_no_commit(tmp_path: Path) -> None:
    assert head_commit(tmp_path) is None
    assert head_commit(tmp_path / "missing") is None


def test_a_branch_without_commits_has_none(tmp_path: Path) -> None:
    git("init", "-q", "-b", "main", cwd=tmp_path)
    assert head_commit(tmp_path) is None


def test_a_head_that_links_outside_the_checkout_is_not_followed(checkout: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "agent-file"
    elsewhere.write_text("0123456789abcdef0123456789abcdef01234567\n")
    head = checkout / ".git/HEAD"
    head.unlink()
    head.symlink_to(elsewhere)
    assert head_commit(checkout) is None


def test_a_git_directory_that_is_a_link_is_not_followed(checkout: Path, tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".git").symlink_to(checkout / ".git", target_is_directory=True)
    assert head_commit(linked) is None


def test_a_ref_that_climbs_out_of_git_is_not_read(checkout: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("0123456789abcdef0123456789abcdef01234567\n")
    (checkout / ".git/HEAD").write_text("ref: refs/../../outside\n")
    assert head_commit(checkout) is None
