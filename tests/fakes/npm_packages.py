"""GitHub's own descriptions of its API and webhooks, installed from npm at test time.

The GitHub emulator checks every request the project sends against the official OpenAPI
description (``@octokit/openapi``), and the webhook tests replay the official example payloads
(``@octokit/webhooks-examples``). Both are pinned here and installed on first use into a cache
outside the checkout; nothing of them is committed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

PINNED: dict[str, str] = {
    "@octokit/openapi": "23.0.2",
    "@octokit/webhooks-examples": "7.6.1",
}

DEFAULT_CACHE = Path("/var/cache/hpc-runner-dev/npm")
_INSTALL_TIMEOUT = 600.0


class NpmUnavailable(RuntimeError):
    """npm is missing or the registry cannot be reached: the packages cannot be installed."""


def cache_root() -> Path:
    return Path(os.environ.get("HPC_RUNNER_NPM_CACHE", str(DEFAULT_CACHE)))


def package_dir(name: str) -> Path:
    """The installed package's directory (``node_modules/<name>``), installing the pins if needed."""
    if name not in PINNED:
        raise KeyError(f"{name} is not one of the pinned packages: {sorted(PINNED)}")
    root = cache_root() / _pin_key()
    target = root / "node_modules" / name
    if _installed(root):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        # Another test process may be installing the same pins right now.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed(root):
            _install(root)
    return target


def _pin_key() -> str:
    return "-".join(f"{name.split('/')[-1]}@{version}" for name, version in sorted(PINNED.items()))


def _installed(root: Path) -> bool:
    return (root / ".complete").is_file()


def _install(root: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise NpmUnavailable("npm is not installed (deploy/dev/setup.sh installs it)")
    (root / "package.json").write_text('{"name": "hpc-runner-test-fixtures", "private": true}\n')
    specs = [f"{name}@{version}" for name, version in PINNED.items()]
    try:
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts",
                        "--save-exact", "--prefix", str(root), *specs],
                       check=True, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT)
    except subprocess.CalledProcessError as exc:
        raise NpmUnavailable(f"npm install {' '.join(specs)} failed: {exc.stderr.strip()[-2000:]}") from None
    except subprocess.TimeoutExpired:
        raise NpmUnavailable(f"npm install {' '.join(specs)} took over {_INSTALL_TIMEOUT:.0f}s") from None
    (root / ".complete").write_text("\n".join(specs) + "\n")
