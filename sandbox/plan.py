"""The Apptainer command line for one job: a pure function of spec, decision and site.

What a job gets, and why each flag is there:

- `--contain`: a minimal `/dev`, and `/tmp`, `/var/tmp` backed by the job's own scratch
  directory (`--workdir`) instead of the host's. `--containall` is not used: its IPC
  namespace breaks shared memory between ranks, its PID namespace confuses launchers.
  The site's `bind path` entries in apptainer.conf (e.g. /etc/hosts, /etc/localtime)
  still apply: they are the administrator's choice.
- `--cleanenv --no-eval --env-file META/env`: the host environment stays outside; the job's
  environment is exactly the env file (see `DOCUMENTED_ENV`), with every value
  single-quoted because Apptainer evaluates env files with a shell even under `--no-eval`.
  The env file wins over the launcher's variables that the rank wrapper carries in, so a
  job that sets, say, an OMPI_* variable itself overrides the launcher's value for it.
- `--no-home --home SCRATCH:/tmp`: the service account's home directory is not mounted,
  and HOME is `/tmp` (writable, per job) in the environment and in the generated
  `/etc/passwd`, so a job learns neither the account's home path nor anything in it.
  Apptainer refuses HOME from an env file, so the flag is the only way. With `--no-home`
  the `--home` source is not mounted; it names the job's scratch directory so that even
  if it were, nothing outside the job would be.
- `--pid` for non-MPI jobs: a PID namespace of their own. A job runs as the agent's own
  account, so without it a job could see and signal the agent and every other job; with
  it, it sees only its own processes. MPI jobs cannot have one: under `--sharens` the first
  rank would be the namespace's init, and when it exits the kernel kills every rank still
  finishing (seen here as ranks killed by SIGKILL after MPI_Finalize). Like their shared
  network namespace, this is stated by `explain` and in SECURITY.md.
- `--no-mount cwd`: the executor's working directory is never mounted, whatever it is.
  `--contain` already leaves it out in Apptainer 1.4; saying it costs nothing.
- `--net --network none` unless the grant allows network (MPI jobs cannot be isolated:
  their ranks reach the launcher over loopback, see `Decision.network_isolated`).
- the workspace at `/work` (also the working directory), the job's metadata (env file,
  script) read-only at `/.hpc-runner`, and the granted binds, both sides canonical.
- MPI jobs: `--sharens` (ranks on one node in one user and mount namespace, or Open MPI's
  shared-memory transport fails), the host MPI binds and `LD_LIBRARY_PATH` for them. The
  ranks also share the container's private `/dev/shm`, so the host's is not bound
  (Apptainer 1.4 skips `--bind /dev/shm` under `--contain` anyway). Each rank runs its
  command under the image's `/bin/sh` (`RANK_HOLD_SCRIPT`), which keeps it from ending
  before every rank of its node has started: see there for why.
- `--nv` only for a job that asks for GPUs under a grant that allows them.
- the job's named caches at `/cache/NAME`: read-only in the main phase, so that what runs on
  the compute nodes (and whatever it was given to test) cannot change what the next job finds.

The setup phase (`plan_setup`) is one process on the agent's node before the main phase: the
same image, workspace, binds and isolation as a non-MPI job (its own PID namespace), network only
when the grant has `setup_network`, and the caches read-write: that is where it puts what the
main phase, offline, needs. Its env file and script are `META/setup-env` and `META/setup-script`.

Every bind is a `--bind src:dst:mode` of its own; paths that contain `:` or `,` (which
`--bind` would split) or control characters are refused rather than quoted.

A job with `[job.mpi] launch = "inside"` runs its command once, in a sandbox like a rank's but
with its own PID namespace (it is no rank: nothing joins it, so no `--sharens`) and its mpiexec
channel bound read-write at /opt/hpc-runner/mpiexec; its ranks are the rank argv of an MPI job
with the request's program as the command, started by `sandbox.mpiexec`'s launcher. The env
file puts the `mpiexec` shim first on PATH (`PREPEND_PATH`, which Apptainer applies after the
image's own PATH).
"""

from __future__ import annotations

