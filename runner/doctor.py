"""`hpc-runner doctor`: a preflight of everything the agent needs on this host.

Each check is a small function returning a `Check`; each says what is wrong and exactly what
to do about it. Checks reach the host only through `Host.which` and `Host.run` (besides the
file system), so tests replace both with fakes. Every command runs under a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

from runner.binds import is_within
from runner.config import (
    FILE_DESCRIPTIONS,
    AgentConfig,
    check_policy_against_site,
    default_config,
    load_config,
)
from runner.embedded import embedded_policy_path
from runner.errors import InputError
from runner.policy import load_policy
from runner.secrets import SecretFileError, check_not_writable_by_others, read_secret_file, user_name
from runner.sources.buildkite.signature_keys import read_verification_jwks

Status = Literal["ok", "warn", "FAIL"]

COMMAND_TIMEOUT = 10.0
MIN_APPTAINER = (1, 3)          # --sharens (MPI ranks sharing one user namespace) came in 1.3
SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "scontrol")
# Node-local on clusters: compute nodes would not see workspaces there.
NODE_LOCAL_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")
EXIT_OK = 0
EXIT_FAILED = 1
# Below either, a file system is running out: job logs and workspaces stop being written.
MIN_FREE_FRACTION = 0.10
MIN_FREE_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None      # None: it could not be started or did not finish in time
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def reason(self) -> str:
        """The last line of stderr (or stdout): usually the one that says what went wrong."""
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return f"exit status {self.returncode}"


class Run(Protocol):
    def __call__(self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT,
                 input: str | None = None) -> CommandResult: ...


Which = Callable[[str], str | None]


def run_command(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT,
                input: str | None = None) -> CommandResult:
    """Run a command with no terminal, capturing its output, killed after `timeout` seconds."""
    # LC_ALL=C: version strings and errors are parsed, so keep them in English.
    env = {**os.environ, "LC_ALL": "C"}
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, text=True, errors="replace",
                              timeout=timeout, env=env, check=False,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return CommandResult(None, "", f"{argv[0]} did not answer within {timeout:g} s")
    except OSError as exc:
        return CommandResult(None, "", f"{argv[0]}: {exc.strerror}")
    return CommandResult(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class Host:
    which: Which = shutil.which
    run: Run = run_command
    statvfs: Callable[[str], os.statvfs_result] = os.statvfs


# ---------------------------------------------------------------------------------------------
# apptainer


def check_apptainer(config: AgentConfig, host: Host) -> Check:
    command = config.sandbox.apptainer
    fix = ("install Apptainer >= 1.3: on a cluster, the site's Apptainer (module or package); on a "
           "Debian development machine, run deploy/dev/setup.sh; or set [sandbox] apptainer to its "
           "absolute path")
    found = host.which(command)
    if found is None:
        return Check("apptainer", "FAIL", f"{command!r} not found on PATH", fix)
    result = host.run([found, "--version"])
    if not result.ok:
        return Check("apptainer", "FAIL", f"`{found} --version` failed: {result.reason()}", fix)
    return _apptainer_version_check(found, result.stdout.strip(), fix)


def _apptainer_version_check(found: str, output: str, fix: str) -> Check:
    version = _version(output)
    if "apptainer" not in output.lower():
        return Check("apptainer", "warn", f"{found} says {output!r}: not Apptainer (SingularityCE?); "
                     "the sandbox relies on Apptainer's options", fix)
    if version is None:
        return Check("apptainer", "warn", f"{found}: cannot read a version in {output!r}", fix)
    text = ".".join(map(str, version))
    if version[:2] < MIN_APPTAINER:
        return Check("apptainer", "warn", f"{found} is Apptainer {text}; MPI jobs need >= 1.3 "
                     "(--sharens): they will be slow or fail", fix)
    return Check("apptainer", "ok", f"Apptainer {text} at {found}")


def _version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


# ---------------------------------------------------------------------------------------------
# slurm and munge


def _needed_by_executor(config: AgentConfig) -> Status:
    """What a missing Slurm piece is: a failure for the slurm executor, a note otherwise."""
    return "FAIL" if config.executor == "slurm" else "warn"


def _not_needed(config: AgentConfig) -> str:
    return "" if config.executor == "slurm" else f" (not needed with executor {config.executor!r})"


def check_slurm(config: AgentConfig, host: Host) -> Check:
    severity = _needed_by_executor(config)
    missing = [name for name in SLURM_COMMANDS if host.which(name) is None]
    if missing:
        return Check("slurm", severity, f"not on PATH: {', '.join(missing)}{_not_needed(config)}",
                     "install the Slurm client commands (Debian: apt-get install slurm-client; on a "
                     "cluster: the site's Slurm module) and put them on the agent's PATH")
    result = host.run(["squeue", "--version"])
    if not result.ok:
        return Check("slurm", severity, f"`squeue --version` failed: {result.reason()}{_not_needed(config)}",
                     "give this node the cluster's Slurm configuration (/etc/slurm/slurm.conf, or "
                     "SLURM_CONF=PATH in the agent's environment)")
    return Check("slurm", "ok", f"{result.stdout.strip()} ({', '.join(SLURM_COMMANDS)} found)")


def check_slurmctld(config: AgentConfig, host: Host) -> Check:
    reason = f"scontrol and squeue not found{_not_needed(config)}"
    if host.which("scontrol") is not None:
        ping = host.run(["scontrol", "ping"])
        # Older Slurm prints "DOWN" yet exits 0.
        if ping.ok and "DOWN" not in ping.stdout:
            lines = ping.stdout.strip().splitlines()
            return Check("slurmctld", "ok", lines[0] if lines else "scontrol ping answered")
        if ping.returncode is None:
            # Timed out: asking again through squeue would only wait as long again.
            return _controller_unreachable(config, ping.reason())
        reason = ping.reason()
    if host.which("squeue") is not None:
        queue = host.run(["squeue", "-h", "-o", "%i"])
        if queue.ok:
            return Check("slurmctld", "ok", "reachable (squeue answered)")
        reason = queue.reason()
    return _controller_unreachable(config, reason)


def _controller_unreachable(config: AgentConfig, reason: str) -> Check:
    return Check("slurmctld", _needed_by_executor(config),
                 f"controller not reachable: {reason}{_not_needed(config)}",
                 "start slurmctld (systemctl start slurmctld), or check SlurmctldHost in slurm.conf "
                 "and the network path from this node to it")


def check_munge(config: AgentConfig, host: Host) -> Check:
    severity = _needed_by_executor(config)
    fix_install = "install munge (Debian: apt-get install munge) with the cluster's /etc/munge/munge.key"
    if host.which("munge") is None or host.which("unmunge") is None:
        return Check("munge", severity, f"munge or unmunge not on PATH{_not_needed(config)}", fix_install)
    fix_start = ("start munged (systemctl start munge) and check that /etc/munge/munge.key is the "
                 "cluster's key")
    credential = host.run(["munge", "-n"])
    if not credential.ok:
        return Check("munge", severity, f"`munge -n` failed: {credential.reason()}{_not_needed(config)}",
                     fix_start)
    decoded = host.run(["unmunge"], input=credential.stdout)
    if not decoded.ok:
        return Check("munge", severity, f"`munge -n | unmunge` failed: {decoded.reason()}"
                     f"{_not_needed(config)}", fix_start)
    return Check("munge", "ok", "munge -n | unmunge works")


# ---------------------------------------------------------------------------------------------
# MPI


def check_mpi(config: AgentConfig, host: Host) -> Check:
    wanted = config.mpi.implementation
    if wanted == "none":
        return Check("mpi", "ok", "MPI disabled by [mpi] implementation = \"none\": MPI jobs are refused")
    # Named explicitly in the config, Open MPI is expected; with "auto" its absence only
    # means MPI jobs are refused.
    severity: Status = "FAIL" if wanted == "openmpi" else "warn"
    mpirun = host.which("mpirun")
    output = host.run([mpirun, "--version"]).stdout if mpirun else ""
    family = _mpi_family(output)
    if family is None and host.which("ompi_info") is not None:
        output = host.run(["ompi_info", "--version"]).stdout
        family = _mpi_family(output)
    if family == "openmpi":
        return _open_mpi_check(output, mpirun, host)
    if family is not None:
        return Check("mpi", severity, f"{family} found{f' ({mpirun})' if mpirun else ''}: unsupported, "
                     "the sandbox binds the host's Open MPI into containers; MPI jobs will be refused",
                     "install Open MPI with PMIx on this node and the compute nodes (Debian: apt-get install "
                     "openmpi-bin libopenmpi-dev) and put its mpirun first on the agent's PATH")
    return Check("mpi", severity, "no MPI found (mpirun, ompi_info): MPI jobs will be refused",
                 "install Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev; on a cluster: the "
                 "site's Open MPI module) and put it on the agent's PATH")


def _mpi_family(version_output: str) -> str | None:
    if "Open MPI" in version_output:
        return "openmpi"
    if "Intel(R) MPI" in version_output:
        return "Intel MPI"
    if "HYDRA" in version_output or "MPICH" in version_output:
        return "MPICH"
    if "MVAPICH" in version_output:
        return "MVAPICH"
    return None


def _open_mpi_check(output: str, mpirun: str | None, host: Host) -> Check:
    version = _version(output)
    text = ".".join(map(str, version)) if version else "(version unknown)"
    prefix = None
    if host.which("ompi_info") is not None:
        info = host.run(["ompi_info", "--parsable", "--path", "prefix"])
        match = re.search(r"^path:prefix:(.+)$", info.stdout, re.MULTILINE)
        prefix = match.group(1).strip() if match else None
    if prefix is None and mpirun:
        prefix = str(Path(mpirun).parent.parent)
    return Check("mpi", "ok", f"Open MPI {text}, prefix {prefix or 'unknown'}")


# ---------------------------------------------------------------------------------------------
# files: policy, state, secrets, workspaces


def check_policy(config: AgentConfig) -> Check:
    if config.policy is None:
        rendered = embedded_policy_path(config)
        return Check("policy", "ok", "embedded default policy (bundled default-policy.toml: only the "
                     f"invoking user's small local jobs; written to {rendered} on first use)")
    try:
        check_not_writable_by_others(config.policy, "policy")
        policy = load_policy(config.policy)
    except SecretFileError as exc:
        return Check("policy", "FAIL", exc.detail, exc.fix)
    except InputError as exc:
        return Check("policy", "FAIL", f"invalid: {exc}",
                     f"correct the policy file and run `hpc-runner policy check {config.policy}`")
    reasons = check_policy_against_site(policy, config)
    if reasons:
        return Check("policy", "FAIL", "; ".join(reasons),
                     f"remove these binds from the grants in {config.policy}: jobs must never see the "
                     "agent's state or secrets")
    return Check("policy", "ok", f"{config.policy}: {len(policy.accounts)} accounts, {len(policy.images)} "
                 f"images, {len(policy.grants)} grants, no grant exposes the agent's state or secrets")


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _creatable(path: Path) -> tuple[bool, Path]:
    """Whether `mkdir -p path` would work: the nearest existing ancestor is a writable directory."""
    ancestor = _nearest_existing(path)
    return ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK), ancestor


def check_state_dir(path: Path, key: str) -> Check:
    me = user_name(os.geteuid())
    if not path.exists():
        creatable, ancestor = _creatable(path)
        if creatable:
            return Check(key, "ok", f"{path} does not exist yet; it will be created (mode 0700)")
        return Check(key, "FAIL", f"{path} does not exist and {ancestor} is not writable by {me}",
                     f"as root: install -d -m 700 -o {me} {path}")
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        return Check(key, "FAIL", f"{path} is not a directory", f"remove it, or set {key} to a directory")
    if st.st_uid != os.geteuid():
        return Check(key, "FAIL", f"{path} is owned by {user_name(st.st_uid)}, not {me}",
                     f"chown -R {me} {path}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return Check(key, "FAIL", f"{path} is open to group or others (mode {mode:04o})", f"chmod 700 {path}")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(key, "FAIL", f"{path} is not writable by {me} (mode {mode:04o})", f"chmod 700 {path}")
    return Check(key, "ok", f"{path} (mode {mode:04o}, owner {me})")


def check_secret_file(path: Path, key: str) -> Check:
    try:
        read_secret_file(path, what=FILE_DESCRIPTIONS.get(key, key))
    except SecretFileError as exc:
        return Check(f"secret {key}", "FAIL", exc.detail, exc.fix)
    return Check(f"secret {key}", "ok", f"{path} (mode 0600, owner {user_name(os.geteuid())})")


def check_jwks_file(path: Path, key: str) -> Check:
    """The verification keys as the agent will read them: a shared (HS256) key makes the file a secret."""
    try:
        jwks = read_verification_jwks(path)
    except SecretFileError as exc:
        return Check(f"file {key}", "FAIL", exc.detail, exc.fix)
    except InputError as exc:
        return Check(f"file {key}", "FAIL", str(exc), f"correct {path}: it must be the signers' JWKS")
    if jwks.shared_keys():
        return Check(f"file {key}", "ok",
                     f"{path} (holds a shared key: mode 0600, owner {user_name(os.geteuid())})")
    return Check(f"file {key}", "ok", f"{path} (public keys only, writable only by its owner)")


def check_work_root(config: AgentConfig) -> Check:
    path = config.work_root
    me = user_name(os.geteuid())
    if path.exists():
        if not path.is_dir():
            return Check("work_root", "FAIL", f"{path} is not a directory",
                         "remove it, or set work_root to a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            return Check("work_root", "FAIL", f"{path} is not writable by {me}", f"chown {me} {path}")
        state = "exists and is writable"
    else:
        creatable, ancestor = _creatable(path)
        if not creatable:
            return Check("work_root", "FAIL", f"{path} does not exist and {ancestor} is not writable by {me}",
                         f"as root: install -d -o {me} {path}")
        state = "does not exist yet; it will be created"
    if config.executor == "slurm" and any(is_within(str(path), root) for root in NODE_LOCAL_ROOTS):
        return Check("work_root", "warn", f"{path} {state}, but it is node-local on most clusters: "
                     "compute nodes will not see workspaces there",
                     "set work_root to a shared file system (e.g. /scratch)")
    return Check("work_root", "ok", f"{path} {state}")


def check_free_space(path: Path, key: str, host: Host) -> Check:
    """Whether the file system of `path` (or of its nearest existing parent) has room left."""
    name = f"{key}_space"
    probe = _nearest_existing(path)
    try:
        info = host.statvfs(str(probe))
    except OSError as exc:
        return Check(name, "warn", f"cannot tell the free space of {probe}: {exc.strerror}")
    free = info.f_bavail * info.f_frsize
    total = info.f_blocks * info.f_frsize
    share = free / total if total else 0.0
    detail = f"{_gib(free)} free of {_gib(total)} ({share:.0%}) on the file system of {probe}"
    if free < MIN_FREE_BYTES or share < MIN_FREE_FRACTION:
        return Check(name, "warn", f"only {detail}",
                     "free space there: shorten the [retention] job_dirs, logs and outputs periods of "
                     "the config and run `hpc-runner gc` (as the agent's account; --dry-run shows what "
                     "would go), or give it a larger file system")
    return Check(name, "ok", detail)


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# the whole preflight


def config_check(path: str | None) -> tuple[AgentConfig | None, Check]:
    """Load the config (or the embedded default) and report on the file itself."""
    if path is None:
        return default_config(), Check("config", "ok", "embedded default (no --config given)")
    try:
        config = load_config(path)
    except InputError as exc:
        return None, Check("config", "FAIL", str(exc), f"correct {path}")
    try:
        # The config decides which policy applies and where secrets are read from.
        check_not_writable_by_others(path, "config")
    except SecretFileError as exc:
        return config, Check("config", "FAIL", exc.detail, exc.fix)
    return config, Check("config", "ok", f"{path} (executor {config.executor!r})")


def run_checks(config: AgentConfig, host: Host) -> list[Check]:
    checks = [
        check_apptainer(config, host),
        check_slurm(config, host),
        check_slurmctld(config, host),
        check_munge(config, host),
        check_mpi(config, host),
        check_policy(config),
    ]
    checks += [check_state_dir(path, key) for path, key in config.state_dirs()]
    checks.append(check_work_root(config))
    checks += [check_free_space(path, key, host)
               for path, key in (*config.state_dirs(), (config.work_root, "work_root"))]
    checks += [check_secret_file(path, key) for path, key in config.named_secret_files()]
    checks += [check_jwks_file(path, key) for path, key in config.trusted_files()
               if key == "buildkite.verification_jwks_file"]
    return checks


def doctor(config_path: str | None, host: Host) -> list[Check]:
    config, first = config_check(config_path)
    if config is None:
        return [first]
    return [first, *run_checks(config, host)]


def render_text(checks: Sequence[Check]) -> str:
    lines: list[str] = []
    for check in checks:
        lines.append(f"{check.status:<4}  {check.name}: {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"      fix: {check.fix}")
    counts = {status: sum(c.status == status for c in checks) for status in ("FAIL", "warn", "ok")}
    lines.append(f"doctor: {counts['FAIL']} FAIL, {counts['warn']} warn, {counts['ok']} ok")
    return "\n".join(lines)


def exit_status(checks: Sequence[Check]) -> int:
    """0 when nothing failed (warnings allowed), 1 otherwise."""
    return EXIT_FAILED if any(check.status == "FAIL" for check in checks) else EXIT_OK
