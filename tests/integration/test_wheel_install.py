"""The project's wheel, installed into a fresh venv the way a login node gets it (`pip install
hpc-runner` with the system's Python), gives a working `hpc-runner`.

The wheel is built from a copy of the checkout and installed offline from the wheelhouse that
deploy/dev/setup.sh fills with the wheels of pyproject.toml's build requirements and runtime
dependencies: the fresh venv gets exactly what the wheel declares, so a dependency missing from
pyproject.toml, or a data file missing from the wheel, fails here although the development venv
(which has everything) would not notice. Everything runs outside the checkout, so its `runner/`
cannot be imported by accident.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from conftest import (
    SERVICE_TMP_ROOT,
    SETUP_HINT,
    TEST_IMAGE,
    TEST_IMAGE_SHA256_FILE,
    _cluster_required,
    as_service_user,
    job_toml,
    make_runner_site,
)

from runner.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE = Path("/var/cache/hpc-runner-dev/wheelhouse")
# What setup.sh filled the wheelhouse for: the interpreter's version, then the requirements.
WHEELHOUSE_STAMP = WHEELHOUSE / ".requirements"
# The Python a login node has: Debian's, as setup.sh makes the development venv with.
SYSTEM_PYTHON = Path("/usr/bin/python3")
# Not part of a build: version control, build leftovers (setuptools would put an old build/lib
# into the wheel) and the tools' caches.
NOT_BUILT_FROM = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
    ".hypothesis", "node_modules", "test-output", ".venv")
PACKAGES = ("runner", "sandbox")
COMMAND_TIMEOUT_S = 300.0


def project() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as file:
        data: dict[str, Any] = tomllib.load(file)
    return data


def unavailable(message: str) -> NoReturn:
    if _cluster_required():
        pytest.fail(f"{message}; {SETUP_HINT} (CI and HPC_RUNNER_TEST_CLUSTER forbid skipping)",
                    pytrace=False)
    pytest.skip(f"{message}; {SETUP_HINT}")


def check_wheelhouse() -> None:
    """The wheelhouse is there and was filled for pyproject.toml's requirements as they are now."""
    if not WHEELHOUSE_STAMP.is_file():
        unavailable(f"no wheelhouse {WHEELHOUSE}")
    data = project()
    wanted = [*data["build-system"]["requires"], *data["project"]["dependencies"]]
    python = subprocess.run([SYSTEM_PYTHON, "--version"], capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip()
    version, *filled = WHEELHOUSE_STAMP.read_text().splitlines()
    if [version, *filled] != [python, *wanted]:
        unavailable(f"the wheelhouse {WHEELHOUSE} was filled for {version} and {filled}, not for "
                    f"{python} and pyproject.toml's {wanted}")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment with nothing of the test's: no pip configuration (its index or extra wheel
    directories would hide what the wheelhouse lacks), no PYTHONPATH."""
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_NO_INPUT": "1",
    }
    env.update(extra or {})
    return env


def run(argv: Sequence[str | os.PathLike[str]], *, cwd: Path, env: Mapping[str, str] | None = None,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(arg) for arg in argv], cwd=cwd, env=clean_env(env), input=input_text,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
                          umask=0o022)


def checked(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (f"{' '.join(map(str, result.args))} exited {result.returncode}:\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


@dataclass(frozen=True)
class Installed:
    """The wheel built from the checkout, and the fresh venv it is installed in."""

    source: Path        # the copy of the checkout the wheel was built from
    wheel: Path
    venv: Path
    outside: Path       # a directory outside the checkout, to run commands in

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "hpc-runner"

    def hpc_runner(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return run([self.command, *args], cwd=self.outside)

    def python(self, script: str, *args: str) -> Any:
        """Run ``script`` with the venv's Python (isolated: no PYTHON* variables, no cwd on the
        path); what it prints is JSON."""
        return json.loads(checked(run([self.venv / "bin" / "python", "-I", "-c", script, *args],
                                      cwd=self.outside)))


@pytest.fixture(scope="module")
def installed(service_user: str) -> Iterator[Installed]:
    check_wheelhouse()
    SERVICE_TMP_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Under the tests' root, not a private /tmp: the service account runs the installed command.
    root = Path(tempfile.mkdtemp(prefix="wheel-install-", dir=SERVICE_TMP_ROOT))
    root.chmod(0o755)
    try:
        source, dist, venv, outside = root / "source", root / "dist", root / "venv", root / "outside"
        shutil.copytree(REPO, source, ignore=NOT_BUILT_FROM, symlinks=True)
        outside.mkdir()
        # Build isolation as a release build has it, its setuptools and wheel from the wheelhouse.
        checked(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--find-links",
                     WHEELHOUSE, "--wheel-dir", dist, source], cwd=outside))
        wheels = list(dist.glob("*.whl"))
        assert len(wheels) == 1, f"pip wheel made {wheels}"
        checked(run([SYSTEM_PYTHON, "-m", "venv", venv], cwd=outside))
        checked(run([venv / "bin" / "python", "-m", "pip", "install", "--no-index", "--find-links",
                     WHEELHOUSE, wheels[0]], cwd=outside))
        yield Installed(source=source, wheel=wheels[0], venv=venv, outside=outside)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_wheel_holds_every_file_of_the_packages_and_nothing_else(installed: Installed) -> None:
    data = project()
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        dist_info = f"hpc_runner-{data['project']['version']}.dist-info"
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
    in_source = sorted(
        path.relative_to(installed.source).as_posix()
        for package in PACKAGES for path in (installed.source / package).rglob("*")
        if path.is_file() and path.suffix != ".pyc")
    in_wheel = sorted(name for name in names if name.split("/", 1)[0] in PACKAGES)
    assert [name for name in in_source if name not in in_wheel] == [], "missing from the wheel"
    assert [name for name in in_wheel if name not in in_source] == [], "in the wheel but not the source"
    assert {name.split("/", 1)[0] for name in names} == {*PACKAGES, dist_info}
    assert f"Requires-Python: {data['project']['requires-python']}\n" in metadata


def test_the_venv_is_fresh_and_runs_the_installed_package(installed: Installed) -> None:
    config = (installed.venv / "pyvenv.cfg").read_text()
    assert re.search(r"^include-system-site-packages = false$", config, re.M), config
    found = installed.python(
        "import json, sys, runner, sandbox\n"
        "print(json.dumps([sys.version_info[:2], runner.__file__, sandbox.__file__]))\n")
    version, *files = found
    assert tuple(version) >= (3, 11)
    site_packages = installed.venv / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"
    assert files == [str(site_packages / package / "__init__.py") for package in PACKAGES]


def test_every_module_imports_with_only_the_declared_dependencies(installed: Installed) -> None:
    # A module importing a package that pyproject.toml does not declare fails here: the venv has
    # only what the wheel's metadata made pip install.
    failures = installed.python(
        "import importlib, json, pkgutil, traceback\n"
        "import runner, sandbox\n"
        "failures = {}\n"
        "for package in (runner, sandbox):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if info.name.endswith('.__main__'):\n"
        "            continue  # runs the CLI when imported\n"
        "        try:\n"
        "            importlib.import_module(info.name)\n"
        "        except Exception:\n"
        "            failures[info.name] = traceback.format_exc(limit=1)\n"
        "print(json.dumps(failures))\n")
    assert failures == {}


def test_version_prints_the_projects_version(installed: Installed) -> None:
    result = installed.hpc_runner("--version")

    assert checked(result) == f"hpc-runner {project()['project']['version']}\n"


def test_help_lists_every_command(installed: Installed) -> None:
    commands = next(action.choices for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    assert "run" in commands and "doctor" in commands

    listed = re.findall(r"^    (\S+)", checked(installed.hpc_runner("--help")), re.M)

    assert sorted(listed) == sorted(commands)


def test_the_bundled_policy_and_jobs_are_installed_and_valid(installed: Installed) -> None:
    # The default policy as `hpc-runner agent` writes it for its user, from the installed template.
    paths = installed.python(
        "import json, os, pwd\n"
        "from importlib import resources\n"
        "from pathlib import Path\n"
        "from runner.embedded.policy import render_default_policy\n"
        "text = render_default_policy(user=pwd.getpwuid(os.geteuid()).pw_name,\n"
        "                             image_path=Path('/nonexistent/demo.sif'), image_sha256='0' * 64)\n"
        "Path('default-policy.toml').write_text(text)\n"
        "jobs = resources.files('runner.bundled').joinpath('jobs')\n"
        "print(json.dumps({p.name: str(p) for p in jobs.iterdir()}))\n")
    policy = installed.outside / "default-policy.toml"

    check = installed.hpc_runner("policy", "check", policy)

    assert checked(check) == f"valid: {policy} (1 accounts, 1 images, 1 grants)\n"
    assert sorted(paths) == ["denied.toml", "hello.toml", "mpi-allreduce.toml", "walltime.toml"]
    for name, path in paths.items():
        assert Path(path).is_relative_to(installed.venv), path
        explain = installed.hpc_runner("policy", "explain", "--policy", policy, "--job", path)
        decision = json.loads(explain.stdout)
        # The demo's jobs: all but one are what the default policy grants.
        allowed = name != "denied.toml"
        assert (explain.returncode, decision["allowed"]) == ((0, True) if allowed else (126, False)), \
            f"{name}: {explain.stdout}{explain.stderr}"


def test_the_dashboards_templates_and_static_files_load(installed: Installed) -> None:
    templates = sorted(path.name for path in (REPO / "runner" / "web" / "templates").glob("*.html"))
    found = installed.python(
        "import hashlib, json, sys\n"
        "from runner.web.board import STATES, ListQuery, Page, Viewer\n"
        "from runner.web.pages import SOURCES\n"
        "from runner.web.render import STATIC_FILES, environment, render, static_file, static_url\n"
        "for name in sys.argv[1:]:\n"
        "    environment().get_template(name)  # parsed: present and well-formed\n"
        "html = render('jobs.html', viewer=Viewer('alice', ('local:user:alice',)), site_name='login1',\n"
        "              logout=False, csrf='', page=Page(cards=[], next_before=None), query=ListQuery(),\n"
        "              states=STATES, sources=SOURCES, accounts=[], filtered=False, older_url='/?before=',\n"
        "              rows_url='/rows?', events_url='/events/jobs')\n"
        "static = {name: [static_url(name), hashlib.sha256(static_file(name)).hexdigest()]\n"
        "          for name in (*STATIC_FILES, 'ansi.css')}\n"
        "print(json.dumps({'html': html, 'static': static}))\n",
        *templates)
    html, static = found["html"], found["static"]

    assert "<title>Jobs · hpc-runner</title>" in html
    assert '<span class="where">login1</span>' in html
    assert '<tr class="empty"><td colspan="10">No jobs.</td></tr>' in html
    for name in (REPO / "runner" / "web" / "static").iterdir():
        url, digest = static[name.name]
        assert digest == hashlib.sha256(name.read_bytes()).hexdigest(), name.name
        assert url in html, f"the page does not link {url}"
    assert static["ansi.css"][0] in html


@pytest.fixture
def image_sha256() -> str:
    """The test image's digest, once Apptainer runs: all the local executor needs (no Slurm)."""
    if shutil.which("apptainer") is None:
        unavailable("no apptainer")
    if not TEST_IMAGE_SHA256_FILE.is_file():
        unavailable(f"no test image {TEST_IMAGE} (or its {TEST_IMAGE_SHA256_FILE.name})")
    return TEST_IMAGE_SHA256_FILE.read_text().strip()


@pytest.mark.cluster
def test_an_mpi_job_runs_end_to_end_with_the_installed_command(
    installed: Installed, image_sha256: str, service_tmp: Path
) -> None:
    site = make_runner_site(service_tmp, image_sha256)
    job = site.write_job("mpi-2", job_toml("mpi-2", command=["/usr/local/bin/mpi-hello"], tasks=2, mpi=True))

    # The installed venv's command, as the service account, with the development venv off PATH.
    result = as_service_user(
        [installed.command, "run", job, "--config", site.config, "--workdir", site.workspace],
        cwd=site.root, env={"PATH": f"{installed.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"})

    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    ranks = sorted(re.findall(r"^rank (\d+) of (\d+)$", result.stdout, re.M))
    assert ranks == [("0", "2"), ("1", "2")], result.stdout
    assert "allreduce sum 3\n" in result.stdout