import os
import posixpath
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from runner.binds import FORBIDDEN_ROOTS, RESERVED_TARGETS, Bind, check_absolute_path, is_within
from runner.errors import HpcRunnerError, InfrastructureError
from runner.policy.engine import Decision, SlurmResources
from runner.spec import CACHE_ENV_PREFIX, JobSpec, cache_env_name, cache_target
from sandbox.envfile import EnvFileError, check_env_name, render_env_file
from sandbox.hostmpi import HostMpi
from sandbox.mpiexec import (
    CHANNEL_DIR_NAME,
    CHANNEL_TARGET,
    RANKS_PLACEHOLDER,
    SHIM_DIR_NAME,
    SHIM_NAME,
    SHIM_PATH_DIR,
    InsideLaunch,
    launcher_argv,
)

WORKSPACE = "/work"
META = "/.hpc-runner"
CONTAINER_HOME = "/tmp"
CONTAINER_TMPDIR = "/tmp"
ENV_FILE_NAME = "env"
SCRIPT_NAME = "script"
SETUP_ENV_FILE_NAME = "setup-env"
SETUP_SCRIPT_NAME = "setup-script"
# Scripts run with `sh -e`: the first failing command fails the job, as in CI services.
SCRIPT_SHELL = ("/bin/sh", "-e")
DEFAULT_HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RANK_WRAPPER_NAME = "hpcr-rank"

# Every MPI rank runs its command through this, inside the container (`/bin/sh -c SCRIPT
# hpc-runner COMMAND...`), because of how `--sharens` works in Apptainer 1.4: the first rank
# of a node to start records its container process in a shared instance file (keyed by the
# PID of Apptainer's parent, the launcher), and every later rank joins that process's
# namespaces through /proc/PID/ns. That process ends with the first rank's command; a rank
# still starting then finds no /proc/PID and fails ("could not open proc directory
# /proc/PID", or "Failed to enter in user namespace: No such process"), as most jobs whose
# first rank ended at once did. So each rank marks itself started in /dev/shm (private to
# the ranks of one node, which share it), runs the command, and then waits until as many
# ranks as its node has have marked themselves: the first rank's process outlives every
# join. A rank that calls MPI_Init never waits here: MPI_Init returns only once every rank
# has started. (Without --sharens there would be nothing to join, but Open MPI's
# shared-memory transport would fail between the ranks' separate containers.)
# - ranks on the node: HPC_RUNNER_TASKS under mpirun (all ranks on this node); under srun,
#   this node's entry of SLURM_STEP_TASKS_PER_NODE ("2(x3),1": two ranks on each of the
#   first three nodes, one on the fourth). A job can set neither (both prefixes are
#   reserved). A value in an unexpected form waits for no one, as without the hold.
# - the wait gives up after about a minute, with a note: a rank that slow to start is
#   reported by its own failure, and the job does not sit out its walltime here.
# - the command's exit status is the rank's (a signal N as 128+N, as Apptainer reports it);
#   a rank that cannot mark itself fails with 125 before running anything, since the others
#   would wait for it.
# - the image needs `/bin/sh` (as a `script` does) and `sleep`.
RANK_HOLD_NAME = "hpc-runner"
RANK_HOLD_DIR = "/dev/shm/.hpc-runner-ranks"
# Sets $ranks: how many ranks this node has.
RANK_COUNT_SCRIPT = """\
ranks=${HPC_RUNNER_TASKS:-1}
if [ -n "${SLURM_STEP_TASKS_PER_NODE:-}" ]; then
    ranks=1 node=${SLURM_NODEID:-x} saved_ifs=$IFS IFS=,
    set -f
    for entry in $SLURM_STEP_TASKS_PER_NODE; do
        count=${entry%%"("*} times=1
        case $entry in *"(x"*")") times=${entry#*"(x"}; times=${times%")"};; esac
        case $count:$times:$node in *[!0-9:]*|:*|*::*|*:) break;; esac
        case $entry in "$count"|"$count(x$times)") ;; *) break;; esac
        if [ "$node" -lt "$times" ]; then ranks=$count; break; fi
        node=$((node - times))
    done
    set +f
    IFS=$saved_ifs
fi
case $ranks in ''|*[!0-9]*) ranks=1;; esac
"""
RANK_HOLD_SCRIPT = RANK_COUNT_SCRIPT + f"""\
if ! {{ mkdir -p {RANK_HOLD_DIR} && : >{RANK_HOLD_DIR}/$$; }}; then
    echo "hpc-runner: cannot mark this rank started in {RANK_HOLD_DIR}" >&2
    exit 125
fi
"$@"
status=$?
tries=0
while set -- {RANK_HOLD_DIR}/*; [ "$#" -lt "$ranks" ]; do
    if [ "$tries" -ge 1200 ]; then
        echo "hpc-runner: gave up waiting for the other ranks of this node to start" >&2
        break
    fi
    tries=$((tries + 1))
    sleep 0.05
done
exit "$status"
"""
RANK_HOLD = ("/bin/sh", "-c", RANK_HOLD_SCRIPT, RANK_HOLD_NAME)

