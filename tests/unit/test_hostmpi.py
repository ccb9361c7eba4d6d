"""Host MPI discovery against scripted `mpirun`, `ompi_info` and `ldd` answers."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runner.binds import Bind
from runner.errors import InfrastructureError
from sandbox.hostmpi import (
    HostMpi,
    HostMpiError,
    MpiNotFoundError,
    UnsupportedMpiError,
    cache_path,
    discover_host_mpi,
    identify_family,
    is_image_provided,
    load_or_discover,
    parse_ldd,
    parse_ompi_info_paths,
)

OPEN_MPI_VERSION = "mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n"
MPICH_VERSION = """HYDRA build details:
    Version:                                 4.1.2
    Release Date:                            Wed Jun  7 15:22:45 CDT 2023
    CC:                              gcc
    Configure options:                       '--prefix=/usr'
    Process Manager:                         pmi
    Launchers available:                     ssh rsh fork slurm ll lsf sge manual persist
"""
INTEL_VERSION = ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)\n"
                 "Copyright 2003-2023, Intel Corporation.\n")


@dataclass
class FakeHost:
    """A pretend Open MPI installation under `root`, and the answers its tools give."""

    root: Path
    version_text: str = OPEN_MPI_VERSION
    ompi_info_fails: bool = False
    calls: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ompi = self.root / "ompi"
        self.pmix = self.root / "pmix"
        self.syslib = self.root / "syslib"
        for path in (self.ompi / "bin", self.ompi / "lib" / "openmpi", self.ompi / "etc",
                     self.ompi / "share" / "openmpi", self.pmix / "lib" / "pmix",
                     self.pmix / "share" / "pmix", self.syslib):
            path.mkdir(parents=True, exist_ok=True)
        for tool in ("mpirun", "ompi_info"):
            (self.ompi / "bin" / tool).write_text("#!/bin/sh\n")
            (self.ompi / "bin" / tool).chmod(0o755)
        for lib in ("libmpi.so.40", "libmpi_mpifh.so.40", "libmpi_mpifh.so", "libopen-pal.so.40"):
            (self.ompi / "lib" / lib).write_text("")
        for plugin in ("mca_btl_vader.so", "mca_pml_ucx.so", "mca_pmix_ext3x.so"):
            (self.ompi / "lib" / "openmpi" / plugin).write_text("")
        (self.ompi / "lib" / "openmpi" / "mca_btl_vader.la").write_text("")
        (self.pmix / "lib" / "libpmix.so.2.6.2").write_text("")
        (self.pmix / "lib" / "pmix" / "pmix_mca_pcompress_zlib.so").write_text("")
        (self.pmix / "share" / "pmix-mca-params.conf").write_text("")
        # Like Debian: the loader finds libpmix through a symlink in the system directory.
        (self.syslib / "libpmix.so.2").symlink_to(self.pmix / "lib" / "libpmix.so.2.6.2")

    @property
    def mpirun(self) -> str:
        return str(self.ompi / "bin" / "mpirun")

    def which(self, name: str) -> str | None:
        return self.mpirun if name == "mpirun" else None

    def lib(self, name: str) -> str:
        return str(self.syslib / name)

    def deps(self, path: str) -> list[str]:
        """The ldd lines for one file."""
        name = os.path.basename(path)
        ompi_lib = self.ompi / "lib"
        table = {
            "ompi_info": [f"libmpi.so.40 => {ompi_lib}/libmpi.so.40 (0x00007f0000001000)",
                          f"libopen-pal.so.40 => {ompi_lib}/libopen-pal.so.40 (0x00007f0000002000)",
                          f"libc.so.6 => {self.lib('libc.so.6')} (0x00007f0000003000)"],
            "libmpi.so.40": [f"libopen-pal.so.40 => {ompi_lib}/libopen-pal.so.40 (0x00007f0000002000)",
                             f"libhwloc.so.15 => {self.lib('libhwloc.so.15')} (0x00007f0000004000)",
                             f"libm.so.6 => {self.lib('libm.so.6')} (0x00007f0000005000)",
                             f"libc.so.6 => {self.lib('libc.so.6')} (0x00007f0000003000)",
                             "/lib64/ld-linux-x86-64.so.2 (0x00007f0000006000)"],
            "libmpi_mpifh.so.40": [f"libgfortran.so.5 => {self.lib('libgfortran.so.5')} (0x00007f0000007000)",
                                   f"libquadmath.so.0 => {self.lib('libquadmath.so.0')} (0x0000)"],
            "mca_pml_ucx.so": [f"libucp.so.0 => {self.lib('libucp.so.0')} (0x00007f0000008000)",
                               f"libstdc++.so.6 => {self.lib('libstdc++.so.6')} (0x00007f0000009000)",
                               f"libgcc_s.so.1 => {self.lib('libgcc_s.so.1')} (0x00007f000000a000)",
                               "libcuda.so.1 => not found"],
            "mca_pmix_ext3x.so": [f"libpmix.so.2 => {self.lib('libpmix.so.2')} (0x00007f000000b000)",
                                  f"libpthread.so.0 => {self.lib('libpthread.so.0')} (0x00007f000000c000)"],
            "pmix_mca_pcompress_zlib.so": [f"libz.so.1 => {self.lib('libz.so.1')} (0x00007f000000d000)"],
        }
        return ["\tlinux-vdso.so.1 (0x00007ffd00000000)", *(f"\t{line}" for line in table.get(name, []))]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert kwargs["capture_output"] and kwargs["text"] and kwargs["timeout"]
        self.calls.append(list(argv))
        tool = os.path.basename(argv[0])
        if tool == "mpirun":
            return subprocess.CompletedProcess(argv, 0, self.version_text, "")
        if tool == "ompi_info":
            if self.ompi_info_fails:
                return subprocess.CompletedProcess(argv, 1, "", "ompi_info: error while loading libraries")
            return subprocess.CompletedProcess(argv, 0, self.ompi_info_paths(), "")
        if tool == "ldd":
            files = argv[1:]
            if len(files) == 1:
                return subprocess.CompletedProcess(argv, 0, "\n".join(self.deps(files[0])) + "\n", "")
            text = "".join(f"{f}:\n" + "\n".join(self.deps(f)) + "\n" for f in files)
            return subprocess.CompletedProcess(argv, 0, text, "")
        raise AssertionError(f"unexpected command {argv}")

    def ompi_info_paths(self) -> str:
        o = self.ompi
        return "\n".join([f"path:prefix:{o}", f"path:exec_prefix:{o}", f"path:bindir:{o}/bin",
                          f"path:libdir:{o}/lib", f"path:pkglibdir:{o}/lib/openmpi",
                          f"path:sysconfdir:{o}/etc", f"path:pkgdatadir:{o}/share/openmpi",
                          f"path:pkgdatadir:{o}/ignored-duplicate", "config:arch:x86_64-pc-linux-gnu"]) + "\n"

    def discover(self) -> HostMpi:
        return discover_host_mpi(run=self.run, which=self.which)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def lib_binds(mpi: HostMpi) -> dict[str, str]:
    return {b.target.rsplit("/", 1)[1]: b.source for b in mpi.binds if b.target.startswith(mpi.library_dir)}


def test_discovers_open_mpi(host: FakeHost) -> None:
    mpi = host.discover()
    assert (mpi.family, mpi.version, mpi.prefix) == ("openmpi", "4.1.4", str(host.ompi))
    assert mpi.mpirun == host.mpirun
    assert mpi.libmpi == str(host.ompi / "lib" / "libmpi.so.40")
    assert mpi.plugin_dirs == (str(host.ompi / "lib" / "openmpi"), str(host.pmix / "lib" / "pmix"))
    assert mpi.passthrough_prefixes == ("OMPI_", "PMIX_")
    assert dict(mpi.launcher_env) == {"PMIX_MCA_gds": "hash"}


def test_directories_are_bound_read_only_at_their_host_paths(host: FakeHost) -> None:
    same_path = [b for b in host.discover().binds if b.source == b.target]
    assert same_path == [Bind(str(p), str(p), "ro") for p in (
        host.ompi / "lib" / "openmpi", host.pmix / "lib" / "pmix", host.ompi / "etc",
        host.ompi / "share" / "openmpi", host.pmix / "share" / "pmix",
        host.pmix / "share" / "pmix-mca-params.conf")]


def test_the_library_closure_is_bound_file_by_file_into_the_private_directory(host: FakeHost) -> None:
    mpi = host.discover()
    assert lib_binds(mpi) == {
        "libmpi.so.40": str(host.ompi / "lib" / "libmpi.so.40"),
        "libmpi_mpifh.so.40": str(host.ompi / "lib" / "libmpi_mpifh.so.40"),
        "libopen-pal.so.40": str(host.ompi / "lib" / "libopen-pal.so.40"),
        "libhwloc.so.15": host.lib("libhwloc.so.15"),
        "libucp.so.0": host.lib("libucp.so.0"),
        "libpmix.so.2": host.lib("libpmix.so.2"),
        "libz.so.1": host.lib("libz.so.1"),
    }
    assert all(b.mode == "ro" for b in mpi.binds)
    assert all(b.target.startswith("/opt/hpc-runner/mpi/lib/") for b in mpi.binds if b.source != b.target)


def test_ldd_runs_in_batches_and_only_on_shared_objects(host: FakeHost) -> None:
    host.discover()
    ldd_calls = [call for call in host.calls if call[0] == "ldd"]
    assert len(ldd_calls) == 3  # ompi_info's libmpi; libmpi, bindings and plugins; PMIx plugins
    assert not any(call[1].endswith(".la") for call in ldd_calls if len(call) > 1)


def test_parse_ldd() -> None:
    text = ("\tlinux-vdso.so.1 (0x00007ffc5a5f2000)\n"
            "\tlibmpi.so.40 => /lib/x86_64-linux-gnu/libmpi.so.40 (0x00007f8fe9068000)\n"
            "\tlibfoo.so.1 => not found\n"
            "\tlibsp.so.2 => /opt/my libs/libsp.so.2 (0x00007f8fe9068000)\n"
            "\t/lib64/ld-linux-x86-64.so.2 (0x00007f8fe91c0000)\n"
            "/some/file.so:\n")
    assert parse_ldd(text) == {"libmpi.so.40": "/lib/x86_64-linux-gnu/libmpi.so.40",
                               "libsp.so.2": "/opt/my libs/libsp.so.2"}


@pytest.mark.parametrize(("soname", "provided"), [
    ("libc.so.6", True), ("libm.so.6", True), ("libpthread.so.0", True), ("libdl.so.2", True),
    ("librt.so.1", True), ("libresolv.so.2", True), ("ld-linux-x86-64.so.2", True),
    ("libnss_files.so.2", True), ("libgfortran.so.5", True), ("libstdc++.so.6", True),
    ("libgcc_s.so.1", True), ("libnsl.so.1", True),
    ("libmpi.so.40", False), ("libcrypto.so.3", False), ("libnsl.so.2", False), ("libmunge.so.2", False),
    ("libmca_common_sm.so.40", False), ("libcap.so.2", False),
])
def test_image_provided_libraries(soname: str, provided: bool) -> None:
    assert is_image_provided(soname) is provided


def test_parse_ompi_info_paths_keeps_the_first_of_each() -> None:
    text = "path:prefix:/usr\npath:libdir:/usr/lib/x:y\npath:prefix:/other\nmca:x:y:z\n"
    paths = parse_ompi_info_paths(text)
    assert paths == {"prefix": "/usr", "libdir": "/usr/lib/x:y"}


@pytest.mark.parametrize(("text", "family", "version"), [
    (OPEN_MPI_VERSION, "openmpi", "4.1.4"),
    ("mpirun (Open MPI) 5.0.3\n", "openmpi", "5.0.3"),
    (MPICH_VERSION, "mpich", "4.1.2"),
    (INTEL_VERSION, "intel", "2021.10"),
    ("something else\n", "unknown", "unknown"),
])
def test_identify_family(text: str, family: str, version: str) -> None:
    assert identify_family(text) == (family, version)


@pytest.mark.parametrize(("text", "shown"), [
    (MPICH_VERSION, "host MPI is MPICH 4.1.2"),
    (INTEL_VERSION, "host MPI is Intel MPI 2021.10"),
    ("mystery mpi 1.0\n", "host MPI is an MPI that is not Open MPI"),
])
def test_other_mpis_are_refused_clearly(host: FakeHost, text: str, shown: str) -> None:
    host.version_text = text
    with pytest.raises(UnsupportedMpiError) as refused:
        host.discover()
    message = str(refused.value)
    assert shown in message and "needs Open MPI" in message and "openmpi-bin" in message
    assert isinstance(refused.value, InfrastructureError)


def test_no_mpirun_on_path(host: FakeHost) -> None:
    with pytest.raises(MpiNotFoundError, match=r"'mpirun' is not on PATH.*openmpi-bin.*module"):
        discover_host_mpi(run=host.run, which=lambda name: None)


def test_a_broken_ompi_info_is_reported(host: FakeHost) -> None:
    host.ompi_info_fails = True
    with pytest.raises(MpiNotFoundError, match="error while loading libraries"):
        host.discover()


def test_a_tool_that_cannot_run_is_a_host_mpi_error(host: FakeHost) -> None:
    def broken(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    with pytest.raises(HostMpiError, match="could not run"):
        discover_host_mpi(run=broken, which=host.which)


def test_a_missing_plugin_directory_is_reported(host: FakeHost) -> None:
    for plugin in (host.ompi / "lib" / "openmpi").iterdir():
        plugin.unlink()
    (host.ompi / "lib" / "openmpi").rmdir()
    with pytest.raises(MpiNotFoundError, match="plugin directory"):
        host.discover()


def test_json_round_trip(host: FakeHost) -> None:
    mpi = host.discover()
    assert HostMpi.from_json(json.loads(json.dumps(mpi.to_json()))) == mpi


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("libmpi"),
    lambda d: d.update(binds=[{"source": "/a", "target": "/b", "mode": "rx"}]),
    lambda d: d.update(plugin_dirs="/a"),
    lambda d: d.update(launcher_env={"A": 1}),
])
def test_from_json_refuses_malformed_data(host: FakeHost, damage: Callable[[dict[str, Any]], object]) -> None:
    data = host.discover().to_json()
    damage(data)
    with pytest.raises((ValueError, KeyError)):
        HostMpi.from_json(data)


# -- cache ---------------------------------------------------------------------------------------

def cached(host: FakeHost, cache_dir: Path, **kwargs: Any) -> HostMpi:
    return load_or_discover(cache_dir, run=host.run, which=host.which, hostname="node1", **kwargs)


def test_discovery_runs_once_per_host(host: FakeHost, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = cached(host, cache_dir)
    calls = len(host.calls)
    assert cached(host, cache_dir) == first
    assert len(host.calls) == calls
    assert json.loads(cache_path(cache_dir, "node1").read_text())["hostname"] == "node1"


def test_refresh_forces_discovery(host: FakeHost, tmp_path: Path) -> None:
    cached(host, tmp_path)
    calls = len(host.calls)
    cached(host, tmp_path, refresh=True)
    assert len(host.calls) > calls


def test_a_changed_libmpi_triggers_rediscovery(host: FakeHost, tmp_path: Path) -> None:
    cached(host, tmp_path)
    calls = len(host.calls)
    (host.ompi / "lib" / "libmpi.so.40").write_text("upgraded")
    cached(host, tmp_path)
    assert len(host.calls) > calls


def test_another_host_has_its_own_cache(host: FakeHost, tmp_path: Path) -> None:
    cached(host, tmp_path)
    calls = len(host.calls)
    load_or_discover(tmp_path, run=host.run, which=host.which, hostname="node2")
    assert len(host.calls) > calls
    assert cache_path(tmp_path, "node2").exists()


def test_a_corrupt_cache_is_replaced(host: FakeHost, tmp_path: Path) -> None:
    cache_path(tmp_path, "node1").write_text("{not json")
    assert cached(host, tmp_path) == host.discover()
    assert json.loads(cache_path(tmp_path, "node1").read_text())["format"] == 1


def test_an_unwritable_cache_does_not_fail_discovery(host: FakeHost, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cached(host, blocker / "cache").family == "openmpi"


def test_a_different_mpirun_on_path_triggers_rediscovery(host: FakeHost, tmp_path: Path) -> None:
    cached(host, tmp_path)
    other = FakeHost(tmp_path / "other")
    load_or_discover(tmp_path, run=other.run, which=other.which, hostname="node1")
    assert other.calls
