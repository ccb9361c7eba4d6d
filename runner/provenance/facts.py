"""What a run was made of, recorded when the job is prepared: the verified image, the job's resolved
environment (secret values already replaced), the host MPI's bound libraries and the versions of
hpc-runner, Apptainer and Slurm. Kept beside the job's files until its provenance record is written,
so that an agent restarted in between still knows them."""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runner import __version__
from runner.logs.redact import redact_env
from sandbox.hostmpi import HostMpi
from sandbox.images import DigestCache, VerifiedImage, sha256_file

FACTS_NAME = "run-facts.json"
REDACTED = "[REDACTED]"
# The host MPI binds a library closure of a few dozen files; more are not digested one by one.
MAX_DIGESTED_LIBRARIES = 256
VERSION_TIMEOUT_S = 10.0


def file_sha256(path: str, cache: DigestCache | None) -> str | None:
    """A regular file's sha256, from the digest cache while the file is unchanged; None otherwise."""
    try:
        real = os.path.realpath(path)
        info = os.stat(real)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    known = cache.get(real, info) if cache is not None else None
    if known is not None:
        return known
    try:
        digest = sha256_file(real)
    except OSError:
        return None
    if cache is not None:
        cache.put(real, info, digest)
    return digest


@functools.lru_cache(maxsize=8)
def tool_version(argv: tuple[str, ...]) -> str | None:
    """The version a tool prints (`apptainer --version`: "apptainer version 1.4.5" -> "1.4.5"),
    asked once per process; None when it cannot say."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=VERSION_TIMEOUT_S,
                                check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    words = result.stdout.split()
    return words[-1] if result.returncode == 0 and words else None


def versions(*, apptainer: str, slurm: str | None) -> dict[str, str | None]:
    """hpc-runner's, Apptainer's and (for a Slurm job) Slurm's versions."""
    found: dict[str, str | None] = {"hpc-runner": __version__,
                                    "apptainer": tool_version((apptainer, "--version"))}
    if slurm is not None:
        found["slurm"] = tool_version((slurm, "--version"))
    return found


def host_mpi_facts(mpi: HostMpi, cache: DigestCache | None) -> dict[str, Any]:
    libraries: list[dict[str, str]] = []
    for bind in mpi.binds:
        if len(libraries) >= MAX_DIGESTED_LIBRARIES:
            break
        digest = file_sha256(bind.source, cache)
        if digest is not None:
            libraries.append({"path": bind.source, "sha256": digest})
    return {"family": mpi.family, "version": mpi.version, "libraries": libraries}


def run_facts(*, image: VerifiedImage, env: Mapping[str, str], redacted_vars: Sequence[str],
              mpi: HostMpi | None, executor: str, apptainer: str, slurm: str | None,
              cache: DigestCache | None) -> dict[str, Any]:
    sha256 = image.sha256 if image.sha256 is not None else file_sha256(image.path, cache)
    return {
        "image": {"name": image.name, "path": image.path, "sha256": sha256, "signer": image.signer},
        "environment": redact_env(env, redacted_vars, REDACTED),
        "host_mpi": host_mpi_facts(mpi, cache) if mpi is not None else None,
        "versions": versions(apptainer=apptainer, slurm=slurm),
        "executor": executor,
    }


def save_facts(job_dir: Path, facts: Mapping[str, Any]) -> None:
    path = job_dir / FACTS_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(facts, handle, sort_keys=True)


def load_facts(job_dir: Path) -> dict[str, Any]:
    """The facts saved at preparation; empty when there are none (a job prepared by an older agent)."""
    try:
        with open(job_dir / FACTS_NAME, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