# What the runner itself puts into every job's environment (HOME through `--home`).
DOCUMENTED_ENV = (
    "CI", "HOME", "HPC_RUNNER_ACCOUNT", "HPC_RUNNER_CPUS_PER_TASK", "HPC_RUNNER_JOB_ID",
    "HPC_RUNNER_JOB_NAME", "HPC_RUNNER_NODES", "HPC_RUNNER_TASKS", "HPC_RUNNER_WORKSPACE", "TMPDIR",
)
# Also set by the runner, for a job with caches: HPC_RUNNER_CACHE_<NAME>, one for each.
CACHE_ENV = f"{CACHE_ENV_PREFIX}*"
# What Apptainer 1.4 adds inside the container on its own ("*": a prefix). It appends its
# own library directory to LD_LIBRARY_PATH, sets a default PATH and LANG=C unless the job's
# env sets them, and describes itself in APPTAINER_* and SINGULARITY_*. (It would also
# pass TERM and *_proxy from the host; the launcher's environment has neither.) An image's
# own %environment applies too.
APPTAINER_ADDED_ENV = (
    "APPTAINER_*", "LANG", "LD_LIBRARY_PATH", "PATH", "PROMPT_COMMAND", "PS1", "PWD", "SINGULARITY_*",
)
# Under srun the step's SLURM_* describe the rank too; under mpirun the launcher has none.
RANK_PASSTHROUGH_PREFIXES = ("SLURM_",)
# Slurm hands a GPU job its devices in this; --cleanenv would drop it.
GPU_PASSTHROUGH_NAMES = ("CUDA_VISIBLE_DEVICES",)


class SandboxRefused(HpcRunnerError):
    """The sandbox cannot be built as granted (a bind into a protected path...): exit 126."""


@dataclass(frozen=True)
class SandboxSite:
    """How this site runs Apptainer; from the agent's config."""

    apptainer: str = "apptainer"
    # State directories and secret files (absolute): no bind may reach into or above them.
    protected_paths: tuple[str, ...] = ()
    # Force user-namespace mode: needed when the runner itself runs as root on these hosts
    # (then mpirun is also allowed to run as root).
    userns: bool = False
    extra_flags: tuple[str, ...] = ()
    # PATH of the launcher on the host (apptainer, mpirun, sh must be found).
    host_path: str = DEFAULT_HOST_PATH


@dataclass(frozen=True)
class JobPaths:
    """The job's host directories, chosen by the executor."""

    job_id: str
    workspace: str  # bound read-write at /work, the working directory
    scratch: str  # --workdir: backs /tmp and /var/tmp (and so HOME)
    meta: str  # bound read-only at /.hpc-runner: the env file and the script

    @property
    def env_file(self) -> str:
        return posixpath.join(self.meta, ENV_FILE_NAME)

    @property
    def script_file(self) -> str:
        return posixpath.join(self.meta, SCRIPT_NAME)


@dataclass(frozen=True)
class SandboxPlan:
    """What the executor runs: write `env_file` (and `script`) into meta, then launch."""

    argv: tuple[str, ...]  # one rank: (apptainer, --quiet, exec, flags..., IMAGE, command...)
    env_file: str  # the text of META/env
    script: str | None  # the text of META/script, for a job with `script`
    # Run each rank through this (before argv): it carries the launcher's per-rank variables
    # across --cleanenv. Empty when there is nothing to carry.
    rank_wrapper: tuple[str, ...]
    # The launcher's whole environment: PATH and the host MPI's launcher settings.
    host_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Variables (a trailing "*" is a prefix) the rank wrapper carries into the job.
    passthrough: tuple[str, ...] = ()
    # The variables of `env_file`, as the job sees them (its provenance record names them).
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # `[job.mpi] launch = "inside"`: how the launcher starts ranks; `argv` is then the job's
    # command, run once, and the executors run it under the launcher (sandbox.mpiexec).
    mpiexec: InsideLaunch | None = None


