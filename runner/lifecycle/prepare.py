"""From an allowed decision to a launch: verify the image, plan the sandbox, write job files.

This is shared by `hpc-runner run` and the agent, whatever the source of the job (runner.lifecycle.driver).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from runner.binds import is_within
from runner.config import AgentConfig
from runner.errors import InfrastructureError
from runner.job.prepared import PreparedJob
from runner.policy import Decision, Policy
from runner.spec import JobSpec
from sandbox.hostmpi import HostMpi, load_or_discover
from sandbox.images import DigestCache, verify_image
from sandbox.pathtrust import swappable
from sandbox.plan import JobPaths, SandboxRefused, SandboxSite, plan_local_launch, plan_sandbox
from sandbox.workspace import Returned, Snapshot, copy_back, copy_in


class WorkspaceRefused(SandboxRefused):
    """The workspace would expose something a job must never see."""


class Site:
    """What every job on this agent shares: config, policy, sandbox settings, caches."""

    def __init__(self, config: AgentConfig, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self.sandbox = SandboxSite(
            apptainer=config.sandbox.apptainer,
            protected_paths=tuple(str(p) for p in unbindable_paths(config)),
            userns=os.geteuid() == 0,
        )
        self._digests: DigestCache | None = None
        self._host_mpi: HostMpi | None = None

    @property
    def cache_dir(self) -> Path:
        return self.config.state_dir / "cache"

    def digest_cache(self) -> DigestCache:
        if self._digests is None:
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._digests = DigestCache(self.cache_dir / "image-digests.json")
        return self._digests

    def host_mpi(self) -> HostMpi:
        if self._host_mpi is None:
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._host_mpi = load_or_discover(self.cache_dir)
        return self._host_mpi


def protected_paths(config: AgentConfig) -> list[Path]:
    """What no job may see: the config's state directories and secret files, and the local
    queue's socket. Jobs run as the agent's own account, so a job that reached the socket would
    be taken for the agent's user, who may see and cancel every job."""
    paths = config.protected_paths()
    socket = config.socket_path()
    if not any(is_within(str(socket), str(path)) for path in paths):
        paths.append(socket)
    return paths


def unbindable_paths(config: AgentConfig) -> list[Path]:
    """What no bind may be, hold or be inside (AgentConfig.named_unbindable_paths), and the socket."""
    paths = [path for path, _ in config.named_unbindable_paths()]
    return paths + [path for path in protected_paths(config) if path not in paths]


def check_unswappable(spec: JobSpec, image_path: str) -> None:
    """Binds and the image are opened by path when the job starts (on a compute node, after it
    waited): refuse those that someone other than root or this account could swap or rewrite
    before then, as the checks made now would say nothing about that moment."""
    trusted = {0, os.geteuid()}
    for bind in spec.binds:
        problem = swappable(os.path.realpath(bind.source), trusted)
        if problem:
            raise SandboxRefused(f"bind {bind} refused: {problem}, so the path could be swapped for "
                                 "another before the job starts; grant binds whose directories only "
                                 "root or the service account can write")
    problem = swappable(os.path.realpath(image_path), trusted, contents=True)
    if problem:
        raise SandboxRefused(f"image {spec.image} ({image_path}) refused: {problem}, so it could be "
                             "changed after it was verified; keep images where only root or the "
                             "service account can write")


def job_dir(config: AgentConfig, job_id: str) -> Path:
    return config.work_root / job_id


# Beside a job's copy of a submitted workspace: where it came from and what each entry was.
WORKSPACE_RECORD = "workspace.json"


@dataclass(frozen=True)
class TakenWorkspace:
    job_id: str
    path: Path
    snapshot: Snapshot


def take_workspace(config: AgentConfig, job_id: str, submitted: Path, *, owner: int | None,
                   agent_uid: int) -> TakenWorkspace:
    """Copy a submitted directory into the new job's directory, which only the agent can write.

    The job binds the copy, never the submitted path: that path can be swapped for a link to
    anything the service account can read until the moment Apptainer binds it (sandbox/workspace.py).
    `owner` is the uid the directory must belong to; None takes its owner as it is (the agent's
    own account and root may offer any directory). Raises WorkspaceError; nothing is left behind.
    """
    directory = job_dir(config, job_id)
    config.work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700)
    try:
        if owner is None:
            owner = os.stat(submitted).st_uid
        snapshot = copy_in(submitted, directory / "workspace", owner=owner, agent_uid=agent_uid,
                           max_bytes=config.sandbox.max_workspace_mb * 1024 * 1024)
        snapshot.save(directory / WORKSPACE_RECORD)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return TakenWorkspace(job_id, directory / "workspace", snapshot)


def return_workspace(config: AgentConfig, job_id: str) -> Returned | None:
    """Give what a job created or changed in its copy back to the submitted directory; None when the
    job's workspace was not a copy. Raises WorkspaceError when nothing could go back."""
    directory = job_dir(config, job_id)
    record = directory / WORKSPACE_RECORD
    if not record.exists():
        return None
    return copy_back(directory / "workspace", Snapshot.load(record), job_id=job_id)


def check_workspace(workspace: Path, protected: list[Path]) -> Path:
    """The workspace is bound read-write at /work: it must not be or hold anything protected."""
    if not workspace.is_dir():
        raise InfrastructureError(f"workspace {workspace} is not a directory")
    real = Path(os.path.realpath(workspace))
    for path in protected:
        target = os.path.realpath(path)
        if is_within(str(real), target) or is_within(target, str(real)):
            raise WorkspaceRefused(
                f"workspace {workspace} (resolves to {real}) would expose {path} to the job; "
                "run from a project directory or pass --workdir")
    return real


def prepare_job(site: Site, *, job_id: str, spec: JobSpec, decision: Decision,
                workspace: Path) -> PreparedJob:
    """Verify, plan and write the job's files; raises InfrastructureError or SandboxRefused."""
    if not decision.allowed or decision.slurm is None:
        raise ValueError("prepare_job needs an allowed decision")
    real_workspace = check_workspace(workspace, protected_paths(site.config))
    check_unswappable(spec, site.policy.images[spec.image].path)
    image = verify_image(site.policy.images[spec.image], cache=site.digest_cache(),
                         apptainer=site.config.sandbox.apptainer)
    mpi = site.host_mpi() if spec.mpi else None
    directory = job_dir(site.config, job_id)
    meta = directory / "meta"
    workdir_root = site.config.sandbox.workdir_root
    scratch = workdir_root / job_id if workdir_root else directory / "tmp"
    for path in (site.config.work_root, directory, meta, scratch):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = JobPaths(job_id=job_id, workspace=str(real_workspace), scratch=str(scratch), meta=str(meta))
    plan = plan_sandbox(spec, decision, image.path, paths, site.sandbox, mpi)
    _write_private(meta / "env", plan.env_file)
    if plan.script is not None:
        _write_private(meta / "script", plan.script)
    argv = plan_local_launch(plan, spec, decision, mpi)
    return PreparedJob(job_id=job_id, spec=spec, decision=decision, image=image, plan=plan, argv=argv,
                       workspace=real_workspace, job_dir=directory, log_path=directory / "output.log")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
