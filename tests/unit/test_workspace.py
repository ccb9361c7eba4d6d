"""Copying a submitted workspace in and the job's results back, against links and renames.

The attacker is the submitter: they own the submitted directory and may rename or replace anything
in it at any moment, before the copy, during the job, and before the results go back. The private
directory stands for what the service account can read and they cannot (its state dir, its home).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox.workspace import Snapshot, WorkspaceError, copy_back, copy_in

SUBMITTER = 4242   # owns the workspace
AGENT = 4343       # the service account
OTHER = 4444       # someone else on the machine


@pytest.fixture
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")


@pytest.fixture
def private(tmp_path: Path) -> Path:
    """What only the service account can read: a state dir with a token."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "token").write_text("secret-token\n")
    (state / "token").chmod(0o600)
    return state


def submitted(tmp_path: Path, files: dict[str, str], owner: int = SUBMITTER) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path in [root, *root.rglob("*")]:
        os.lchown(path, owner, owner)
    return root


def take(source: Path, tmp_path: Path, **kw: int) -> tuple[Path, Snapshot]:
    copy = tmp_path / "job" / "workspace"
    copy.parent.mkdir(parents=True, exist_ok=True)
    return copy, copy_in(source, copy, owner=SUBMITTER, agent_uid=AGENT, **kw)


def test_the_copy_holds_files_directories_and_links_with_their_modes_and_times(
    tmp_path: Path, needs_root: None,
) -> None:
    source = submitted(tmp_path, {"a.txt": "a\n", "src/b.py": "print(1)\n"})
    (source / "src" / "b.py").chmod(0o755)
    os.utime(source / "a.txt", ns=(1_000_000_000, 2_000_000_000))
    (source / "link").symlink_to("/var/lib/hpcrunner")
    os.mkfifo(source / "pipe")

    copy, snapshot = take(source, tmp_path)

    assert (copy / "a.txt").read_text() == "a\n"
    assert (copy / "a.txt").stat().st_mtime_ns == 2_000_000_000
    assert stat.S_IMODE((copy / "src" / "b.py").stat().st_mode) == 0o755
    assert os.readlink(copy / "link") == "/var/lib/hpcrunner"  # a link, resolved only in the sandbox
    assert not (copy / "pipe").exists()
    assert snapshot.left_out == ["pipe"]
    assert snapshot.origin.path == str(source) and snapshot.bytes == len("a\n") + len("print(1)\n")


def test_a_workspace_swapped_for_a_link_to_the_state_dir_is_refused(
    tmp_path: Path, private: Path, needs_root: None,
) -> None:
    source = submitted(tmp_path, {"a.txt": "a\n"})
    source.rename(tmp_path / "ws.real")
    source.symlink_to(private)

    with pytest.raises(WorkspaceError, match=r"is owned by uid 0, not by you \(uid 4242\)"):
        take(source, tmp_path)


def test_a_file_of_someone_else_that_others_may_not_read_is_refused_by_name(
    tmp_path: Path, needs_root: None,
) -> None:
    source = submitted(tmp_path, {"mine.txt": "mine\n", "sub/theirs.txt": "theirs\n"})
    theirs = source / "sub" / "theirs.txt"
    os.chown(theirs, OTHER, OTHER)
    theirs.chmod(0o640)

    with pytest.raises(WorkspaceError, match=r"sub/theirs.txt belongs to uid 4444 and is not readable"):
        take(source, tmp_path)

    theirs.chmod(0o644)  # anyone may read it: so may the submitter
    copy, _ = take(source, tmp_path / "again")
    assert (copy / "sub" / "theirs.txt").read_text() == "theirs\n"


def test_a_hard_link_to_a_private_file_of_the_service_account_is_refused(
    tmp_path: Path, private: Path, needs_root: None,
) -> None:
    source = submitted(tmp_path, {"a.txt": "a\n"})
    os.chown(private / "token", AGENT, AGENT)
    os.link(private / "token", source / "token")  # the kernel's protected_hardlinks stops users here

    with pytest.raises(WorkspaceError, match=r"token belongs to uid 4343"):
        take(source, tmp_path)


def test_results_of_an_earlier_job_are_copied(tmp_path: Path, needs_root: None) -> None:
    source = submitted(tmp_path, {"result.txt": "from the last job\n"})
    os.chown(source / "result.txt", AGENT, AGENT)
    (source / "result.txt").chmod(0o600)

    copy, _ = take(source, tmp_path)

    assert (copy / "result.txt").read_text() == "from the last job\n"