# -- checks ------------------------------------------------------------------------------------

def _host_path(path: str, what: str) -> str:
    """A runner-chosen host path that goes into a `--bind`: absolute and unambiguous."""
    try:
        return check_absolute_path(path, what)
    except ValueError as exc:
        raise InfrastructureError(f"cannot bind into the sandbox: {exc}") from None


def _protected_roots(site: SandboxSite, realpath: Callable[[str], str]) -> list[str]:
    # A protected path reached through a symlink is protected under both names.
    roots: list[str] = []
    for path in site.protected_paths:
        for form in (posixpath.normpath(path), realpath(path)):
            if form not in roots:
                roots.append(form)
    return roots


def _source_problem(source: str, protected: Iterable[str]) -> str | None:
    if source == "/":
        return "the root directory"
    for root in FORBIDDEN_ROOTS:
        if is_within(source, root):
            return f"inside {root}"
    for path in protected:
        if is_within(source, path):
            return f"inside the protected path {path}"
        if is_within(path, source):
            return f"a parent of the protected path {path}"
    return None


def _target_problem(target: str, taken: Iterable[str]) -> str | None:
    if target == "/":
        return "the root directory"
    for root in (*FORBIDDEN_ROOTS, *RESERVED_TARGETS):
        if is_within(target, root):
            return f"inside {root}, which is reserved"
    for path in taken:
        if is_within(target, path) or is_within(path, target):
            return f"overlapping {path}, which the runner binds"
    return None


def _granted_bind(bind: Bind, protected: list[str], taken: list[str],
                  realpath: Callable[[str], str]) -> Bind:
    """The bind with a canonical source and target, or SandboxRefused saying why not."""
    source = _refused_unless_clean(realpath(bind.source), bind, "source")
    target = _refused_unless_clean(bind.target, bind, "target")
    for path in dict.fromkeys((bind.source, source)):
        problem = _source_problem(path, protected)
        if problem:
            how = f"{bind.source} resolves to {path}, which" if path != bind.source else path
            raise SandboxRefused(f"bind {bind} refused: its source {how} is {problem}")
    problem = _target_problem(target, taken)
    if problem:
        raise SandboxRefused(f"bind {bind} refused: its target {target} is {problem}")
    return Bind(source, target, bind.mode)


def _refused_unless_clean(path: str, bind: Bind, side: str) -> str:
    try:
        return check_absolute_path(path, f"bind {side}")
    except ValueError as exc:
        raise SandboxRefused(f"bind {bind} refused: {exc}") from None


def _runner_dir(path: str, what: str, protected: list[str], realpath: Callable[[str], str]) -> str:
    """A runner-chosen directory: canonical, and not an ancestor of anything protected."""
    resolved = _host_path(realpath(_host_path(path, what)), what)
    for root in protected:
        if resolved == "/" or is_within(root, resolved):
            raise InfrastructureError(f"the job's {what} {resolved} contains the protected path "
                                      f"{root}; choose per-job directories outside it")
    return resolved


# -- the parts of the command line ------------------------------------------------------------

def bind_flag(bind: Bind) -> tuple[str, str]:
    return ("--bind", f"{bind.source}:{bind.target}:{bind.mode}")


def _isolation_flags(site: SandboxSite, scratch: str, home: str, *, mpi: bool,
                     network_isolated: bool) -> list[str]:
    flags = ["--contain", "--cleanenv", "--no-eval", "--no-home", "--home", f"{scratch}:{home}",
             "--no-mount", "cwd"]
    if not mpi:
        flags.append("--pid")
    if site.userns:
        flags.append("--userns")
    if network_isolated:
        flags += ["--net", "--network", "none"]
    if mpi:
        flags.append("--sharens")
    return flags


def _wants_gpus(spec: JobSpec, decision: Decision) -> bool:
    return decision.gpus and (spec.resources.gpus or 0) > 0


