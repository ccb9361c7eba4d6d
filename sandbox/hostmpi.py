"""Discover the host's Open MPI and what must be bound into an image that has no MPI.

The bind model: the application in the image was built against Open MPI, the image
carries no MPI, and at run time the host's Open MPI is bound in read-only:

- every shared library that `libmpi` (and its language bindings) and every MCA plugin
  need, as the host's dynamic loader resolves them, each bound as a single file into a
  private directory (`library_dir`) that `LD_LIBRARY_PATH` names. Binding files rather
  than the host's library directory means no file of the image is shadowed.
  The C library family and the compiler runtimes are left out: the application was
  linked against the image's own, and a host copy earlier on `LD_LIBRARY_PATH` would
  replace them for the whole application;
- the directories Open MPI and PMIx open by their compiled-in paths (MCA plugins,
  configuration, help texts), at the same paths as on the host.

Discovery runs `mpirun --version`, `ompi_info` and `ldd`, so it is cached per host
(`load_or_discover`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from runner.binds import Bind
from runner.errors import InfrastructureError

RunFn = Callable[..., "subprocess.CompletedProcess[str]"]
WhichFn = Callable[[str], "str | None"]

DEFAULT_LIBRARY_DIR = "/opt/hpc-runner/mpi/lib"
CACHE_FORMAT = 1
COMMAND_TIMEOUT_SECONDS = 60
# ldd takes many files at once; chunks keep the command line far below ARG_MAX.
LDD_CHUNK = 200

# Sonames (up to ".so") that must come from the image: the C library family, because the
# image's loader and libc must match each other, and the compiler runtimes, because the
# application was linked against the image's (a newer host copy is not always a superset).
IMAGE_PROVIDED_SONAMES = frozenset({
    "libc", "libm", "libmvec", "libpthread", "libdl", "librt", "libresolv", "libutil",
    "libanl", "libBrokenLocale", "libthread_db", "libc_malloc_debug", "libmemusage",
    "libpcprofile", "libSegFault", "libnsl.so.1",
    "libgcc_s", "libstdc++", "libgfortran", "libquadmath",
})
IMAGE_PROVIDED_PREFIXES = ("ld-linux", "ld64.so", "libnss_", "linux-vdso", "linux-gate")

OPEN_MPI_HOWTO = ("install Open MPI on the host (Debian/Ubuntu: apt-get install openmpi-bin; "
                  "RHEL: dnf install openmpi) or load its environment module, so that its "
                  "mpirun is first on the agent's PATH")

LDD_LINE = re.compile(r"^\s*(\S+) => (/.*) \(0x[0-9a-fA-F]+\)\s*$")
OPEN_MPI_VERSION = re.compile(r"\(Open MPI\)\s+(\S+)")
INTEL_VERSION = re.compile(r"Intel\(R\) MPI Library.*?Version\s+(\S+)")
HYDRA_VERSION = re.compile(r"^\s*Version:\s+(\S+)", re.MULTILINE)
SONAME_WITH_MAJOR = re.compile(r"^libmpi_[A-Za-z0-9_+-]+\.so\.\d+$")


class HostMpiError(InfrastructureError):
    """The host MPI cannot be used for the bind model."""


class MpiNotFoundError(HostMpiError):
    """No MPI on the host (or an incomplete installation)."""


class UnsupportedMpiError(HostMpiError):
    """An MPI the bind model does not support (only Open MPI is)."""


def _default_launcher_env() -> Mapping[str, str]:
    # PMIx's ds12 shared-memory store cannot lock across the container boundary and
    # prints "PMIX ERROR ... gds_ds12_lock_pthread.c" for every rank; the hash store works.
    return MappingProxyType({"PMIX_MCA_gds": "hash"})


@dataclass(frozen=True)
class HostMpi:
    """The host MPI, and the binds that make it usable inside an image without MPI."""

    family: str
    version: str
    prefix: str
    mpirun: str
    libmpi: str
    plugin_dirs: tuple[str, ...]
    binds: tuple[Bind, ...]
    library_dir: str = DEFAULT_LIBRARY_DIR
    # The launcher hands each rank its identity and the way back to it in these.
    passthrough_prefixes: tuple[str, ...] = ("OMPI_", "PMIX_")
    launcher_env: Mapping[str, str] = field(default_factory=_default_launcher_env)

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family, "version": self.version, "prefix": self.prefix,
            "mpirun": self.mpirun, "libmpi": self.libmpi, "plugin_dirs": list(self.plugin_dirs),
            "binds": [{"source": b.source, "target": b.target, "mode": b.mode} for b in self.binds],
            "library_dir": self.library_dir,
            "passthrough_prefixes": list(self.passthrough_prefixes),
            "launcher_env": dict(self.launcher_env),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HostMpi:
        """The inverse of `to_json`; raises ValueError on anything malformed."""
        binds = tuple(_bind_from_json(item) for item in _list(data, "binds"))
        launcher_env = data["launcher_env"]
        if not isinstance(launcher_env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in launcher_env.items()):
            raise ValueError("launcher_env must map strings to strings")
        return cls(
            family=_str(data, "family"), version=_str(data, "version"), prefix=_str(data, "prefix"),
            mpirun=_str(data, "mpirun"), libmpi=_str(data, "libmpi"),
            plugin_dirs=tuple(_strings(data, "plugin_dirs")), binds=binds,
            library_dir=_str(data, "library_dir"),
            passthrough_prefixes=tuple(_strings(data, "passthrough_prefixes")),
            launcher_env=MappingProxyType(dict(launcher_env)),
        )


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data[key]
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    return value


def _strings(data: Mapping[str, Any], key: str) -> list[str]:
    items = _list(data, key)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{key} must be a list of strings")
    return items


def _bind_from_json(item: Any) -> Bind:
    if not isinstance(item, dict):
        raise ValueError("a bind must be an object")
    mode = item.get("mode")
    if mode not in ("ro", "rw"):
        raise ValueError(f"bind mode must be 'ro' or 'rw', got {mode!r}")
    return Bind(_str(item, "source"), _str(item, "target"), "ro" if mode == "ro" else "rw")


# -- running the host's tools ---------------------------------------------------------------

def _run(run: RunFn, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return run(list(argv), capture_output=True, text=True, check=False,
                   timeout=COMMAND_TIMEOUT_SECONDS)
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostMpiError(f"could not run {argv[0]}: {exc}") from exc


def _resolve_mpirun(mpirun: str, which: WhichFn) -> str:
    found = which(mpirun)
    if found is None:
        raise MpiNotFoundError(f"no MPI launcher: {mpirun!r} is not on PATH; {OPEN_MPI_HOWTO}")
    return os.path.abspath(found)


def identify_family(version_text: str) -> tuple[str, str]:
    """(family, version) from `mpirun --version`; family is openmpi, mpich, intel or unknown."""
    if match := OPEN_MPI_VERSION.search(version_text):
        return "openmpi", match.group(1)
    if match := INTEL_VERSION.search(version_text):
        return "intel", match.group(1)
    if "HYDRA" in version_text or "MPICH" in version_text:
        match = HYDRA_VERSION.search(version_text)
        return "mpich", match.group(1) if match else "unknown"
    return "unknown", "unknown"


FAMILY_NAMES = {"mpich": "MPICH", "intel": "Intel MPI", "unknown": "an MPI that is not Open MPI"}


def _identify(mpirun: str, run: RunFn) -> tuple[str, str]:
    done = _run(run, [mpirun, "--version"])
    text = done.stdout + done.stderr
    family, version = identify_family(text)
    if family == "openmpi":
        return family, version
    what = FAMILY_NAMES[family] + (f" {version}" if version != "unknown" else "")
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "no output")
    raise UnsupportedMpiError(
        f"host MPI is {what} ({mpirun}: {first_line!r}); the bind model needs Open MPI on the "
        f"host for an image built against Open MPI: {OPEN_MPI_HOWTO}")


def _ompi_info_path(mpirun: str, which: WhichFn) -> str:
    # The ompi_info beside this mpirun describes the same installation; another one on
    # PATH might not.
    sibling = os.path.join(os.path.dirname(mpirun), "ompi_info")
    if os.access(sibling, os.X_OK):
        return sibling
    found = which("ompi_info")
    if found is None:
        raise MpiNotFoundError(f"Open MPI's ompi_info is neither beside {mpirun} nor on PATH: "
                               f"the installation is incomplete; {OPEN_MPI_HOWTO}")
    return found


def parse_ompi_info_paths(text: str) -> dict[str, str]:
    """`path:NAME:VALUE` lines of `ompi_info --parsable --path all`."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "path":
            paths.setdefault(parts[1], parts[2].strip())
    return paths


