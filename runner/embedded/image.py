"""The demo's test image, assembled from the host's own binaries.

The embedded default must work on a login node without root and without network, so
the image is not bootstrapped from a distribution: a handful of host programs, the
host's C library (an image's glibc must be at least as new as the host's for the
bind-mounted MPI libraries, and this one is the same), and an MPI test program
compiled against the host Open MPI. The image holds no MPI library of its own: the
sandbox binds the host's in at run time, exactly as production images are used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from runner.errors import InfrastructureError

# Programs the bundled example jobs use.
PROGRAMS = ("sh", "env", "cat", "ls", "sleep", "id", "echo", "touch", "uname", "head", "sort",
            "tr", "grep", "test", "true", "false", "mkdir", "rm", "wc", "printf", "date", "seq")
# The MPI libraries come from the host at run time, never from the image.
HOST_MPI_MARKERS = ("libmpi", "libopen-rte", "libopen-pal", "libpmix", "openmpi")
IMAGE_FORMAT_VERSION = "1"


def default_image_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hpc-runner" / "demo.sif"


def _ldd(path: str) -> list[str]:
    result = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30, check=False)
    libs = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def _copy_with_libraries(program: str, rootfs: Path, *, skip_mpi: bool = False) -> None:
    for lib in _ldd(program):
        if skip_mpi and any(marker in lib for marker in HOST_MPI_MARKERS):
            continue
        target = rootfs / lib.lstrip("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), target)


def _compile_mpi_hello(rootfs: Path, workdir: Path) -> bool:
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        return False
    source = workdir / "mpi-hello.c"
    source.write_bytes(resources.files("runner.bundled").joinpath("mpi-hello.c").read_bytes())
    binary = rootfs / "usr/local/bin/mpi-hello"
    binary.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([mpicc, "-O2", "-o", str(binary), str(source)], capture_output=True,
                            text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise InfrastructureError(f"compiling the MPI test program failed: {result.stderr.strip()}")
    _copy_with_libraries(str(binary), rootfs, skip_mpi=True)
    return True


def assemble_rootfs(rootfs: Path, workdir: Path) -> bool:
    """Fill `rootfs` with the demo's programs; returns whether the MPI program is in it."""
    for directory in ("bin", "usr/bin", "usr/local/bin", "etc", "tmp", "work", "proc", "sys", "dev",
                      "var/tmp", "root"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    for name in PROGRAMS:
        found = shutil.which(name, path="/usr/bin:/bin")
        if found is None:
            continue
        shutil.copy2(os.path.realpath(found), rootfs / "usr/bin" / name)
        _copy_with_libraries(found, rootfs)
    if not (rootfs / "usr/bin/sh").exists():
        raise InfrastructureError("cannot assemble the demo image: no /bin/sh on this host")
    os.symlink("../usr/bin/sh", rootfs / "bin/sh")
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/hpc-runner-demo-image").write_text(f"format {IMAGE_FORMAT_VERSION}\n")
    return _compile_mpi_hello(rootfs, workdir)


def build_demo_image(target: Path, *, apptainer: str = "apptainer", progress: bool = True) -> Path:
    """Build the demo SIF at `target` unless it is there already; returns its path."""
    if target.exists():
        return target
    if shutil.which(apptainer) is None:
        raise InfrastructureError(f"{apptainer} not found on PATH: install Apptainer "
                                  "(on a dev machine: sudo deploy/dev/setup.sh)")
    if progress:
        print(f"hpc-runner: building the demo image {target} (first use; a few seconds)...",
              file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hpc-runner-image-", dir=target.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        rootfs.mkdir()
        assemble_rootfs(rootfs, Path(tmp))
        partial = Path(tmp) / "demo.sif"
        result = subprocess.run([apptainer, "--quiet", "build", str(partial), str(rootfs)],
                                capture_output=True, text=True, timeout=600, check=False,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise InfrastructureError(f"apptainer build of the demo image failed: "
                                      f"{(result.stderr or result.stdout).strip()[-2000:]}")
        os.replace(partial, target)
    if progress:
        print(f"hpc-runner: demo image ready: {target}", file=sys.stderr, flush=True)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