def _mpi_binds(mpi: HostMpi, protected: list[str], realpath: Callable[[str], str]) -> list[Bind]:
    """The host MPI's binds, checked like a job's: they come from a cache file on disk."""
    binds = []
    for bind in mpi.binds:
        source = _host_path(bind.source, "host MPI path")
        for path in dict.fromkeys((source, realpath(source))):
            problem = _source_problem(path, protected)
            if problem:
                raise InfrastructureError(f"host MPI bind {bind} refused: {path} is {problem}")
        binds.append(Bind(source, _host_path(bind.target, "host MPI target"), "ro"))
    return binds


def _cache_binds(decision: Decision, mode: Literal["ro", "rw"], protected: list[str], taken: list[str],
                 realpath: Callable[[str], str]) -> list[Bind]:
    """The job's caches at /cache/NAME, their host directories checked like the runner's own binds:
    the policy names them, but a link could make one reach the agent's state."""
    binds = []
    for name, path in decision.caches:
        source = _host_path(realpath(_host_path(path, f"cache {name}")), f"cache {name}")
        for form in dict.fromkeys((posixpath.normpath(path), source)):
            problem = _source_problem(form, protected)
            if problem:
                how = f"{path} resolves to {form}, which" if form != posixpath.normpath(path) else path
                raise SandboxRefused(f"cache {name} refused: its directory {how} is {problem}")
        target = cache_target(name)
        problem = _target_problem(target, taken)
        if problem:
            raise SandboxRefused(f"cache {name} refused: {target} is {problem}")
        binds.append(Bind(source, target, mode))
    return binds


def _cache_targets(decision: Decision) -> list[str]:
    return [cache_target(name) for name, _ in decision.caches]


def _command(spec: JobSpec) -> tuple[str, ...]:
    if spec.script is not None:
        return (*SCRIPT_SHELL, posixpath.join(META, SCRIPT_NAME))
    if not spec.command:
        raise SandboxRefused(f"job {spec.name} has neither a command nor a script")
    if any("\x00" in arg for arg in spec.command):
        raise SandboxRefused(f"job {spec.name}: a command argument contains a NUL character")
    return spec.command


def _home(spec: JobSpec) -> str:
    """HOME inside: /tmp, or the job's own choice (Apptainer takes it only as a flag)."""
    home = spec.env.get("HOME", CONTAINER_HOME)
    try:
        return check_absolute_path(home, "HOME")
    except ValueError as exc:
        raise SandboxRefused(f"job {spec.name}: env.HOME: {exc}") from None


def _resources(decision: Decision) -> SlurmResources:
    if not decision.allowed or decision.slurm is None:
        raise SandboxRefused("the policy did not allow this job")
    return decision.slurm


def job_env(spec: JobSpec, decision: Decision, paths: JobPaths, mpi: HostMpi | None,
            extra_env: Mapping[str, str] = MappingProxyType({})) -> dict[str, str]:
    """The env file's variables: the runner's, then the executor's extras, then the spec's.

    The spec cannot set HPC_RUNNER_* (the spec parser reserves them). HOME is left out:
    Apptainer takes it from `--home`.
    """
    res = _resources(decision)
    env = {"CI": "true", "TMPDIR": CONTAINER_TMPDIR, **extra_env, **spec.env}
    env.update({
        "HPC_RUNNER_JOB_ID": paths.job_id, "HPC_RUNNER_JOB_NAME": spec.name,
        "HPC_RUNNER_ACCOUNT": decision.account or "", "HPC_RUNNER_NODES": str(res.nodes),
        "HPC_RUNNER_TASKS": str(res.tasks), "HPC_RUNNER_CPUS_PER_TASK": str(res.cpus_per_task),
        "HPC_RUNNER_WORKSPACE": WORKSPACE,
    })
    env.update({cache_env_name(name): cache_target(name) for name, _ in decision.caches})
    env.pop("HOME", None)
    if mpi is not None:
        # The bound MPI first; a job's own LD_LIBRARY_PATH still applies after it.
        own = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = mpi.library_dir + (f":{own}" if own else "")
    return env


def _passthrough(decision: Decision, gpus: bool, mpi: HostMpi | None) -> tuple[str, ...]:
    names: list[str] = []
    if mpi is not None and decision.mpi:
        names += [f"{prefix}*" for prefix in (*mpi.passthrough_prefixes, *RANK_PASSTHROUGH_PREFIXES)]
    if gpus:
        names += GPU_PASSTHROUGH_NAMES
    return tuple(names)