def _ompi_paths(ompi_info: str, run: RunFn) -> dict[str, str]:
    done = _run(run, [ompi_info, "--parsable", "--path", "all"])
    paths = parse_ompi_info_paths(done.stdout)
    missing = [name for name in ("prefix", "libdir", "pkglibdir") if not paths.get(name)]
    if done.returncode != 0 or missing:
        raise MpiNotFoundError(f"{ompi_info} --parsable --path all failed (exit {done.returncode}, "
                               f"missing {', '.join(missing) or 'nothing'}): "
                               f"{done.stderr.strip()[:300]}")
    return paths


def parse_ldd(text: str) -> dict[str, str]:
    """soname -> path for each `soname => /path (0x...)` line; `not found` lines are skipped."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = LDD_LINE.match(line)
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def _ldd(files: Sequence[str], run: RunFn) -> dict[str, str]:
    # ldd exits non-zero when any one file is not dynamic; the others are still listed.
    found: dict[str, str] = {}
    for start in range(0, len(files), LDD_CHUNK):
        done = _run(run, ["ldd", *files[start:start + LDD_CHUNK]])
        for name, path in parse_ldd(done.stdout).items():
            found.setdefault(name, path)
    return found


def _find_libmpi(ompi_info: str, libdir: str, run: RunFn) -> tuple[str, str]:
    """(soname, path) of libmpi as the host's loader finds it for Open MPI's own tools."""
    for name, path in parse_ldd(_run(run, ["ldd", ompi_info]).stdout).items():
        if re.fullmatch(r"libmpi\.so\.\d+", name):
            return name, path
    candidates = sorted(p.name for p in _entries(libdir) if re.fullmatch(r"libmpi\.so\.\d+", p.name))
    if candidates:
        return candidates[0], os.path.join(libdir, candidates[0])
    raise MpiNotFoundError(f"libmpi not found: ldd {ompi_info} does not list it and {libdir} "
                           f"has no libmpi.so.N; {OPEN_MPI_HOWTO}")


def _entries(directory: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _binding_libraries(libmpi: str) -> dict[str, str]:
    """The Fortran and C++ bindings (`libmpi_mpifh.so.40`...) beside libmpi."""
    return {e.name: e.path for e in _entries(os.path.dirname(libmpi))
            if SONAME_WITH_MAJOR.match(e.name)}


def _plugin_files(directories: Iterable[str]) -> list[str]:
    return [e.path for d in directories for e in _entries(d)
            if e.name.endswith(".so") and e.is_file()]


def is_image_provided(soname: str) -> bool:
    stem = soname.split(".so", 1)[0]
    return (stem in IMAGE_PROVIDED_SONAMES or soname in IMAGE_PROVIDED_SONAMES
            or soname.startswith(IMAGE_PROVIDED_PREFIXES))


def library_closure(closure: Mapping[str, str], files: Sequence[str], run: RunFn) -> dict[str, str]:
    """`closure` (soname -> host path) plus everything `files` load, minus the image's own.

    ldd lists the whole dependency tree of each file, so one pass is already closed.
    """
    merged = dict(closure)
    for name, path in _ldd(files, run).items():
        merged.setdefault(name, path)
    return {name: merged[name] for name in sorted(merged) if not is_image_provided(name)}


def _pmix_dirs(closure: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """(plugin dir, data paths) of an external PMIx, found from where libpmix really lives.

    PMIx opens its plugins and help texts by its compiled-in install paths, which
    `ompi_info` does not report.
    """
    libpmix = next((path for name, path in closure.items() if name.startswith("libpmix.so")), None)
    if libpmix is None:
        return None, []
    libdir = os.path.dirname(os.path.realpath(libpmix))
    prefix = os.path.dirname(libdir)
    plugins = os.path.join(libdir, "pmix")
    data = [os.path.join(prefix, "share", "pmix"), os.path.join(prefix, "share", "pmix-mca-params.conf"),
            os.path.join(prefix, "etc", "pmix-mca-params.conf")]
    return (plugins if os.path.isdir(plugins) else None), [p for p in data if os.path.exists(p)]


def _same_path_binds(paths: Iterable[str]) -> list[Bind]:
    seen: list[str] = []
    for path in paths:
        if path not in seen:
            seen.append(path)
    return [Bind(path, path, "ro") for path in seen]


def discover_host_mpi(*, mpirun: str = "mpirun", run: RunFn = subprocess.run,
                      which: WhichFn = shutil.which,
                      library_dir: str = DEFAULT_LIBRARY_DIR) -> HostMpi:
    """Find the host's Open MPI and compute its binds; raises HostMpiError subclasses."""
    mpirun_path = _resolve_mpirun(mpirun, which)
    family, version = _identify(mpirun_path, run)
    ompi_info = _ompi_info_path(mpirun_path, which)
    paths = _ompi_paths(ompi_info, run)
    libmpi_name, libmpi = _find_libmpi(ompi_info, paths["libdir"], run)
    pkglibdir = paths["pkglibdir"]
    if not os.path.isdir(pkglibdir):
        raise MpiNotFoundError(f"Open MPI's plugin directory {pkglibdir} (ompi_info pkglibdir) "
                               f"does not exist; {OPEN_MPI_HOWTO}")
    roots = {libmpi_name: libmpi, **_binding_libraries(libmpi)}
    closure = library_closure(roots, [*roots.values(), *_plugin_files([pkglibdir])], run)
    pmix_plugins, pmix_data = _pmix_dirs(closure)
    if pmix_plugins is not None:
        # libpmix's location is known only now; its plugins' dependencies join the closure.
        closure = library_closure(closure, _plugin_files([pmix_plugins]), run)
    plugin_dirs = tuple(d for d in (pkglibdir, pmix_plugins) if d is not None)
    config = [p for p in (paths.get("sysconfdir"), paths.get("pkgdatadir")) if p and os.path.isdir(p)]
    binds = _same_path_binds([*plugin_dirs, *config, *pmix_data])
    binds += [Bind(path, f"{library_dir}/{name}", "ro") for name, path in closure.items()]
    return HostMpi(family=family, version=version, prefix=paths["prefix"], mpirun=mpirun_path,
                   libmpi=libmpi, plugin_dirs=plugin_dirs, binds=tuple(binds), library_dir=library_dir)


