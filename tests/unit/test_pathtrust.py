"""Binds and images whose paths someone else could swap or rewrite before the job starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner.binds import Bind
from runner.config import AgentConfig, SandboxConfig
from runner.lifecycle.prepare import check_unswappable, unbindable_paths
from runner.spec import JobSpec
from sandbox.pathtrust import swappable
from sandbox.plan import JobPaths, SandboxRefused, SandboxSite, plan_sandbox
from unit.test_sandbox_plan import allow

OTHER = 4444
ME = os.geteuid()


@pytest.fixture
def needs_root() -> None:
    if ME != 0:
        pytest.skip("changing owners needs root")


def tree(tmp_path: Path) -> Path:
    data = tmp_path / "groups" / "esm" / "data"
    data.mkdir(parents=True)
    return data


def test_a_path_only_root_and_this_account_can_write_is_not_swappable(tmp_path: Path) -> None:
    assert swappable(str(tree(tmp_path)), {0, ME}) is None


def test_a_missing_path_is_left_to_whoever_opens_it(tmp_path: Path) -> None:
    assert swappable(str(tmp_path / "gone" / "ci.sif"), {0, ME}, contents=True) is None


def test_a_group_writable_directory_above_a_bind_makes_it_swappable(tmp_path: Path) -> None:
    data = tree(tmp_path)
    data.parent.chmod(0o2775)
    problem = swappable(str(data), {0, ME})
    assert problem == f"{data.parent} is writable by group {data.parent.stat().st_gid}"
    data.parent.chmod(0o755)
    data.chmod(0o777)  # what is inside a bind is the job's to see, not a way to swap the bind
    assert swappable(str(data), {0, ME}) is None


def test_a_directory_of_another_user_above_a_bind_makes_it_swappable(
    tmp_path: Path, needs_root: None,
) -> None:
    data = tree(tmp_path)
    os.chown(data.parent, OTHER, OTHER)
    assert swappable(str(data), {0, ME}) == f"{data.parent} belongs to uid {OTHER}"


def test_a_sticky_world_writable_directory_is_fine_only_above_an_entry_we_own(
    tmp_path: Path, needs_root: None,
) -> None:
    scratch = tmp_path / "scratch"
    (scratch / "ci").mkdir(parents=True)
    scratch.chmod(0o1777)
    assert swappable(str(scratch / "ci"), {0, ME}) is None
    os.chown(scratch / "ci", OTHER, OTHER)
    assert swappable(str(scratch / "ci" / "x"), {0, ME}) is not None
    assert swappable(str(scratch / "ci"), {0, ME}) == f"{scratch} is writable by group 0 and everyone"


def test_an_image_file_others_can_rewrite_is_refused_with_its_directories(tmp_path: Path) -> None:
    image = tmp_path / "images" / "ci.sif"
    image.parent.mkdir()
    image.write_bytes(b"sif")
    image.chmod(0o644)
    assert swappable(str(image), {0, ME}, contents=True) is None
    image.chmod(0o666)
    assert swappable(str(image), {0, ME}, contents=True) == f"{image} is writable by group 0 and everyone"


def test_a_sandbox_directory_image_with_a_file_others_can_write_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "rootfs"
    (image / "usr" / "bin").mkdir(parents=True)
    tool = image / "usr" / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    (image / "usr" / "bin" / "sh").symlink_to("/bin/dash")
    assert swappable(str(image), {0, ME}, contents=True) is None
    tool.chmod(0o646)
    assert swappable(str(image), {0, ME}, contents=True) == f"{tool} is writable by everyone"


def test_prepare_refuses_a_swappable_bind_and_names_the_directory(tmp_path: Path) -> None:
    data = tree(tmp_path)
    data.parent.chmod(0o777)
    image = tmp_path / "ci.sif"
    image.write_bytes(b"sif")
    spec = JobSpec(name="j", image="ci", command=("true",), binds=(Bind(str(data), "/data", "ro"),))
    with pytest.raises(SandboxRefused, match=rf"bind {data}:/data:ro refused: {data.parent} is writable"):
        check_unswappable(spec, str(image))


def test_work_root_and_workdir_root_can_never_be_bound(tmp_path: Path) -> None:
    config = AgentConfig(state_dir=tmp_path / "state", work_root=tmp_path / "work", policy=None,
                         executor="local", max_jobs=1,
                         sandbox=SandboxConfig(workdir_root=tmp_path / "scratch"))
    site = SandboxSite(protected_paths=tuple(str(p) for p in unbindable_paths(config)))
    paths = JobPaths(job_id="j1", workspace=str(tmp_path / "work" / "j1" / "workspace"),
                     scratch=str(tmp_path / "scratch" / "j1"), meta=str(tmp_path / "work" / "j1" / "meta"))
    for source in (tmp_path / "work", tmp_path / "work" / "other-job", tmp_path / "scratch", tmp_path):
        spec = JobSpec(name="j", image="ci", command=("true",), binds=(Bind(str(source), "/data", "ro"),))
        with pytest.raises(SandboxRefused, match=r"its source .* is (inside|a parent of) the protected"):
            plan_sandbox(spec, allow(spec), "/images/ci.sif", paths, site, None, realpath=lambda p: p)
