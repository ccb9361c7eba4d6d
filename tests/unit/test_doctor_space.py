"""`doctor` warns when the state dir's or work_root's file system runs out of space (the answer of
statvfs given by the test)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from runner.config import parse_config_text
from runner.doctor import Host, check_free_space, render_text, run_checks

GIB = 1024**3


def statvfs(free: int, total: int, *, seen: list[str] | None = None) -> Callable[[str], os.statvfs_result]:
    """A file system of `total` bytes with `free` of them available, in 4 KiB blocks."""
    def answer(path: str) -> os.statvfs_result:
        if seen is not None:
            seen.append(path)
        return os.statvfs_result((4096, 4096, total // 4096, free // 4096, free // 4096,
                                  1000, 500, 500, 0, 255))
    return answer


def test_plenty_of_room_is_ok(tmp_path: Path) -> None:
    check = check_free_space(tmp_path, "work_root", Host(statvfs=statvfs(400 * GIB, 1000 * GIB)))
    assert (check.status, check.detail) == ("ok", f"400.0 GiB free of 1000.0 GiB (40%) on the file system of "
                                                  f"{tmp_path}")


def test_under_ten_percent_free_warns_and_names_retention_and_gc(tmp_path: Path) -> None:
    check = check_free_space(tmp_path, "work_root", Host(statvfs=statvfs(90 * GIB, 1000 * GIB)))
    assert check.status == "warn"
    assert check.detail.startswith("only 90.0 GiB free of 1000.0 GiB (9%)")
    assert check.fix is not None and "[retention]" in check.fix and "hpc-runner gc" in check.fix


def test_under_five_gib_free_warns_even_on_a_small_disk(tmp_path: Path) -> None:
    check = check_free_space(tmp_path, "state_dir", Host(statvfs=statvfs(4 * GIB, 20 * GIB)))
    assert (check.name, check.status) == ("state_dir_space", "warn")


def test_a_path_not_made_yet_is_measured_at_its_nearest_parent(tmp_path: Path) -> None:
    seen: list[str] = []
    check_free_space(tmp_path / "not" / "yet", "work_root", Host(statvfs=statvfs(GIB, GIB, seen=seen)))
    assert seen == [str(tmp_path)]


def test_an_unanswered_statvfs_warns(tmp_path: Path) -> None:
    def fails(path: str) -> os.statvfs_result:
        raise PermissionError(13, "Permission denied")
    check = check_free_space(tmp_path, "work_root", Host(statvfs=fails))
    assert (check.status, check.detail) == ("warn",
                                            f"cannot tell the free space of {tmp_path}: Permission denied")


def test_the_preflight_checks_both_the_state_dir_and_work_root(tmp_path: Path) -> None:
    config = parse_config_text(f'state_dir = "{tmp_path}/state"\nwork_root = "{tmp_path}/work"\n')
    checks = run_checks(config, Host(which=lambda name: None, statvfs=statvfs(GIB, 100 * GIB)))
    space = [check for check in checks if check.name.endswith("_space")]
    assert [(check.name, check.status) for check in space] == [("state_dir_space", "warn"),
                                                               ("work_root_space", "warn")]
    assert "fix: free space there: shorten the [retention]" in render_text(space)