# -- the per-host cache ----------------------------------------------------------------------

def cache_path(cache_dir: Path, hostname: str) -> Path:
    return cache_dir / f"hostmpi-{hostname}.json"


def _stamp(libmpi: str) -> dict[str, int] | None:
    try:
        st = os.stat(libmpi)
    except OSError:
        return None
    return {"mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _cached(path: Path, hostname: str, mpirun: str) -> HostMpi | None:
    """The cached discovery, if it still describes this host's MPI."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("hostname") != hostname:
            return None
        host = HostMpi.from_json(data["host_mpi"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host.mpirun != mpirun or _stamp(host.libmpi) != data.get("libmpi_stamp"):
        return None
    return host


def _store(path: Path, hostname: str, host: HostMpi) -> None:
    data = {"format": CACHE_FORMAT, "hostname": hostname, "libmpi_stamp": _stamp(host.libmpi),
            "host_mpi": host.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_or_discover(cache_dir: Path, *, mpirun: str = "mpirun", refresh: bool = False,
                     run: RunFn = subprocess.run, which: WhichFn = shutil.which,
                     hostname: str | None = None) -> HostMpi:
    """The cached discovery for this host, or a fresh one (then cached).

    A cache entry is reused while the hostname, the mpirun that PATH finds and libmpi's
    mtime and size are unchanged, so an upgrade or a module switch triggers rediscovery.
    """
    hostname = hostname or socket.gethostname()
    path = cache_path(cache_dir, hostname)
    if not refresh:
        found = which(mpirun)
        host = _cached(path, hostname, os.path.abspath(found)) if found else None
        if host is not None:
            return host
    host = discover_host_mpi(mpirun=mpirun, run=run, which=which)
    # An unwritable cache costs a rediscovery next time, not this job.
    with contextlib.suppress(OSError):
        _store(path, hostname, host)
    return host
