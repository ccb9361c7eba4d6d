"""What the installed package needs besides its modules is in it: every module imports, and the
data files (bundled jobs and policy, the dashboard's templates and static files) are found through
importlib.resources and are listed in pyproject's package-data."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.resources
import pkgutil
import tomllib
from pathlib import Path

import pytest

import runner
import sandbox
from runner.cli import main

ROOT = Path(__file__).resolve().parents[2]


def all_modules() -> list[str]:
    names: list[str] = []
    for package in (runner, sandbox):
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


def test_every_module_imports() -> None:
    modules = all_modules()
    assert "runner.commands.audit" in modules and "runner.retention" in modules
    for name in modules:
        if name.endswith(".__main__"):  # runs the CLI when imported
            continue
        importlib.import_module(name)


@pytest.mark.parametrize(("package", "names"), [
    ("runner.web", ["templates/base.html", "templates/jobs.html", "templates/job.html",
                    "static/dashboard.css", "static/dashboard.js"]),
    ("runner.bundled", ["default-policy.toml", "jobs/hello.toml"]),
])
def test_data_files_are_found_through_importlib_resources(package: str, names: list[str]) -> None:
    files = importlib.resources.files(package)
    for name in names:
        assert files.joinpath(name).is_file(), f"{package}: {name}"


def package_data_globs() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs: dict[str, list[str]] = data["tool"]["setuptools"]["package-data"]
    return globs


def test_every_data_file_in_the_source_tree_is_in_package_data() -> None:
    globs = package_data_globs()
    missing: list[str] = []
    for package, patterns in globs.items():
        top = ROOT / package
        for path in top.rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(top).as_posix()
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
                missing.append(f"{package}/{relative}")
    assert missing == []


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"hpc-runner {importlib.metadata.version('hpc-runner')}\n"