def rank_wrapper_script(passthrough: Iterable[str]) -> str:
    """POSIX sh that re-exports each passthrough variable as APPTAINERENV_<name>, then execs.

    Apptainer hands APPTAINERENV_<name> into the container as <name> even under
    --cleanenv (and, with --no-eval, unevaluated). Names are matched as [A-Za-z0-9_] only,
    which is what makes the `eval` safe; values are never parsed.
    """
    exprs = []
    for item in passthrough:
        stem = item[:-1] if item.endswith("*") else item
        check_env_name(stem)  # also keeps the stem free of anything sed or sh would read
        tail = "[A-Za-z0-9_]*" if item.endswith("*") else ""
        exprs.append(f"-e 's/^\\({stem}{tail}\\)=.*/\\1/p'")
    return (f"for name in $(env | sed -n {' '.join(exprs)}); do "
            'eval "value=\\${$name}"; export "APPTAINERENV_$name=$value"; done; exec "$@"')


# mpirun refuses to start as root unless told twice; a site that runs jobs as root
# (`userns`, a development machine) has already decided that.
MPIRUN_AS_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _host_env(site: SandboxSite, mpi: HostMpi | None) -> Mapping[str, str]:
    path = site.host_path
    env: dict[str, str] = {}
    if mpi is not None:
        # mpirun finds its own helpers (orted) beside itself; a module-installed MPI is
        # not on the default PATH.
        bindir = posixpath.dirname(mpi.mpirun)
        if bindir not in path.split(":"):
            path = f"{bindir}:{path}"
        env.update(mpi.launcher_env)
        if site.userns:
            env.update(MPIRUN_AS_ROOT_ENV)
    env["PATH"] = path
    return MappingProxyType(env)


# -- the plan ----------------------------------------------------------------------------------

def plan_sandbox(spec: JobSpec, decision: Decision, image_path: str, paths: JobPaths,
                 site: SandboxSite, mpi: HostMpi | None, *,
                 realpath: Callable[[str], str] = os.path.realpath,
                 extra_env: Mapping[str, str] = MappingProxyType({})) -> SandboxPlan:
    """The Apptainer argv, env file and launch wrapper for one job (pure but for `realpath`)."""
    _resources(decision)
    if decision.mpi and mpi is None:
        raise InfrastructureError(f"job {spec.name} uses MPI and no host MPI was discovered")
    job_mpi = mpi if decision.mpi else None
    protected = _protected_roots(site, realpath)
    workspace = _runner_dir(paths.workspace, "workspace", protected, realpath)
    scratch = _runner_dir(paths.scratch, "scratch directory", protected, realpath)
    meta = _runner_dir(paths.meta, "metadata directory", protected, realpath)
    image = _host_path(image_path, "image")
    mpi_binds = _mpi_binds(job_mpi, protected, realpath) if job_mpi else []
    caches = _cache_binds(decision, "ro", protected, [b.target for b in mpi_binds], realpath)
    taken = [b.target for b in (*mpi_binds, *caches)]
    granted = [_granted_bind(b, protected, taken, realpath) for b in spec.binds]
    gpus = _wants_gpus(spec, decision)
    env = job_env(spec, decision, paths, job_mpi, extra_env)
    try:
        env_text = render_env_file(env)
    except EnvFileError as exc:
        raise SandboxRefused(f"job {spec.name}: {exc}") from None
    argv = [site.apptainer, "--quiet", "exec",
            *_isolation_flags(site, scratch, _home(spec), mpi=decision.mpi,
                              network_isolated=decision.network_isolated),
            *(["--nv"] if gpus else []),
            "--workdir", scratch,
            *bind_flag(Bind(workspace, WORKSPACE, "rw")), "--pwd", WORKSPACE,
            *bind_flag(Bind(meta, META, "ro")), "--env-file", posixpath.join(meta, ENV_FILE_NAME)]
    for bind in (*granted, *caches, *mpi_binds):
        argv += bind_flag(bind)
    argv += [*site.extra_flags, image, *(RANK_HOLD if job_mpi else ()), *_command(spec)]
    passthrough = _passthrough(decision, gpus, job_mpi)
    wrapper = ("/bin/sh", "-c", rank_wrapper_script(passthrough), RANK_WRAPPER_NAME) if passthrough else ()
    plan = SandboxPlan(argv=tuple(argv), env_file=env_text, script=spec.script, rank_wrapper=wrapper,
                       host_env=_host_env(site, job_mpi), passthrough=passthrough,
                       env=MappingProxyType(env))
    if job_mpi is not None and spec.mpi_launch == "inside":
        return _mpiexec_inside(plan, spec, image, scratch=scratch, meta=meta, workspace=workspace,
                               tasks=_resources(decision).tasks)
    return plan


