"""Apptainer: the sandbox command line (`plan`, pure), its env file, the images verified before every
run, host MPI discovery, a submitted workspace copied in and back, and paths nobody else can swap."""

from sandbox.envfile import EnvFileError, render_env_file, single_quote
from sandbox.hostmpi import (
    HostMpi,
    HostMpiError,
    MpiNotFoundError,
    UnsupportedMpiError,
    discover_host_mpi,
    load_or_discover,
)
from sandbox.plan import (
    APPTAINER_ADDED_ENV,
    DOCUMENTED_ENV,
    JobPaths,
    SandboxPlan,
    SandboxRefused,
    SandboxSite,
    expected_env_name,
    plan_local_launch,
    plan_sandbox,
)

__all__ = [
    "APPTAINER_ADDED_ENV",
    "DOCUMENTED_ENV",
    "EnvFileError",
    "HostMpi",
    "HostMpiError",
    "JobPaths",
    "MpiNotFoundError",
    "SandboxPlan",
    "SandboxRefused",
    "SandboxSite",
    "UnsupportedMpiError",
    "discover_host_mpi",
    "expected_env_name",
    "load_or_discover",
    "plan_local_launch",
    "plan_sandbox",
    "render_env_file",
    "single_quote",
]
