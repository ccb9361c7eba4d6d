"""A job's declared outputs: which paths its globs name, and how they are collected from a
workspace the job controls, without handing it anything else the agent can read.

Each attack below is first shown to work against the obvious collector (`Path.glob` then
`shutil.copy`), so that its test proves something: the walk that opens everything with
O_NOFOLLOW relative to its parent is what stops it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import runner.provenance.outputs as outputs_module
from runner.errors import InputError
from runner.job.outputs import OutputFile
from runner.provenance.outputs import MAX_DEPTH, Collected, collect_outputs, matches
from runner.spec import parse_job_text

SECRET = b"the agent's private key, which no job may read\n"
GIB = 1024 ** 3


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """Stands for the agent's state directory: a file the job must never get (0600, the agent's)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    secret = write(state / "secret.nc", SECRET)
    secret.chmod(0o600)
    return state


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    return tmp_path / "job" / "outputs"


def collect(workspace: Path, patterns: Sequence[str], destination: Path, *,
            max_bytes: int = GIB) -> Collected:
    return collect_outputs(workspace, patterns, destination, max_bytes=max_bytes)


def naive_collect(workspace: Path, pattern: str, destination: Path) -> list[bytes]:
    """What a collector that trusts the workspace gets: the bytes of every file it copied."""
    copied = []
    for source in sorted(workspace.glob(pattern)):
        target = destination / source.relative_to(workspace)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        copied.append(target.read_bytes())
    return copied


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root`, by relative path (links are not followed)."""
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


# -- which paths a pattern names ------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("results/**/*.nc", "results/x.nc", True),
    ("results/**/*.nc", "results/a/x.nc", True),
    ("results/**/*.nc", "results/a/b/x.nc", True),
    ("results/**/*.nc", "other/x.nc", False),
    ("results/**/*.nc", "results/a/x.txt", False),
    ("results/**/*.nc", "x.nc", False),
    ("plots/*.png", "plots/a.png", True),
    ("plots/*.png", "plots/sub/a.png", False),
    ("plots/*.png", "plots.png", False),
    ("**/*.log", "a.log", True),
    ("**/*.log", "deep/er/a.log", True),
    ("run-?.txt", "run-1.txt", True),
    ("run-?.txt", "run-10.txt", False),
    ("run-[0-9].txt", "run-7.txt", True),
    ("*.txt", "a/b.txt", False),
    ("results/**/**/x", "results/x", True),
])
def test_a_pattern_names_files_by_whole_path_parts(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


def test_a_pattern_of_many_double_stars_against_a_deep_path_is_answered_at_once() -> None:
    # A job chooses its patterns: one that took exponential time would stall the end of its run.
    pattern = "/".join(["**"] * 60 + ["never"])
    path = "/".join(["d"] * 60 + ["file"])
    started = time.monotonic()
    assert not matches(pattern, path)
    assert time.monotonic() - started < 1.0


def job_with_outputs(*patterns: str) -> tuple[str, ...]:
    listed = ", ".join(f'"{p}"' for p in patterns)
    text = f'[job]\nname = "x"\nimage = "test"\ncommand = ["true"]\noutputs = [{listed}]\n'
    return parse_job_text(text).outputs


def test_spec_outputs_are_relative_to_work_and_a_leading_work_is_dropped() -> None:
    assert job_with_outputs("/work/results/**/*.nc", "plots/*.png") == ("results/**/*.nc", "plots/*.png")


@pytest.mark.parametrize(("pattern", "why"), [
    ("/etc/passwd", "'/etc/passwd' is outside the workspace"),
    ("/workspace/x", "'/workspace/x' is outside the workspace"),
    ("../x", "'../x' must be a plain relative path"),
    ("a/../b", "'a/../b' must be a plain relative path"),
    ("a//b", "'a//b' must be a plain relative path"),
    ("results/**", "'results/**' must end in a file name pattern, not '**'"),
    ("a**b/x", "'a**b/x': '**' stands for whole directories only"),
])
def test_spec_refuses_an_output_outside_the_workspace_naming_its_index(pattern: str, why: str) -> None:
    with pytest.raises(InputError) as refused:
        job_with_outputs("fine.txt", pattern)
    assert f"job.outputs[1]: {why}" in str(refused.value)


# -- what is collected ---------------------------------------------------------------------------


def test_matching_files_are_copied_with_their_digests_in_path_order(
    workspace: Path, destination: Path
) -> None:
    write(workspace / "results/b/x.nc", b"bx")
    write(workspace / "results/a.nc", b"a")
    write(workspace / "results/a.txt", b"not matched")
    write(workspace / "plots/p.png", b"png")
    write(workspace / "plots/deeper/q.png", b"not matched either")

    collected = collect(workspace, ["results/**/*.nc", "plots/*.png"], destination)

    assert collected.files == (OutputFile("plots/p.png", sha256(b"png"), 3),
                               OutputFile("results/a.nc", sha256(b"a"), 1),
                               OutputFile("results/b/x.nc", sha256(b"bx"), 2))
    assert tree(destination) == {"plots/p.png": b"png", "results/a.nc": b"a", "results/b/x.nc": b"bx"}
    assert (collected.left_out, collected.unmatched, collected.total_bytes) == ((), (), 6)
    # The outputs directory is the agent's alone; a file in it keeps the mode the job gave it.
    assert destination.stat().st_mode & 0o777 == 0o700


def test_a_file_with_one_name_is_kept_as_a_second_name_of_its_inode_not_copied(
    workspace: Path, destination: Path
) -> None:
    write(workspace / "results/a.nc", b"a")
    collect(workspace, ["results/*"], destination)
    kept, original = (destination / "results/a.nc").stat(), (workspace / "results/a.nc").stat()
    assert (kept.st_ino, kept.st_nlink) == (original.st_ino, 2)


def test_a_file_with_another_name_is_copied_so_writing_through_that_name_cannot_change_it(
    workspace: Path, destination: Path
) -> None:
    write(workspace / "results/a.nc", b"as digested")
    os.link(workspace / "results/a.nc", workspace / "elsewhere.nc")
    collected = collect(workspace, ["results/*"], destination)
    (workspace / "elsewhere.nc").write_bytes(b"changed later")
    assert collected.files == (OutputFile("results/a.nc", sha256(b"as digested"), 11),)
    assert (destination / "results/a.nc").read_bytes() == b"as digested"


def test_collecting_again_never_writes_through_what_an_earlier_collection_left(
    workspace: Path, destination: Path
) -> None:
    write(workspace / "results/a.nc", b"the job's")
    collect(workspace, ["results/*"], destination)
    os.link(workspace / "results/a.nc", workspace / "results/b.nc")  # now two names: copied
    collect(workspace, ["results/*"], destination)
    assert (workspace / "results/a.nc").read_bytes() == b"the job's"
    assert (destination / "results/a.nc").read_bytes() == b"the job's"
    assert (destination / "results/a.nc").stat().st_ino != (workspace / "results/a.nc").stat().st_ino


def test_a_pattern_that_matched_nothing_is_reported(workspace: Path, destination: Path) -> None:
    write(workspace / "results/a.nc", b"a")
    collected = collect(workspace, ["results/*.nc", "plots/*.png", "missing/**/*.h5"], destination)
    assert [f.path for f in collected.files] == ["results/a.nc"]
    assert collected.unmatched == ("plots/*.png", "missing/**/*.h5")


def test_a_matching_link_to_a_file_only_the_agent_can_read_is_named_not_collected(
    workspace: Path, destination: Path, state_dir: Path, tmp_path: Path
) -> None:
    write(workspace / "results/real.nc", b"real")
    (workspace / "results/key.nc").symlink_to(state_dir / "secret.nc")
    assert SECRET in naive_collect(workspace, "results/*.nc", tmp_path / "naive")

    collected = collect(workspace, ["results/*.nc"], destination)

    assert [f.path for f in collected.files] == ["results/real.nc"]
    assert collected.left_out == (("results/key.nc", "a symbolic link (only regular files are collected)"),)
    assert tree(destination) == {"results/real.nc": b"real"}
    assert not (destination / "results/key.nc").is_symlink()


def test_a_linked_directory_pointing_at_the_state_dir_is_not_entered(
    workspace: Path, destination: Path, state_dir: Path, tmp_path: Path
) -> None:
    write(workspace / "results/own.nc", b"own")
    (workspace / "results/agent").symlink_to(state_dir, target_is_directory=True)
    assert SECRET in naive_collect(workspace, "results/*/*.nc", tmp_path / "naive")

    collected = collect(workspace, ["results/*/*.nc", "results/**/*.nc"], destination)

    assert [f.path for f in collected.files] == ["results/own.nc"]
    assert all(SECRET not in data for data in tree(destination).values())
    assert not any(path.startswith("results/agent/") for path, _ in collected.left_out)


def test_a_fifo_matching_a_pattern_is_named_and_never_opened(
    workspace: Path, destination: Path, tmp_path: Path
) -> None:
    write(workspace / "results/a.nc", b"a")
    fifo = workspace / "results/pipe.nc"
    os.mkfifo(fifo)
    # The naive collector stops at it: every file after it would be lost (one that opened it
    # for reading would wait for a writer instead).
    with pytest.raises(shutil.SpecialFileError):
        naive_collect(workspace, "results/*.nc", tmp_path / "naive")
    # The test holds both ends: whatever reads the FIFO takes these bytes out of it.
    held = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(held, b"in the pipe")

        collected = collect(workspace, ["results/*.nc"], destination)

        assert [f.path for f in collected.files] == ["results/a.nc"]
        assert collected.left_out == (("results/pipe.nc", "not a regular file"),)
        assert os.read(held, 100) == b"in the pipe"
    finally:
        os.close(held)


@pytest.fixture
def swap_after_walk(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], None]], None]:
    """Runs a change to the workspace once the walk has listed it, before anything is copied."""
    def install(change: Callable[[], None]) -> None:
        walk = outputs_module._walk

        def walk_then_change(*args: object, **kwargs: object) -> Iterator[tuple[str, str]]:
            yield from walk(*args, **kwargs)  # type: ignore[arg-type]
            if not kwargs and args[1] == "":  # the top of the walk: everything is listed
                change()

        monkeypatch.setattr(outputs_module, "_walk", walk_then_change)
    return install


def test_a_file_swapped_for_a_link_after_the_walk_is_not_followed(
    workspace: Path, destination: Path, state_dir: Path, tmp_path: Path,
    swap_after_walk: Callable[[Callable[[], None]], None]
) -> None:
    target = write(workspace / "results/a.nc", b"a")

    def swap() -> None:
        target.unlink()
        target.symlink_to(state_dir / "secret.nc")

    # The naive collector, swapped between its listing and its copy, copies the secret.
    listed = sorted(workspace.glob("results/*.nc"))
    swap()
    naive = tmp_path / "naive.nc"
    shutil.copy(listed[0], naive)
    assert naive.read_bytes() == SECRET
    target.unlink()
    write(target, b"a")

    swap_after_walk(swap)
    collected = collect(workspace, ["results/*.nc"], destination)

    assert collected.files == ()
    assert collected.left_out == (("results/a.nc", "a symbolic link (only regular files are collected)"),)
    assert tree(destination) == {}


def test_a_directory_swapped_for_a_link_after_the_walk_is_not_followed(
    workspace: Path, destination: Path, state_dir: Path, tmp_path: Path,
    swap_after_walk: Callable[[Callable[[], None]], None]
) -> None:
    write(workspace / "secret.nc", b"job's own")
    write(workspace / "results/secret.nc", b"job's own")

    def swap() -> None:
        shutil.rmtree(workspace / "results")
        (workspace / "results").symlink_to(state_dir, target_is_directory=True)

    # The naive collector, swapped between its listing and its copy, copies the secret.
    listed = sorted(workspace.glob("results/*.nc"))
    swap()
    naive = tmp_path / "naive.nc"
    shutil.copy(listed[0], naive)
    assert naive.read_bytes() == SECRET
    (workspace / "results").unlink()
    write(workspace / "results/secret.nc", b"job's own")

    swap_after_walk(swap)
    collected = collect(workspace, ["results/*.nc"], destination)

    assert collected.files == ()
    assert [path for path, _ in collected.left_out] == ["results/secret.nc"]
    assert all(SECRET not in data for data in tree(destination).values())


# -- limits --------------------------------------------------------------------------------------


def test_files_are_taken_in_path_order_until_max_output_bytes_and_the_rest_named(
    workspace: Path, destination: Path
) -> None:
    for name, size in (("a", 400), ("b", 400), ("c", 300), ("d", 10)):
        write(workspace / f"out/{name}.bin", bytes(size))

    collected = collect(workspace, ["out/*.bin"], destination, max_bytes=1000)

    assert [f.path for f in collected.files] == ["out/a.bin", "out/b.bin"]
    assert collected.total_bytes == 800
    assert collected.left_out == (
        ("out/c.bin", "300 bytes would pass the account's max_output_bytes (200 bytes were left)"),
        ("out/d.bin", "the account's max_output_bytes (1000 bytes) was reached at out/c.bin"))
    assert sorted(tree(destination)) == ["out/a.bin", "out/b.bin"]
    assert collected.unmatched == ()


def test_files_that_fill_max_output_bytes_exactly_are_all_taken(workspace: Path, destination: Path) -> None:
    write(workspace / "a.bin", bytes(600))
    write(workspace / "b.bin", bytes(400))
    collected = collect(workspace, ["*.bin"], destination, max_bytes=1000)
    assert ([f.path for f in collected.files], collected.left_out) == (["a.bin", "b.bin"], ())


def test_max_output_bytes_zero_collects_nothing_not_even_empty_files(
    workspace: Path, destination: Path
) -> None:
    write(workspace / "empty.txt", b"")
    write(workspace / "full.txt", b"x")

    collected = collect(workspace, ["*.txt"], destination, max_bytes=0)

    assert collected.files == ()
    why = "the account's max_output_bytes is 0: it keeps no outputs"
    assert collected.left_out == (("empty.txt", why), ("full.txt", why))
    assert not destination.exists()


def test_more_than_max_files_are_named_as_left_out(
    workspace: Path, destination: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs_module, "MAX_FILES", 3)
    for index in range(5):
        write(workspace / f"f{index}.txt", b"x")

    collected = collect(workspace, ["*.txt"], destination)

    assert [f.path for f in collected.files] == ["f0.txt", "f1.txt", "f2.txt"]
    assert collected.left_out == (("f3.txt", "more than 3 files"), ("f4.txt", "more than 3 files"))


def test_past_max_left_out_the_rest_are_counted_in_one_entry(
    workspace: Path, destination: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs_module, "MAX_FILES", 1)
    monkeypatch.setattr(outputs_module, "MAX_LEFT_OUT", 2)
    for index in range(6):
        write(workspace / f"f{index}.txt", b"x")

    collected = collect(workspace, ["*.txt"], destination)

    assert [f.path for f in collected.files] == ["f0.txt"]
    assert collected.left_out == (
        ("f1.txt", "more than 1 files"), ("f2.txt", "more than 1 files"),
        ("f3.txt", "this and 2 more matching files were not collected either (only the first 2 are named)"))


def test_a_tree_deeper_than_max_depth_is_not_entered_and_says_so(workspace: Path, destination: Path) -> None:
    shallow = write(workspace / "d/x.nc", b"shallow")
    deep_dir = workspace.joinpath(*(["d"] * (MAX_DEPTH + 3)))
    write(deep_dir / "x.nc", b"too deep")
    at_limit = workspace.joinpath(*(["d"] * MAX_DEPTH))
    write(at_limit / "x.nc", b"at the limit")

    collected = collect(workspace, ["**/*.nc"], destination)

    assert [f.path for f in collected.files] == sorted([
        str(shallow.relative_to(workspace)), str((at_limit / "x.nc").relative_to(workspace))])
    not_entered = "/".join(["d"] * (MAX_DEPTH + 1)) + "/"
    assert collected.left_out == ((not_entered, f"more than {MAX_DEPTH} directories deep: not entered"),)


def test_a_workspace_that_is_a_link_is_not_read(
    tmp_path: Path, destination: Path, state_dir: Path
) -> None:
    linked = tmp_path / "linked-workspace"
    linked.symlink_to(state_dir, target_is_directory=True)
    collected = collect(linked, ["*.nc"], destination)
    assert collected.files == ()
    assert collected.unmatched == ("*.nc",)
    # O_DIRECTORY | O_NOFOLLOW on a link: "Not a directory", whatever the link points at.
    assert [why for _, why in collected.left_out] == ["the workspace cannot be read: Not a directory"]