def _mpiexec_inside(plan: SandboxPlan, spec: JobSpec, image: str, *, scratch: str, meta: str,
                    workspace: str, tasks: int) -> SandboxPlan:
    """An MPI plan made into `launch = "inside"`'s: the rank argv kept for the launcher, the
    command's own sandbox (see the module's docstring) as `argv`."""
    command = _command(spec)
    options = plan.argv[:len(plan.argv) - len(command) - len(RANK_HOLD) - 1]
    channel = posixpath.join(scratch, CHANNEL_DIR_NAME)
    argv = (*("--pid" if word == "--sharens" else word for word in options),
            *bind_flag(Bind(channel, CHANNEL_TARGET, "rw")), image, *command)
    env = {**plan.env, "PREPEND_PATH": SHIM_PATH_DIR}
    inside = InsideLaunch(tasks=tasks, channel=channel, shim=posixpath.join(meta, SHIM_DIR_NAME, SHIM_NAME),
                          env_file=posixpath.join(meta, ENV_FILE_NAME), workspace=workspace,
                          rank_argv=(*options, image, *RANK_HOLD))
    return replace(plan, argv=argv, env_file=render_env_file(env), env=MappingProxyType(env), mpiexec=inside)


def plan_setup(spec: JobSpec, decision: Decision, image_path: str, paths: JobPaths, site: SandboxSite, *,
               realpath: Callable[[str], str] = os.path.realpath,
               extra_env: Mapping[str, str] = MappingProxyType({})) -> SandboxPlan:
    """The setup phase's Apptainer argv and env file (see the module's docstring); the caller writes
    `env_file` to META/setup-env and `script` to META/setup-script, and runs `argv` on its own node."""
    _resources(decision)
    setup = spec.setup
    if setup is None:
        raise SandboxRefused(f"job {spec.name} has no setup phase")
    protected = _protected_roots(site, realpath)
    workspace = _runner_dir(paths.workspace, "workspace", protected, realpath)
    scratch = _runner_dir(paths.scratch, "scratch directory", protected, realpath)
    meta = _runner_dir(paths.meta, "metadata directory", protected, realpath)
    image = _host_path(image_path, "image")
    caches = _cache_binds(decision, "rw", protected, [], realpath)
    granted = [_granted_bind(b, protected, _cache_targets(decision), realpath) for b in spec.binds]
    env = job_env(spec, decision, paths, None, extra_env)
    try:
        env_text = render_env_file(env)
    except EnvFileError as exc:
        raise SandboxRefused(f"job {spec.name}: {exc}") from None
    if setup.script is not None:
        command: tuple[str, ...] = (*SCRIPT_SHELL, posixpath.join(META, SETUP_SCRIPT_NAME))
    elif setup.command and not any("\x00" in arg for arg in setup.command):
        command = setup.command
    else:
        raise SandboxRefused(f"job {spec.name}: the setup phase needs a command (without NUL) or a script")
    argv = [site.apptainer, "--quiet", "exec",
            *_isolation_flags(site, scratch, _home(spec), mpi=False,
                              network_isolated=decision.setup_network_isolated),
            "--workdir", scratch,
            *bind_flag(Bind(workspace, WORKSPACE, "rw")), "--pwd", WORKSPACE,
            *bind_flag(Bind(meta, META, "ro")), "--env-file", posixpath.join(meta, SETUP_ENV_FILE_NAME)]
    for bind in (*granted, *caches):
        argv += bind_flag(bind)
    argv += [*site.extra_flags, image, *command]
    return SandboxPlan(argv=tuple(argv), env_file=env_text, script=setup.script, rank_wrapper=(),
                       host_env=_host_env(site, None), env=MappingProxyType(env))