def test_size_entries_and_depth_are_bounded(tmp_path: Path, needs_root: None) -> None:
    source = submitted(tmp_path, {"big.bin": "x" * 4096, "small.txt": "s"})
    with pytest.raises(WorkspaceError, match=r"larger than 1000 bytes \(max_workspace_size\)"):
        take(source, tmp_path, max_bytes=1000)
    with pytest.raises(WorkspaceError, match=r"more than 1 entries"):
        take(source, tmp_path / "b", max_entries=1)
    deep = source / "/".join(["d"] * 130)
    deep.mkdir(parents=True)
    with pytest.raises(WorkspaceError, match=r"nested deeper than 128 directories"):
        take(source, tmp_path / "c")


def ran(copy: Path, changes: dict[str, str]) -> None:
    """What a job does in its copy."""
    for name, text in changes.items():
        path = copy / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_what_the_job_created_or_changed_goes_back_and_nothing_else(tmp_path: Path, needs_root: None) -> None:
    source = submitted(tmp_path, {"input.txt": "v1\n", "notes.txt": "notes\n"})
    copy, snapshot = take(source, tmp_path)
    (source / "notes.txt").write_text("edited by the submitter while the job ran\n")
    ran(copy, {"input.txt": "changed by the job\n", "out/result.nc": "data\n"})

    returned = copy_back(copy, snapshot, job_id="j1")

    assert (source / "input.txt").read_text() == "changed by the job\n"
    assert (source / "out" / "result.nc").read_text() == "data\n"
    assert (source / "notes.txt").read_text() == "edited by the submitter while the job ran\n"
    assert (returned.files, returned.bytes, returned.not_returned) == (2, 24, [])
    assert not [p for p in source.rglob("*") if p.name.startswith(".hpc-runner-return-")]


def test_a_link_put_where_a_result_goes_is_replaced_not_written_through(
    tmp_path: Path, private: Path, needs_root: None,
) -> None:
    source = submitted(tmp_path, {"a.txt": "a\n"})
    copy, snapshot = take(source, tmp_path)
    ran(copy, {"token": "written by the job\n", "out/x": "x\n"})
    (source / "token").symlink_to(private / "token")
    (source / "out").symlink_to(private)  # a directory the results go into, now a link

    returned = copy_back(copy, snapshot, job_id="j1")

    assert (private / "token").read_text() == "secret-token\n"
    assert sorted(p.name for p in private.iterdir()) == ["token"]
    assert not (source / "token").is_symlink()
    assert (source / "token").read_text() == "written by the job\n"
    assert returned.not_returned == ["out (not a directory in the submitted workspace)"]


def test_nothing_goes_back_into_a_directory_put_in_place_of_the_submitted_one(
    tmp_path: Path, private: Path, needs_root: None,
) -> None:
    source = submitted(tmp_path, {"a.txt": "a\n"})
    copy, snapshot = take(source, tmp_path)
    ran(copy, {"b.txt": "b\n"})
    source.rename(tmp_path / "ws.real")

    source.symlink_to(private)
    with pytest.raises(WorkspaceError, match=r"not a directory \(a link is not followed\)"):
        copy_back(copy, snapshot, job_id="j1")
    source.unlink()
    source.mkdir()
    os.chown(source, SUBMITTER, SUBMITTER)
    with pytest.raises(WorkspaceError, match=r"no longer the directory that was submitted"):
        copy_back(copy, snapshot, job_id="j1")

    assert sorted(p.name for p in private.iterdir()) == ["token"]
    assert list(source.iterdir()) == []


def test_links_the_job_made_go_back_as_links_never_as_what_they_point_to(
    tmp_path: Path, private: Path, needs_root: None,
) -> None:
    source = submitted(tmp_path, {"a.txt": "a\n"})
    copy, snapshot = take(source, tmp_path)
    (copy / "state").symlink_to(private)
    (copy / "token").symlink_to(private / "token")

    copy_back(copy, snapshot, job_id="j1")

    assert os.readlink(source / "state") == str(private)
    assert os.readlink(source / "token") == str(private / "token")


def test_the_snapshot_record_round_trips(tmp_path: Path, needs_root: None) -> None:
    source = submitted(tmp_path, {"a.txt": "a\n"})
    _, snapshot = take(source, tmp_path)
    snapshot.save(tmp_path / "workspace.json")
    loaded = Snapshot.load(tmp_path / "workspace.json")
    assert (loaded.origin, loaded.entries) == (snapshot.origin, snapshot.entries)
    assert stat.S_IMODE((tmp_path / "workspace.json").stat().st_mode) == 0o600