def plan_local_launch(plan: SandboxPlan, spec: JobSpec, decision: Decision,
                      mpi: HostMpi | None, *, python: str = sys.executable) -> tuple[str, ...]:
    """The host command that runs the job on this machine (the local executor).

    MPI jobs start under the host's mpirun, every rank through the rank wrapper:
    - `-np TASKS`: the decision's rank count, all on this node;
    - `--oversubscribe`: a CI machine may have fewer cores than the job has ranks, and
      mpirun refuses to start more ranks than slots without it;
    - `--bind-to none`: Open MPI pins ranks to cores when not oversubscribed, which pins
      every concurrently running job to the same first cores of a shared machine.

    A `launch = "inside"` job runs its command once under the mpiexec launcher (`python`, the
    agent's own interpreter), which starts each `mpiexec`'s ranks with that same mpirun line.
    """
    res = _resources(decision)
    if not (spec.mpi and decision.mpi):
        return (*plan.rank_wrapper, *plan.argv)
    if mpi is None:
        raise InfrastructureError(f"job {spec.name} uses MPI and no host MPI was discovered")
    if plan.mpiexec is not None:
        launcher = (mpi.mpirun, "-np", RANKS_PLACEHOLDER, "--oversubscribe", "--bind-to", "none")
        return launcher_argv(python, plan.mpiexec, launcher, plan.rank_wrapper, plan.argv)
    return (mpi.mpirun, "-np", str(res.tasks), "--oversubscribe", "--bind-to", "none",
            *plan.rank_wrapper, *plan.argv)


def expected_env_name(name: str, spec: JobSpec, plan: SandboxPlan) -> bool:
    """Whether `name` may appear in the job's environment (for tests and `doctor`)."""
    patterns = (*DOCUMENTED_ENV, CACHE_ENV, *APPTAINER_ADDED_ENV, *spec.env, *plan.passthrough)
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def plan_srun_launch(plan: SandboxPlan, spec: JobSpec, decision: Decision, *, srun: str = "srun",
                     mpi_plugin: str = "pmix", python: str = sys.executable) -> tuple[str, ...]:
    """The launch line of a Slurm batch script (the Slurm executor): srun, then each rank.

    - `--export=ALL`: the batch script is submitted with `--export=NONE`, which Slurm passes on
      to every step as SLURM_EXPORT_ENV; without this the ranks would lose the PATH and the MPI
      launcher settings the script exports.
    - `--unbuffered`: the ranks write to a pseudo-terminal, so a job's lines reach the log file
      (which the agent tails) as they are written instead of when a buffer fills.
    - MPI jobs: every rank of the allocation, wired up by Slurm's PMIx (`--mpi=pmix`) and each
      through the rank wrapper; `--kill-on-bad-exit=1` ends the other ranks when one fails
      instead of leaving them blocked in a collective until the walltime.
      `--cpus-per-task` only when above 1: since Slurm 22.05 srun no longer inherits it from
      sbatch, and it implies `--exact`, which a one-CPU rank does not need.
    - Other jobs run once (`--nodes=1 --ntasks=1`), as the local executor runs them, with every
      CPU the job has on that node (a step without `--exact` gets them all).
    - `launch = "inside"` jobs run their command once, in the batch script itself (on the first
      node, inside the allocation), under the mpiexec launcher (`python`: the agent's interpreter,
      on a path the compute nodes share), which starts each `mpiexec`'s ranks as a step of the
      MPI launch line above with `--ntasks=N`.
    """
    res = _resources(decision)
    if spec.mpi and decision.mpi:
        cpus = (f"--cpus-per-task={res.cpus_per_task}",) if res.cpus_per_task > 1 else ()
        if plan.mpiexec is not None:
            launcher = (srun, "--export=ALL", f"--mpi={mpi_plugin}", "--unbuffered", "--kill-on-bad-exit=1",
                        f"--ntasks={RANKS_PLACEHOLDER}", *cpus)
            return launcher_argv(python, plan.mpiexec, launcher, plan.rank_wrapper, plan.argv)
        return (srun, "--export=ALL", f"--mpi={mpi_plugin}", "--unbuffered", "--kill-on-bad-exit=1",
                *cpus, *plan.rank_wrapper, *plan.argv)
    return (srun, "--export=ALL", "--nodes=1", "--ntasks=1", "--unbuffered", *plan.rank_wrapper, *plan.argv)
